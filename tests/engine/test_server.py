"""HTTP server against a deterministic fake engine (the real engine's API, no model).

The fake writes lowercase letters: sample i of a request continues its last token t with
97 + (t + 1 + i + shift) % 26, so outputs are predictable, differ per sample and change
when update_weights changes `shift`. A prompt starting with "BOOM" makes step() raise.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from server_thread import ServerThread
from transformers import AutoTokenizer

from miles_fsdp.engine.protocol import IncrementalText
from miles_fsdp.engine.sequence import FinishReason, Result, StepOutput, Timings
from miles_fsdp.engine.server import ServerLimits, build_app
from miles_fsdp.models.testing import write_tiny_tokenizer

EOS = 258  # <|im_end|>
MODEL = "tiny-fake"


class FakeEngine:
    def __init__(self, step_sleep_s: float = 0.0):
        self.live: dict[tuple[str, int], dict] = {}
        self.weight_version, self.shift, self.step_sleep_s = 0, 0, step_sleep_s
        self.aborted: list[str] = []

    def add_request(self, req):
        for i in range(req.params.n):
            self.live[(req.request_id, i)] = {"req": req, "out": [], "lps": []}

    def has_unfinished(self) -> bool:
        return bool(self.live)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        for key in [k for k in self.live if k[0] == request_id]:
            del self.live[key]

    def update_weights(self, weights, version: int) -> None:
        self.shift, self.weight_version = int(weights["shift"]), version

    def step(self) -> list[StepOutput]:
        time.sleep(self.step_sleep_s)
        if any(bytes(s["req"].prompt_ids[:4]) == b"BOOM" for s in self.live.values() if max(s["req"].prompt_ids) < 256):
            raise RuntimeError("fake kernel fault")
        outs = []
        for (rid, i), s in list(self.live.items()):
            req, p = s["req"], s["req"].params
            last = (s["out"] or req.prompt_ids)[-1]
            tok = 97 + (last + 1 + i + self.shift) % 26
            s["out"].append(tok)
            s["lps"].append(-0.25 * (self.weight_version + 1))
            text = bytes(s["out"]).decode()
            reason = None
            if tok in p.stop_token_ids or any(x in text for x in p.stop_strings):
                reason = FinishReason.STOP
            elif len(s["out"]) >= p.max_new_tokens:
                reason = FinishReason.LENGTH
            result = None
            if reason is not None:
                del self.live[(rid, i)]
                result = Result(rid, i, list(s["out"]), torch.tensor(s["lps"]), reason, Timings(),
                                self.weight_version, seed=p.seed or 0)
            outs.append(StepOutput(rid, i, [tok], [s["lps"][-1]], result))
        return outs


def expected(prompt_ids: list[int], n_tokens: int, index: int = 0, shift: int = 0) -> str:
    out, last = [], prompt_ids[-1]
    for _ in range(n_tokens):
        last = 97 + (last + 1 + index + shift) % 26
        out.append(last)
    return bytes(out).decode()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(str(write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))))


def make_server(tokenizer, engine=None, weights_root=None, api_key="", **limits):
    engine = engine or FakeEngine()
    limits = ServerLimits(**{"model_name": MODEL, "max_model_len": 64, "vocab_size": 320, "max_n": 8, **limits})
    app = build_app(engine, tokenizer, limits, load_weights=lambda path: json.load(open(f"{path}/w.json")),
                    weights_root=weights_root, api_key=api_key)
    return engine, app, ServerThread(app)


@pytest.fixture(scope="module")
def server(tokenizer):
    engine, app, thread = make_server(tokenizer)
    with thread as url:
        yield engine, app, url


def test_openai_completions(server):
    _, _, url = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=20, max_retries=0)
    out = client.completions.create(model=MODEL, prompt="hi", max_tokens=5, n=2, logprobs=0, seed=3)
    prompt = list(b"hi")
    assert [c.text for c in out.choices] == [expected(prompt, 5, 0), expected(prompt, 5, 1)]
    assert [c.finish_reason for c in out.choices] == ["length", "length"]
    assert out.choices[0].logprobs.token_logprobs == [-0.25] * 5
    assert out.choices[0].logprobs.tokens == list(expected(prompt, 5, 0))
    assert out.usage.prompt_tokens == 2 and out.usage.completion_tokens == 10
    assert client.models.list().data[0].id == MODEL

    # token-id prompt, a stop string: the text stops before it, the reason is "stop"
    full = expected([104], 8)
    out = client.completions.create(model=MODEL, prompt=[104], max_tokens=8, stop=[full[3:5]])
    assert out.choices[0].text == full[:3] and out.choices[0].finish_reason == "stop"


def test_openai_streaming_equals_non_streaming(server):
    _, _, url = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=20, max_retries=0)
    msgs = [{"role": "user", "content": "Tell me"}]
    full = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=7, n=2)
    assert full.choices[0].message.role == "assistant"
    assert len(full.choices[0].message.content) == 7 and full.choices[0].finish_reason == "length"
    parts, finish = {0: "", 1: ""}, {}
    usage = None
    for ch in client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=7, n=2, stream=True,
                                             stream_options={"include_usage": True}, logprobs=True):
        usage = ch.usage or usage
        for c in ch.choices:
            parts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert parts == {c.index: c.message.content for c in full.choices}
    assert finish == {0: "length", 1: "length"} and usage.completion_tokens == 14

    stop = expected(list(b"abc"), 6)[2:4]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="abc", max_tokens=6, stop=stop, stream=True) if c.choices)
    assert streamed == expected(list(b"abc"), 6)[:2]


def test_native_generate(server):
    _, _, url = server
    r = httpx.post(f"{url}/generate", json={"input_ids": [100, 101],
                                            "sampling_params": {"max_new_tokens": 3, "n": 2, "stop_token_ids": [0]}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prompt_ids"] == [100, 101] and len(body["outputs"]) == 2
    o = body["outputs"][1]
    assert o["text"] == expected([100, 101], 3, 1) and o["token_ids"] == list(o["text"].encode())
    assert o["logprobs"] == [-0.25] * 3 and o["finish_reason"] == "length" and o["weight_version"] == 0
    r = httpx.post(f"{url}/generate", json={"text": "xy", "sampling_params": {"max_new_tokens": 2}})
    assert r.json()["outputs"][0]["text"] == expected(list(b"xy"), 2)


BAD = [
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", b"", None),
    ("/v1/completions", b"[1, 2]", None),
    ("/v1/completions", {"model": MODEL, "prompt": 5}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "3"}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 9}, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 64}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 70}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 999]}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temprature": 0.5}, "temprature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 5}, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": [""]}, "stop"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, "messages.0.content"),
    ("/generate", {"input_ids": [1], "text": "a"}, "input_ids"),
    ("/generate", {"input_ids": [1], "sampling_params": {"max_tokens": 3}}, "sampling_params.max_tokens"),
    ("/update_weights", {"path": "/nonexistent/dir", "version": 1}, "path"),
    ("/update_weights", {"path": "/tmp"}, "version"),
]


@pytest.mark.parametrize("path,body,param", BAD)
def test_bad_requests_get_4xx_naming_the_field(server, path, body, param):
    _, _, url = server
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{url}{path}", headers={"content-type": "application/json"}, timeout=10, **kw)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"
    if param:
        assert param.split(".")[-1] in err["message"]


def test_unknown_model_and_route(server):
    _, _, url = server
    r = httpx.post(f"{url}/v1/completions", json={"model": "other", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert httpx.get(f"{url}/nope").json()["error"]["type"] == "not_found_error"


def test_engine_failure_is_500_and_server_goes_on(server):
    _, _, url = server
    r = httpx.post(f"{url}/generate", json={"text": "BOOM", "sampling_params": {"max_new_tokens": 2}}, timeout=10)
    assert r.status_code == 500 and "fake kernel fault" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    r = httpx.post(f"{url}/generate", json={"text": "ok", "sampling_params": {"max_new_tokens": 2}}, timeout=10)
    assert r.status_code == 200


def test_concurrent_load_all_answered(server):
    _, app, url = server
    n_req = 300

    async def one(client, k):
        if k % 2:
            body = {"input_ids": [97 + k % 26], "sampling_params": {"max_new_tokens": 4}}
            r = await client.post("/generate", json=body)
            return r.status_code, r.json()["outputs"][0]["text"], expected([97 + k % 26], 4)
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": [97 + k % 26], "max_tokens": 3})
        return r.status_code, r.json()["choices"][0]["text"], expected([97 + k % 26], 3)

    async def main():
        limits = httpx.Limits(max_connections=n_req)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, k) for k in range(n_req))), 60)

    results = asyncio.run(main())
    assert all(status == 200 and got == want for status, got, want in results)
    assert app.state.metrics.queue_depth._value.get() == 0


def test_update_weights_changes_outputs_and_version(tokenizer, tmp_path):
    (tmp_path / "w.json").write_text(json.dumps({"shift": 5}))
    engine, _, thread = make_server(tokenizer, weights_root=tmp_path)
    with thread as url:
        req = {"input_ids": [100], "sampling_params": {"max_new_tokens": 4}}
        before = httpx.post(f"{url}/generate", json=req).json()["outputs"][0]
        r = httpx.post(f"{url}/update_weights", json={"path": str(tmp_path), "version": 7})
        assert r.status_code == 200 and r.json()["weight_version"] == 7
        after = httpx.post(f"{url}/generate", json=req).json()["outputs"][0]
        assert before["text"] == expected([100], 4) and before["weight_version"] == 0
        assert after["text"] == expected([100], 4, shift=5) != before["text"]
        assert after["weight_version"] == 7 and after["logprobs"] == [-2.0] * 4
        assert httpx.get(f"{url}/health").json()["weight_version"] == 7
        (tmp_path / "w.json").write_text("{broken")  # load_weights raises ValueError -> 400 on path
        r = httpx.post(f"{url}/update_weights", json={"path": str(tmp_path), "version": 8})
        assert r.status_code == 400 and r.json()["error"]["param"] == "path"


def test_stream_disconnect_aborts_the_request(tokenizer):
    engine, app, thread = make_server(tokenizer, FakeEngine(step_sleep_s=0.01), max_model_len=1000)
    with thread as url:
        body = {"model": MODEL, "prompt": "long", "max_tokens": 500, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=10) as r:
            assert r.status_code == 200
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["text"]
        deadline = time.monotonic() + 10
        while engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not engine.has_unfinished() and len(engine.aborted) == 1
        assert app.state.metrics.queue_depth._value.get() == 0


DISCONNECTING = [
    ("/v1/completions", {"model": MODEL, "prompt": "long", "max_tokens": 5000}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "long"}], "max_tokens": 5000}),
    ("/generate", {"text": "long", "sampling_params": {"max_new_tokens": 5000}}),
]


@pytest.mark.parametrize("path,body", DISCONNECTING, ids=["completions", "chat", "generate"])
def test_non_streaming_disconnect_aborts_the_request(tokenizer, path, body):
    # 5000 tokens at 10 ms a step: unaborted, the engine would run for ~50 s for no one
    engine, app, thread = make_server(tokenizer, FakeEngine(step_sleep_s=0.01), max_model_len=10000)
    with thread as url:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(f"{url}{path}", json=body, timeout=0.5)
        deadline = time.monotonic() + 10
        while (engine.has_unfinished() or app.state.metrics.queue_depth._value.get()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not engine.has_unfinished() and len(engine.aborted) == 1
        assert app.state.metrics.queue_depth._value.get() == 0
        assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"


class SlowTokenizer:
    """The test tokenizer with an encode that takes `delay_s`, as a 10 MB prompt does."""

    def __init__(self, tokenizer, delay_s: float):
        self.tokenizer, self.delay_s = tokenizer, delay_s

    def encode(self, *args, **kwargs):
        time.sleep(self.delay_s)
        return self.tokenizer.encode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_tokenizing_a_long_prompt_leaves_health_answering(tokenizer):
    _, _, thread = make_server(SlowTokenizer(tokenizer, delay_s=2.5))
    with thread as url, ThreadPoolExecutor(1) as pool:
        slow = pool.submit(httpx.post, f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3},
                           timeout=30)
        time.sleep(0.3)  # its prompt is being tokenized now
        start = time.perf_counter()
        health = httpx.get(f"{url}/health", timeout=30)
        health_s = time.perf_counter() - start
        assert health.status_code == 200 and health_s < 1.0, f"/health took {health_s:.2f}s"
        assert slow.result().status_code == 200
        assert slow.result().json()["choices"][0]["text"] == expected(list(b"hi"), 3)


def test_no_max_tokens_fills_the_context(tokenizer):
    _, _, thread = make_server(tokenizer)  # max_model_len 64
    with thread as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=20, max_retries=0)
        out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert out.choices[0].finish_reason == "length"
        assert out.usage.prompt_tokens + out.usage.completion_tokens == 64
        out = client.completions.create(model=MODEL, prompt="hi")
        assert out.choices[0].text == expected(list(b"hi"), 62) and out.choices[0].finish_reason == "length"
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": [97] * 64})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "prompt" and "no room for a completion" in err["message"]
    _, _, thread = make_server(tokenizer, kv_capacity_tokens=40, default_max_tokens=30)
    with thread as url:
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi"})  # 38 fit, 30 at most
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 30
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": [97] * 20})  # the KV cache: 20
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 20


def test_metrics_parse_and_count(server):
    _, _, url = server
    httpx.post(f"{url}/generate", json={"input_ids": [100], "sampling_params": {"max_new_tokens": 3}})
    httpx.post(f"{url}/generate", content=b"{")
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(r.text) for s in fam.samples}
    assert samples[("miles_http_requests_total", (("endpoint", "/generate"), ("status", "200")))] >= 1
    assert samples[("miles_http_requests_total", (("endpoint", "/generate"), ("status", "400")))] >= 1
    assert samples[("miles_generated_tokens_total", ())] >= 3
    assert samples[("miles_queue_depth", ())] == 0
    assert samples[("miles_request_latency_seconds_count", (("endpoint", "/generate"),))] >= 1


def test_incremental_text_holds_back_split_chars_and_stop_prefixes(tokenizer):
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    t = IncrementalText(decode, [])
    assert [t.push([195]), t.push([169]), t.push(list(b"t")), t.finish()] == ["", "\u00e9", "t", ""]  # é = C3 A9
    t = IncrementalText(decode, ["END"])
    pieces = [t.push(list(b"abE")), t.push(list(b"N")), t.push(list(b"Dzz")), t.finish()]
    assert pieces == ["a", "b", "", ""] and t.stopped
    t = IncrementalText(decode, ["END"])
    assert "".join([t.push(list(b"xEN")), t.push(list(b"y")), t.finish()]) == "xENy"
