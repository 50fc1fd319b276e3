"""`miles-fsdp serve` end to end on CPU: a tiny random Qwen3 checkpoint, the real engine,
uvicorn on 127.0.0.1, the official openai client and httpx."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import subprocess
import sys
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_thread import ServerThread

from miles_fsdp.commands.serve import ServeConfig, build_server
from miles_fsdp.engine.config import EngineConfig
from miles_fsdp.models.testing import build_tiny_checkpoint

NAME = "tiny"
PAGE, PAGES = 16, 48  # KV capacity: 47 usable pages * 16 = 752 tokens per sample


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    a = build_tiny_checkpoint(root / "a", "qwen3", seed=0, max_position_embeddings=1024)
    b = build_tiny_checkpoint(root / "b", "qwen3", seed=1, max_position_embeddings=1024)
    other = build_tiny_checkpoint(root / "llama", "llama", seed=0)
    return a, b, other


@pytest.fixture(scope="module")
def url(ckpts):
    cfg = ServeConfig(model=str(ckpts[0]), device="cpu", dtype="float32", served_model_name=NAME, max_n=4,
                      engine=EngineConfig(page_size=PAGE, num_pages=PAGES, max_prefill_tokens=256, cuda_graphs=False))
    with ServerThread(build_server(cfg)) as base:
        yield base


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60, max_retries=0)


def generate(url: str, **sampling) -> dict:
    r = httpx.post(f"{url}/generate", json={"text": "2+2=", "sampling_params": sampling}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_openai_completions_match_native_generate(url):
    # Sampling is a pure function of (seed, sample index, position): both doors give the same samples.
    out = client(url).completions.create(model=NAME, prompt="2+2=", max_tokens=6, n=2, seed=11, logprobs=0)
    native = generate(url, max_new_tokens=6, n=2, seed=11)
    assert len(out.choices) == 2 and out.usage.completion_tokens == sum(len(o["token_ids"]) for o in native["outputs"])
    for choice, o in zip(out.choices, native["outputs"]):
        assert choice.logprobs.token_logprobs == pytest.approx(o["logprobs"], abs=0)
        assert choice.text == o["text"] and choice.finish_reason == o["finish_reason"]
        assert all(lp <= 0 for lp in o["logprobs"]) and o["weight_version"] == 0
    assert native["outputs"][0]["token_ids"] != native["outputs"][1]["token_ids"]


def test_chat_streaming_equals_non_streaming(url):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    full = client(url).chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0)
    text = ""
    for chunk in client(url).chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0,
                                                    stream=True):
        text += "".join(c.delta.content or "" for c in chunk.choices)
    assert text == full.choices[0].message.content and full.usage.completion_tokens >= 1
    assert full.usage.prompt_tokens > 5  # the chat template was applied


def test_limits_are_400(url):
    too_long = {"model": NAME, "prompt": [65] * 800, "max_tokens": 1}  # over the KV capacity (752)
    r = httpx.post(f"{url}/v1/completions", json=too_long, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 1000}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert "KV cache" in r.json()["error"]["message"] or "context" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/generate", json={"input_ids": [1], "sampling_params": {"n": 5}}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_concurrent_requests_all_answered(url):
    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            reqs = [c.post("/generate", json={"input_ids": [40 + k % 50, 41], "sampling_params":
                                              {"max_new_tokens": 3, "seed": k, "stop_token_ids": [999]}})
                    for k in range(32)]
            return await asyncio.wait_for(asyncio.gather(*reqs), 120)

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 32
    assert all(len(r.json()["outputs"][0]["token_ids"]) == 3 for r in responses)


def test_update_weights_changes_outputs_then_metrics(url, ckpts):
    _, b, other = ckpts
    before = generate(url, max_new_tokens=8, temperature=0)["outputs"][0]
    r = httpx.post(f"{url}/update_weights", json={"path": str(b), "version": 3}, timeout=60)
    assert r.status_code == 200 and r.json() == {"ok": True, "weight_version": 3}
    after = generate(url, max_new_tokens=8, temperature=0)["outputs"][0]
    assert after["weight_version"] == 3 and before["weight_version"] == 0
    assert after["token_ids"] != before["token_ids"] or after["logprobs"] != before["logprobs"]
    # a checkpoint of another architecture is refused by name, and the old weights stay
    r = httpx.post(f"{url}/update_weights", json={"path": str(other), "version": 4}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "path", r.text
    assert httpx.get(f"{url}/health").json() == {"status": "ok", "weight_version": 3}
    assert generate(url, max_new_tokens=8, temperature=0)["outputs"][0]["token_ids"] == after["token_ids"]

    text = httpx.get(f"{url}/metrics").text
    values = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels}
    assert values["miles_weight_version"] == 3 and values["miles_queue_depth"] == 0
    assert values["miles_generated_tokens_total"] >= 8


def test_update_weights_from_a_cut_file_is_400_naming_it(url, ckpts):
    cut = ckpts[0].parent / "cut"  # under the default weights root: the parent of --model
    shutil.copytree(ckpts[1], cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])  # a copy that did not finish
    r = httpx.post(f"{url}/update_weights", json={"path": str(cut), "version": 9}, timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "path", r.text
    assert f"{cut.resolve() / 'model.safetensors'}: not a readable safetensors file" in err["message"]
    assert "export it again" in err["message"]  # the fix
    assert httpx.get(f"{url}/health").json()["weight_version"] != 9


def test_update_weights_never_lists_a_directory(url, ckpts):
    root = ckpts[0].parent  # holds the checkpoints a, b, llama: a directory, but no checkpoint
    r = httpx.post(f"{url}/update_weights", json={"path": str(root), "version": 9}, timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and "no model.safetensors" in err["message"], r.text
    assert "llama" not in err["message"]
    r = httpx.post(f"{url}/update_weights", json={"path": "/etc", "version": 9}, timeout=60)
    assert r.status_code == 403 and "outside this server's weights root" in r.json()["error"]["message"]
    assert "passwd" not in r.text


def test_serve_on_cpu_picks_a_kv_size(ckpts, monkeypatch, caplog):
    from miles_fsdp.engine import config as engine_config

    monkeypatch.setattr(engine_config, "CPU_KV_BYTES", 8 * 2**20)
    caplog.set_level(logging.INFO, logger="miles_fsdp.engine.engine")
    cfg = ServeConfig(model=str(ckpts[0]), device="cpu", dtype="float32", engine=EngineConfig(cuda_graphs=False))
    app = build_server(cfg)  # no --engine.kv-memory-bytes / --engine.num-pages
    assert "KV cache on CPU: 8 MiB" in caplog.text
    assert app.state.server.engine.num_pages >= 2 and app.state.server.limits.kv_capacity_tokens > 0
    with ServerThread(app) as base:
        out = client(base).completions.create(model=ckpts[0].name, prompt="2+2=", max_tokens=3)
        assert out.usage.completion_tokens >= 1


def test_serve_weights_root_and_api_key(ckpts, tmp_path, monkeypatch):
    monkeypatch.delenv("MILES_API_KEY", raising=False)
    cfg = ServeConfig(model=str(ckpts[0]))
    assert cfg.resolved_weights_root() == ckpts[0].resolve().parent and cfg.resolved_api_key() == ""
    assert ServeConfig(model=str(ckpts[0]), weights_root=str(tmp_path)).resolved_weights_root() == tmp_path.resolve()
    monkeypatch.setenv("MILES_API_KEY", "k")
    assert cfg.resolved_api_key() == "k" and ServeConfig(model=str(ckpts[0]), api_key="j").resolved_api_key() == "j"
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match=r"ServeConfig.weights_root=.*not a directory"):
        ServeConfig(model=str(ckpts[0]), weights_root=str(tmp_path / "f"))


def test_serve_config_names_the_bad_field(tmp_path, ckpts):
    with pytest.raises(ValueError, match=r"ServeConfig.model=.*config.json"):
        ServeConfig(model=str(tmp_path))
    with pytest.raises(ValueError, match=r"ServeConfig.port=70000"):
        ServeConfig(model=str(ckpts[0]), port=70000)
    with pytest.raises(ValueError, match=r"ServeConfig.device='tpu'"):
        ServeConfig(model=str(ckpts[0]), device="tpu")


def test_cli_serve_subprocess(ckpts):
    # `miles-fsdp serve` as a user runs it: port 0, read the bound address from uvicorn's log.
    cmd = [sys.executable, "-m", "miles_fsdp.cli", "serve", "--model", str(ckpts[0]), "--port", "0",
           "--device", "cpu", "--dtype", "float32", "--engine.num-pages", "16", "--engine.page-size", "16",
           "--engine.max-prefill-tokens", "64", "--engine.no-cuda-graphs"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline, lines = None, time.monotonic() + 90, []
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            lines.append(line)
            if m := re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line):
                url = m.group(1)
        assert url, "server did not start:\n" + "".join(lines)
        assert httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"] == ckpts[0].name
        r = httpx.post(f"{url}/v1/completions", json={"model": ckpts[0].name, "prompt": "hi", "max_tokens": 2},
                       timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=15)


@pytest.mark.parametrize("mode", ["invariant", "fast"])
def test_a_server_runs_its_kernel_mode_on_its_engine_thread(ckpts, monkeypatch, mode):
    """serve --kernel-mode fast: the engine thread (not the thread that built the server)
    runs the vendor kernels; invariant: none of them."""
    import threading

    from miles_kernels import _ref

    calls = []
    ref_linear = _ref.linear
    monkeypatch.setattr(_ref, "linear", lambda *a: (calls.append(threading.current_thread().name), ref_linear(*a))[1])
    cfg = ServeConfig(model=str(ckpts[0]), device="cpu", dtype="float32", kernel_mode=mode,
                      engine=EngineConfig(page_size=PAGE, num_pages=PAGES, cuda_graphs=False))
    with ServerThread(build_server(cfg)) as base:
        generate(base, max_new_tokens=3, temperature=1.0, seed=1)
    assert (set(calls) == {"engine-loop"}) if mode == "fast" else not calls


def test_speculative_server_gives_the_same_outputs_and_reports_acceptance(ckpts, tmp_path):
    from miles_fsdp.models import load_model, save_hf

    draft_dir = tmp_path / "with_draft"
    save_hf(load_model(ckpts[0], n_mtp=1), draft_dir)  # the checkpoint with a (fresh) MTP draft
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (ckpts[0] / name).exists():
            shutil.copy(ckpts[0] / name, draft_dir / name)
    outs = {}
    for k in (0, 3):
        cfg = ServeConfig(model=str(draft_dir), device="cpu", dtype="float32", max_n=4,
                          engine=EngineConfig(page_size=PAGE, num_pages=PAGES, cuda_graphs=False,
                                              num_speculative_tokens=k))
        with ServerThread(build_server(cfg)) as base:
            outs[k] = generate(base, max_new_tokens=24, temperature=1.0, seed=3, n=2)["outputs"]
            text = httpx.get(f"{base}/metrics", timeout=10).text
        values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
        if k:
            assert values["miles_spec_verify_steps"] > 0 and values["miles_spec_draft_tokens"] > 0
    assert [(o["token_ids"], o["logprobs"]) for o in outs[0]] == [(o["token_ids"], o["logprobs"]) for o in outs[3]]
