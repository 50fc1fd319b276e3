"""Every command of README.md's "Using it" block, run on the quickstart's outputs (CPU).

The session's `miles-fsdp quickstart --short` (tests/conftest.py) gives the model and the data; each README line
then runs as written, with these substitutions (and nothing else changed):
    /ckpt/Qwen3-0.6B, DIR          -> RUN/rl/hf (the quickstart's exported checkpoint)
    train.jsonl, test.jsonl        -> RUN/data/rl.jsonl, RUN/data/heldout.jsonl
    sft.jsonl                      -> RUN/data/sft.jsonl
    runs/sft/checkpoints/step_...  -> RUN/sft/checkpoints/step_... (the quickstart's SFT stage)
    runs/my_run, hf_dir            -> under the test's directory (also the working directory,
                                      so default outputs such as runs/sft land there); with
                                      --rollout.servers, under RUN/rl, the servers' default
                                      --weights-root (the parent of their --model)
    rl ...                         -> the first line's flags
    --prompt "Hello"               -> --prompt "rev abcd=" (the quickstart task's prompt form)
    --port 8000, gpu1:8000         -> a free port, 127.0.0.1
plus step counts: rl --steps 1, sft and train-draft --steps 2; and rl --rollout.max-new-tokens 16: the
default (256) must fit beside the prompt in the model's context, 256 tokens for the quickstart's.
torchrun (as `python -m torch.distributed.run`) runs 2 processes (gloo on CPU) instead of 8,
with --standalone (a free rendezvous port, as tests run side by side).
`<command> --help` is tests/cli/test_cli.py's job (every command).
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from miles_fsdp.observe.metrics import read_metrics

README = Path(__file__).resolve().parents[2] / "README.md"
TASK_PROMPT = "rev abcd="  # the quickstart task: reverse the word (src/miles_fsdp/quickstart/task.py)
EOS = "<|eos|>"
pytestmark = pytest.mark.slow  # one quickstart --short (~1.5 min on 2 cores) and ~90 s of commands

# README line (comment stripped) -> the test that runs it
COVERED = {
    "miles-fsdp rl --model /ckpt/Qwen3-0.6B --data.path train.jsonl --rollout.reward math "
    "--rollout.n-samples-per-prompt 8 --eval.path test.jsonl --run-dir runs/my_run": "test_rl",
    "torchrun --nproc-per-node 8 -m miles_fsdp.cli rl ...": "test_torchrun_rl",
    "miles-fsdp sft --model DIR --data sft.jsonl": "test_sft",
    'miles-fsdp generate --model DIR --prompt "Hello"': "test_generate",
    "miles-fsdp serve --model DIR --port 8000": "test_serve",
    "miles-fsdp rl ... --rollout.servers http://gpu1:8000 http://gpu2:8000": "test_rl_on_servers",
    "miles-fsdp rl ... --engine.num-speculative-tokens 3": "test_rl_speculative",
    "miles-fsdp train-draft --model DIR --data sft.jsonl": "test_train_draft",
    "miles-fsdp eval --model DIR --data test.jsonl": "test_eval",
    "miles-fsdp convert --checkpoint runs/sft/checkpoints/step_00000100 --out hf_dir": "test_convert",
    "miles-fsdp <command> --help": "tests/cli/test_cli.py::test_command_help",
}
RL_SMALL = ["--steps", "1", "--rollout.max-new-tokens", "16"]


def readme_lines() -> list[str]:
    """The commands of the first ```bash block under '## Using it', continuations joined."""
    text = README.read_text().split("## Using it", 1)[1]
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    lines, current = [], ""
    for raw in block.splitlines():
        current += " " + raw.split(" #", 1)[0].strip() if current else raw.split(" #", 1)[0].strip()
        if current.endswith("\\"):
            current = current[:-1].strip()
            continue
        if current:
            lines.append(" ".join(current.split()))
        current = ""
    return lines


def _run(*args: str, cwd: Path, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check:
        assert out.returncode == 0, f"{' '.join(args)} exited {out.returncode}:\n{out.stderr[-3000:]}"
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def qs(quickstart_short) -> Path:
    """The quickstart's run directory (data/, rl/hf, rl/checkpoints): tests/conftest.py's run."""
    return quickstart_short[0]


@pytest.fixture
def cwd(tmp_path) -> Path:
    return tmp_path


def rl_first_line(qs: Path, run_dir: str) -> list[str]:
    """The README's first line with the quickstart's model and data."""
    return ["rl", "--model", str(qs / "rl/hf"), "--data.path", str(qs / "data/rl.jsonl"),
            "--rollout.reward", "math", "--rollout.n-samples-per-prompt", "8",
            "--eval.path", str(qs / "data/heldout.jsonl"), "--run-dir", run_dir]


def _rl_ran(run_dir: Path) -> dict:
    rows = read_metrics(run_dir)
    steps = [r for r in rows if "train/logprob_abs_diff_max" in r]
    assert steps and all(r["train/logprob_abs_diff_max"] == 0.0 for r in steps)  # true on-policy
    assert any("eval/accuracy" in r for r in rows)
    assert (run_dir / "hf" / "model.safetensors").is_file()
    return steps[-1]


def test_every_readme_line_is_run():
    lines = readme_lines()
    missing = [line for line in lines if line not in COVERED]
    assert not missing, f"README 'Using it' lines with no test in {Path(__file__).name}: {missing}; add one to COVERED"
    stale = [line for line in COVERED if line not in lines]
    assert not stale, f"COVERED lists commands no longer in the README: {stale}"
    assert all(name in globals() for name in COVERED.values() if "::" not in name)


def test_generate(qs, cwd):
    recorded = json.loads((qs / "rl/hf/generation_config.json").read_text()).get("prompt_format")
    assert recorded == "plain", (
        f"the quickstart's checkpoint records prompt_format={recorded!r} in generation_config.json; it trains on "
        "plain prompts, so it must record 'plain' (quickstart/model.py's generation_config.json, or rl/sft "
        "export calling data.tokenizer.record_prompt_format), else `generate --prompt` applies the chat template")
    out = _run("miles-fsdp", "generate", "--model", str(qs / "rl/hf"), "--prompt", TASK_PROMPT, cwd=cwd)
    text = out.stdout.split("\n", 2)[1]  # "--- prompt 0 (...)" then the text
    assert text.removesuffix(EOS).strip(), f"generate printed only {text!r} for {TASK_PROMPT!r}"
    assert re.fullmatch(r"[a-h]+", text.removesuffix(EOS)), f"not a word of the task: {text!r}"
    assert "encoded as plain text" in out.stderr  # the quickstart trained on plain prompts
    # every --prompt, in order
    two = _run("miles-fsdp", "generate", "--model", str(qs / "rl/hf"), "--prompt", TASK_PROMPT, "--prompt",
               "rev hgfe=", "--json", cwd=cwd)
    records = [json.loads(line) for line in two.stdout.splitlines()]
    assert [r["prompt_index"] for r in records] == [0, 1]
    assert records[0]["text"] == text


def test_eval(qs, cwd):
    out = _run("miles-fsdp", "eval", "--model", str(qs / "rl/hf"), "--data", str(qs / "data/heldout.jsonl"), cwd=cwd)
    metrics = json.loads(out.stdout)
    assert metrics["eval/num_prompts"] == 64 and metrics["eval/reward_errors"] == 0
    summary = json.loads((qs / "summary.json").read_text())
    assert metrics["eval/accuracy"] == summary["rl_accuracy"] > 0  # the quickstart's own held-out number
    assert "--answer-extract full" in out.stderr and "--max-new-tokens" in out.stderr
    bad = _run("miles-fsdp", "eval", "--model", str(qs / "rl/hf"), "--data", str(qs / "data/heldout.jsonl"),
               "--max-prompts", "-3", cwd=cwd, check=False)
    assert bad.returncode != 0 and "--max-prompts -3" in bad.stderr


def test_sft(qs, cwd):
    _run("miles-fsdp", "sft", "--model", str(qs / "rl/hf"), "--data", str(qs / "data/sft.jsonl"), "--steps", "2",
         cwd=cwd)
    rows = read_metrics(cwd / "runs/sft")  # SFTConfig.out's default, under the working directory
    assert len(rows) == 2 and all(r["train/loss"] > 0 for r in rows)
    assert (cwd / "runs/sft/hf/model.safetensors").is_file()


def test_rl(qs, cwd):
    _run("miles-fsdp", *rl_first_line(qs, "runs/my_run"), *RL_SMALL, cwd=cwd)
    _rl_ran(cwd / "runs/my_run")


def test_rl_speculative(qs, cwd):
    _run("miles-fsdp", *rl_first_line(qs, "runs/my_run"), *RL_SMALL, "--engine.num-speculative-tokens", "3", cwd=cwd)
    last = _rl_ran(cwd / "runs/my_run")  # the quickstart's checkpoint carries its trained draft
    assert last["engine/spec_mean_accept_len"] > 1.0 and "engine/spec_accept_rate_3" in last
    assert last["draft/loss"] > 0  # trained online on the step's batch


def test_train_draft(qs, cwd):
    _run("miles-fsdp", "train-draft", "--model", str(qs / "rl/hf"), "--data", str(qs / "data/sft.jsonl"),
         "--steps", "2", cwd=cwd)
    rows = read_metrics(cwd / "runs/train-draft")  # TrainDraftConfig.out's default, under the working directory
    assert len(rows) == 2 and all(r["draft/loss"] > 0 for r in rows)
    cfg = json.loads((cwd / "runs/train-draft/hf/config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1


def test_torchrun_rl(qs, cwd):
    _run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
         "miles_fsdp.cli", *rl_first_line(qs, "runs/my_run"), *RL_SMALL, cwd=cwd, timeout=600)
    _rl_ran(cwd / "runs/my_run")


def test_convert(qs, cwd):
    step = max((qs / "sft/checkpoints").glob("step_*"))  # the README's runs/sft/checkpoints/step_...
    _run("miles-fsdp", "convert", "--checkpoint", str(step), "--out", "hf_dir", cwd=cwd)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (cwd / "hf_dir" / name).is_file(), name
    out = _run("miles-fsdp", "generate", "--model", "hf_dir", "--prompt", TASK_PROMPT, cwd=cwd)
    assert out.stdout.split("\n", 2)[1].removesuffix(EOS).strip()


@pytest.fixture(scope="module")
def server(qs, tmp_path_factory):
    """`miles-fsdp serve --model DIR --port PORT` running; its URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(["miles-fsdp", "serve", "--model", str(qs / "rl/hf"), "--port", str(port)],
                                stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"`miles-fsdp serve --model DIR --port {port}` exited {proc.returncode} on CPU "
                            f"(a default KV cache size on CPU is needed for the README line):\n"
                            f"{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"serve did not answer /health within 180 s:\n{log.read_text()[-3000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_serve(server):
    r = httpx.post(f"{server}/v1/completions", json={"model": "hf", "prompt": TASK_PROMPT, "max_tokens": 8,
                                                     "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"].strip(), r.text


def test_rl_on_servers(qs, cwd, server):
    # the run directory (so RUN_DIR/weights, which the servers load each step) lies under the
    # servers' default --weights-root, the parent of their --model (RUN/rl)
    run_dir = qs / "rl" / "remote_run"
    out = _run("miles-fsdp", *rl_first_line(qs, str(run_dir)), *RL_SMALL, "--rollout.servers", server, server,
               cwd=cwd, check=False)
    assert "OnPolicyError" not in out.stderr, (
        "rl on a server started as the README says (`serve --model DIR --port 8000`) is off-policy on CPU: the "
        "server's default --dtype must match the trainer's compute dtype (float32 on CPU, bfloat16 on CUDA), "
        "e.g. a serve --dtype default of 'auto':\n" + out.stderr[-1500:])
    assert out.returncode == 0, out.stderr[-3000:]
    _rl_ran(run_dir)
