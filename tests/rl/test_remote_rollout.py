"""Disaggregated rollout: the RL loop sampling on `miles-fsdp serve` instances over HTTP.

Two real servers (uvicorn on loopback, CPU, fp32) roll out; weights reach them through a
checkpoint directory each step. Sampling is a pure function of (seed, sample, position) and
the servers run the same kernels, so the run is the colocated run, bit for bit."""

import json
import re
import time
import urllib.request

import pytest
from rl_helpers import rl_args
from server_thread import ServerThread
from torchrun import torchrun

from miles_fsdp.commands.serve import ServeConfig, build_server
from miles_fsdp.data.datasets import DataConfig
from miles_fsdp.engine.config import EngineConfig
from miles_fsdp.engine.sequence import Request, SamplingParams
from miles_fsdp.models.testing import build_tiny_checkpoint
from miles_fsdp.observe.metrics import read_metrics
from miles_fsdp.rl.config import RLConfig, RolloutConfig
from miles_fsdp.rl.loop import OnPolicyError, run_rl
from miles_fsdp.engine.remote import RemoteEngine, RemoteEngineError
from miles_fsdp.train.optim import OptimConfig
from miles_fsdp.train.trainer import TrainerConfig

REWARD = '''
def reward(sample):
    ids = sample.response_ids
    return sum(t % 2 == 0 for t in ids) / max(len(ids), 1)
'''

HOOK = '''
from miles_fsdp.data.sample import Status
from miles_fsdp.rl.generate_hook import append_env_tokens, append_model_turn


async def generate(sample, engine_call, sampling_params):
    for turn in range(2):
        out = await engine_call(list(sample.prompt_ids) + sample.response_ids, sampling_params)
        append_model_turn(sample, out)
        if turn == 0:
            append_env_tokens(sample, [5, 6])  # a tool's reply: in the context, not trained on
    sample.status = Status.COMPLETED if out.finish_reason == "stop" else Status.TRUNCATED
    return sample
'''

KEYS = ("rollout/reward_mean", "rollout/response_len_mean", "train/loss", "train/grad_norm", "train/entropy")


def _server(model, dtype: str = "float32", port: int = 0) -> ServerThread:
    """A `miles-fsdp serve` of `model` on loopback (CPU, small KV cache, n <= 8)."""
    cfg = ServeConfig(model=str(model), device="cpu", dtype=dtype, max_n=8, port=port,
                      engine=EngineConfig(page_size=16, num_pages=64, max_prefill_tokens=256, cuda_graphs=False))
    return ServerThread(build_server(cfg), port=port)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    ckpt = build_tiny_checkpoint(root / "ckpt", "qwen3")
    other = build_tiny_checkpoint(root / "other", "qwen3", seed=5)  # servers start on other weights
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "label": str(2 * i)}) + "\n" for i in range(40)))
    (root / "my_reward.py").write_text(REWARD)
    (root / "my_hook.py").write_text(HOOK)
    with _server(other) as a, _server(other) as b:
        yield root, ckpt, data, (a, b)


def _cfg(root, ckpt, data, name, **rollout) -> RLConfig:
    return RLConfig(
        model=str(ckpt), data=DataConfig(path=str(data), prompts_per_batch=4), run_dir=str(root / name), steps=3,
        rollout=RolloutConfig(**{"n_samples_per_prompt": 4, "max_new_tokens": 6,
                                 "reward": f"{root}/my_reward.py:reward", **rollout}),
        trainer=TrainerConfig(optim=OptimConfig(lr=3e-3, warmup_steps=0)), export_hf=False)


def _rows(run_dir):
    return [[r[k] for k in KEYS] for r in read_metrics(run_dir) if "train/loss" in r]


@pytest.mark.parametrize("hook", [False, True], ids=["plain", "multi_turn_hook"])
def test_remote_rollout_equals_colocated(setup, hook):
    root, ckpt, data, urls = setup
    extra = {"generate_fn": f"{root}/my_hook.py:generate"} if hook else {}
    tag = "hook" if hook else "plain"
    local = run_rl(_cfg(root, ckpt, data, f"local_{tag}", **extra))
    remote = run_rl(_cfg(root, ckpt, data, f"remote_{tag}", servers=urls, **extra))
    assert remote["logprob_abs_diff_max"] == 0.0 == local["logprob_abs_diff_max"]  # asserted every step too
    assert _rows(root / f"remote_{tag}") == _rows(root / f"local_{tag}")
    assert len(_rows(root / f"remote_{tag}")) == 3
    # both servers hold the last version; only that version's directory is kept
    with RemoteEngine(urls, timeout_s=30) as client:
        assert client.versions == [3, 3]
    assert [p.name for p in (root / f"remote_{tag}" / "weights").iterdir()] == ["v000003"]
    assert all(_served(u) > 0 for u in urls)  # prompts went round-robin to both servers


def _served(url: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    hits = re.findall(r'miles_http_requests_total\{endpoint="/generate",status="200"\} (\S+)', text)
    return sum(map(float, hits))


def test_remote_engine_errors_name_the_server_and_the_fix(setup):
    root, ckpt, data, urls = setup
    with pytest.raises(RemoteEngineError, match=r"rollout server http://127\.0\.0\.1:9/health: .*RolloutConfig\.servers"):
        RemoteEngine(["http://127.0.0.1:9"], timeout_s=5, wait_s=0)
    too_many = Request([1, 2, 3], SamplingParams(n=9, max_new_tokens=2, seed=0))  # the servers allow n <= 8
    class NoCheckpoint:  # a weight source whose checkpoint never reaches the disk
        def save_hf(self, path):
            return root / "missing"

    with RemoteEngine(urls[:1], weights_dir=root / "weights", timeout_s=30) as client:
        with pytest.raises(RemoteEngineError, match=r"HTTP 400: n=9 is larger than this server's limit of 8"):
            client.generate([too_many])
        with pytest.raises(RemoteEngineError, match=r"/update_weights answered HTTP 400: path: .* is not a directory"):
            client.update_weights(NoCheckpoint(), 1)
    with pytest.raises(ValueError, match=r"rollout.servers='localhost:8000' \(--rollout.servers\): each entry must be a URL"):
        RolloutConfig(servers=("localhost:8000",))


def test_two_ranks_share_the_servers(setup):
    root, ckpt, data, urls = setup
    run = root / "two_ranks"
    # no retry: the servers would already hold the first attempt's weights
    torchrun(rl_args(root, ckpt, data, run, 2, "--rollout.servers", *urls, "--no-export-hf"), timeout=300, retry=False)
    rows = [r for r in read_metrics(run) if "train/loss" in r]
    assert len(rows) == 2 and all(r["train/logprob_abs_diff_max"] == 0.0 for r in rows)
    with RemoteEngine(urls, timeout_s=30) as client:
        assert client.versions == [2, 2]


def test_server_in_another_dtype_is_caught(setup):
    root, ckpt, data, _ = setup
    with _server(ckpt, dtype="bfloat16") as url:
        with pytest.raises(OnPolicyError, match=r"with the trainer's compute dtype, --dtype auto"):
            run_rl(_cfg(root, ckpt, data, "bf16_server", servers=(url,)))


def test_server_of_another_model_stops_the_run_with_its_reason(setup):
    root, ckpt, data, _ = setup
    llama = build_tiny_checkpoint(root / "llama", "llama")
    with _server(llama) as url:
        with pytest.raises(RemoteEngineError, match=r"/update_weights answered HTTP 400: .*checkpoint does not match the model"):
            run_rl(_cfg(root, ckpt, data, "wrong_server", servers=(url,)))


def test_client_waits_for_a_server_that_is_still_starting(setup):
    import socket
    import threading

    root, ckpt, _, _ = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    got = {}
    t = threading.Thread(target=lambda: got.setdefault(
        "versions", RemoteEngine([f"http://127.0.0.1:{port}"], timeout_s=30, wait_s=60).versions))
    t.start()  # polls /health while nothing listens yet
    time.sleep(3)
    with _server(ckpt, port=port):
        t.join(timeout=60)
    assert got == {"versions": [0]}


def test_eval_command_on_servers_equals_local(setup, tmp_path):
    from miles_fsdp.commands.eval import EvalCommandConfig, main as eval_main

    root, ckpt, data, _ = setup
    with _server(ckpt) as url:  # serves ckpt's own weights (the shared servers hold trained ones)
        for name, servers in (("local", ()), ("remote", (url,))):
            eval_main(EvalCommandConfig(model=str(ckpt), data=str(data), max_new_tokens=6, max_prompts=8, n_samples=2,
                                 temperature=1.0, device="cpu", servers=servers, out=str(tmp_path / f"{name}.json")))
    local, remote = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local", "remote"))
    assert remote == local and local["eval/num_prompts"] == 8


def test_a_stop_cuts_remote_generation_and_the_server_aborts(setup):
    root, ckpt, data, (url, _) = setup
    eng = RemoteEngine([url])
    long = SamplingParams(n=8, max_new_tokens=200, seed=1, ignore_eos=False)
    t0 = time.monotonic()
    results = eng.generate([Request([1, 2, 3], long) for _ in range(4)], stop=lambda: time.monotonic() - t0 > 0.5)
    assert time.monotonic() - t0 < 10
    assert all(r.finish_reason.value == "abort" and not r.token_ids for rs in results for r in rs)
    deadline = time.monotonic() + 30  # the server saw the disconnects and aborted: its queue drains
    while time.monotonic() < deadline:
        depth = [ln for ln in urllib.request.urlopen(url + "/metrics").read().decode().splitlines()
                 if ln.startswith("miles_queue_depth ")]
        if depth and float(depth[0].split()[1]) == 0.0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the server kept generating: {depth}")
    eng.close()
