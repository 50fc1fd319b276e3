"""HTTP server around one Engine: OpenAI-compatible completions/chat, native /generate,
/update_weights, /health and Prometheus /metrics.

    handlers (event loop) --submit/abort/call--> queue.Queue --> EngineLoop thread
         ^                                                        | engine.add_request
         |                                                        | engine.step()  (only here)
         +---- asyncio.Queue per request <-- call_soon_threadsafe-+

The engine is touched by the EngineLoop thread only; weight updates run on that thread
between two steps, so no step sees half-updated weights.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import queue
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from miles_fsdp.engine.protocol import (
    ApiError, ChatRequest, CompletionRequest, GenerateRequest, IncrementalText, UpdateWeightsRequest, chat_choice,
    completion_choice, cut_at_stop, envelope, error_body, finish_reason, parse, usage,
)
from miles_fsdp.engine.sequence import Request, SamplingParams

log = logging.getLogger(__name__)


class ServerMetrics:
    """Prometheus metrics in a registry of their own (several servers may share a process)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("miles_http_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("miles_request_latency_seconds", "Generation latency, submit to last token",
                                 ["endpoint"], registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.ttft = Histogram("miles_time_to_first_token_seconds", "Submit to first generated token",
                              registry=r, buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.prompt_tokens = Counter("miles_prompt_tokens", "Prompt tokens submitted", registry=r)
        self.generated_tokens = Counter("miles_generated_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("miles_queue_depth", "Requests submitted and not finished", registry=r)
        self.weight_version = Gauge("miles_weight_version", "Weight version served", registry=r)
        self.engine_errors = Counter("miles_engine_errors", "Exceptions raised by engine.step()", registry=r)
        self.cuda_graphs_active = Gauge("miles_cuda_graphs_active",
                                        "1 if decode replays CUDA graphs, 0 if it runs eagerly", registry=r)


@dataclass
class Pending:
    """One submitted request; its events arrive on `events` in the handler's event loop.

    Events: ("tokens", index, token_ids, logprobs), ("done", index, Result), ("error", message[, status]),
    ("reset", index): the sample restarted from its prompt after a weight update.
    """

    request: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    submitted: float
    open_samples: int = 1
    first_token: float | None = None

    def put(self, event: tuple) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class EngineLoop:
    """The only thread that calls the engine: adds, aborts, runs callables, steps."""

    def __init__(self, engine, metrics: ServerMetrics, idle_wait_s: float = 0.05):
        self.engine, self.metrics, self.idle_wait_s = engine, metrics, idle_wait_s
        self._inbox: queue.Queue = queue.Queue()
        self._live: dict[Any, Pending] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    # -- called from the event loop --------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout_s)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, request) -> Pending:
        p = Pending(request, asyncio.get_running_loop(), asyncio.Queue(), time.perf_counter(),
                    open_samples=request.params.n)
        self.metrics.queue_depth.inc()
        self.metrics.prompt_tokens.inc(len(request.prompt_ids))
        self._inbox.put(("add", p))
        return p

    def abort(self, p: Pending) -> None:
        self._inbox.put(("abort", p))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the engine thread between two steps and return its result."""
        fut = asyncio.get_running_loop().create_future()
        self._inbox.put(("call", (fn, fut)))
        return await fut

    # -- engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as e:  # keep serving: fail what was running, drop it, go on
                log.exception("engine loop: step failed")
                self.metrics.engine_errors.inc()
                self._fail_all(f"engine error: {type(e).__name__}: {e}")
                time.sleep(self.idle_wait_s)  # a persistently broken engine must not spin the CPU

    def _tick(self) -> None:
        try:
            # block briefly only when there is nothing to step
            wait = None if self.engine.has_unfinished() else self.idle_wait_s
            item = self._inbox.get(timeout=wait) if wait else self._inbox.get_nowait()
            while True:
                self._handle(item)
                item = self._inbox.get_nowait()
        except queue.Empty:  # the inbox is drained: go on to the engine step
            pass
        if self.engine.has_unfinished():
            self._dispatch(self.engine.step())

    def _handle(self, item: tuple) -> None:
        try:
            self._handle_one(*item)
        except Exception:
            log.exception("engine loop: %s failed", item[0])

    def _handle_one(self, kind: str, arg) -> None:
        if kind == "add":
            try:
                self.engine.add_request(arg.request)
            except ValueError as e:  # the engine's own request checks: the client's to fix
                self._finish(arg, ("error", f"engine rejected the request: {e}", 400))
                return
            except Exception as e:
                log.exception("engine.add_request failed")
                self._finish(arg, ("error", f"engine rejected the request: {type(e).__name__}: {e}", 500))
                return
            self._live[arg.request.request_id] = arg
        elif kind == "abort":
            if self._live.get(arg.request.request_id) is arg:
                self.engine.abort(arg.request.request_id)
                self._finish(arg, ("error", "aborted"))
        elif kind == "call":
            fn, fut = arg
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting handler
                fut.get_loop().call_soon_threadsafe(_set_exception, fut, e)
            else:
                fut.get_loop().call_soon_threadsafe(_set_result, fut, result)

    def _dispatch(self, outputs) -> None:
        for out in outputs:
            p = self._live.get(out.request_id)
            if p is None:  # aborted by us; the engine may still report it once
                continue
            if out.reset:
                p.put(("reset", out.sample_index))
            if out.new_token_ids:
                if p.first_token is None:
                    p.first_token = time.perf_counter()
                    self.metrics.ttft.observe(p.first_token - p.submitted)
                self.metrics.generated_tokens.inc(len(out.new_token_ids))
                p.put(("tokens", out.sample_index, list(out.new_token_ids), list(out.new_logprobs)))
            if out.finished:
                p.put(("done", out.sample_index, out.result))
                p.open_samples -= 1
                if p.open_samples == 0:
                    self._finish(p, None)

    def _finish(self, p: Pending, event: tuple | None) -> None:
        self._live.pop(p.request.request_id, None)
        self.metrics.queue_depth.dec()
        if event is not None:
            p.put(event)

    def _fail_all(self, message: str) -> None:
        for p in list(self._live.values()):
            try:
                self.engine.abort(p.request.request_id)
            except Exception:
                log.exception("engine.abort(%r) failed after a step error", p.request.request_id)
            self._finish(p, ("error", message))


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


_KNOWN = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/generate", "/update_weights",
          "/health", "/metrics"}


def install_error_handling(app: FastAPI, metrics: ServerMetrics) -> None:
    """4xx/5xx in the OpenAI error shape, counted per endpoint and status; the server goes on."""

    @app.exception_handler(ApiError)
    async def _request_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.middleware("http")
    async def _count(request: HTTPRequest, call_next):
        try:
            response = await call_next(request)
        except Exception as e:
            log.exception("unhandled error on %s", request.url.path)
            response = JSONResponse(error_body(f"internal server error: {type(e).__name__}: {e}", "server_error"),
                                    status_code=500)
        endpoint = request.url.path if request.url.path in _KNOWN else "other"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    @app.get("/metrics")
    async def _metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@dataclass
class ServerLimits:
    """What the server checks before a request reaches the engine."""

    model_name: str
    max_model_len: int
    vocab_size: int
    max_n: int = 64
    kv_capacity_tokens: int = 0  # one sample's prompt + completion must fit; 0: not checked
    default_max_tokens: int = 256  # chat requests without max_tokens


def build_app(engine, tokenizer, limits: ServerLimits, load_weights: Callable[[str], Any]) -> FastAPI:
    """The FastAPI app serving `engine`. `load_weights(dir)` returns what
    `engine.update_weights` takes (a state dict or module) for POST /update_weights."""
    metrics = ServerMetrics()
    engine_loop = EngineLoop(engine, metrics)
    served = {"version": int(getattr(engine, "weight_version", 0))}
    metrics.weight_version.set(served["version"])
    metrics.cuda_graphs_active.set_function(lambda: float(getattr(engine, "cuda_graphs_active", None) is True))

    @asynccontextmanager
    async def lifespan(app):
        engine_loop.start()
        try:
            yield
        finally:
            engine_loop.stop()

    app = FastAPI(title="miles-fsdp", lifespan=lifespan)
    app.state.engine_loop, app.state.metrics = engine_loop, metrics
    install_error_handling(app, metrics)
    decode = partial(tokenizer.decode, skip_special_tokens=True)

    def check_model(name: str | None) -> None:
        if name is not None and name != limits.model_name:
            raise ApiError(f"model {name!r} is not served here; use {limits.model_name!r} (see GET /v1/models)",
                           "model", 404, "not_found_error")

    def make_request(ids: list[int], field: str, max_new: int, max_field: str, sp) -> Request:
        if not ids:
            raise ApiError(f"{field} is empty; give at least one token", field)
        bad = next((t for t in ids if not 0 <= t < limits.vocab_size), None)
        if bad is not None:
            raise ApiError(f"{field}: token id {bad} is outside the vocabulary [0, {limits.vocab_size})", field)
        if sp.n > limits.max_n:
            raise ApiError(f"n={sp.n} is larger than this server's limit of {limits.max_n}; lower n", "n")
        for cap, what in ((limits.max_model_len, "the model's maximum context"),
                          (limits.kv_capacity_tokens, "the KV cache capacity")):
            if cap and len(ids) + max_new > cap:
                param = field if len(ids) >= cap else max_field
                raise ApiError(f"{field} has {len(ids)} tokens and {max_field} is {max_new}: {len(ids) + max_new} "
                               f"exceeds {what} of {cap} tokens; shorten the prompt or lower {max_field}", param)
        try:
            params = SamplingParams(n=sp.n, temperature=sp.temperature, top_p=sp.top_p, top_k=max(sp.top_k, 0),
                                    max_new_tokens=max_new, stop_token_ids=tuple(sp.stop_token_ids or ()),
                                    stop_strings=tuple(sp.stop_strings()), seed=sp.seed)
        except ValueError as e:
            raise ApiError(str(e)) from None
        return Request(ids, params, request_id=new_id("req"))

    async def collect(p: Pending, endpoint: str) -> list:
        n, results = p.request.params.n, [None] * p.request.params.n
        done = 0
        try:
            while done < n:
                event = await p.events.get()
                if event[0] == "done":
                    results[event[1]] = event[2]
                    done += 1
                elif event[0] == "error":
                    status = event[2] if len(event) > 2 else 500
                    raise ApiError(event[1], status=status,
                                   type="invalid_request_error" if status < 500 else "server_error")
        finally:
            if done < n:  # cancelled (client gone) or failed: free the engine's slots
                engine_loop.abort(p)
            metrics.latency.labels(endpoint).observe(time.perf_counter() - p.submitted)
        return results

    async def stream(p: Pending, endpoint: str, chunk, logprobs: bool, head=(), tail=None):
        """SSE: chunk(index, text, finish, tokens, logprobs) -> dict; tail(completion_tokens) -> dict."""
        stops = list(p.request.params.stop_strings)
        n = p.request.params.n
        texts = [IncrementalText(decode, stops) for _ in range(n)]
        done = generated = 0
        try:
            for c in head:
                yield _sse(c)
            while done < n:
                event = await p.events.get()
                if event[0] == "tokens":
                    _, i, ids, lps = event
                    generated += len(ids)
                    text = texts[i].push(ids)
                    if text or logprobs:
                        yield _sse(chunk(i, text, None, [decode([t]) for t in ids] if logprobs else None, lps))
                elif event[0] == "done":
                    _, i, result = event
                    done += 1
                    yield _sse(chunk(i, texts[i].finish(), finish_reason(result.finish_reason), None, None))
                else:
                    msg = event[1] if event[0] == "error" else "sample restarted by a weight update; retry"
                    yield _sse(error_body(msg, "server_error"))
                    break
            if done == n and tail is not None:
                yield _sse(tail(generated))
            yield "data: [DONE]\n\n"
        finally:
            if done < n:
                engine_loop.abort(p)
            metrics.latency.labels(endpoint).observe(time.perf_counter() - p.submitted)

    async def openai_reply(p: Pending, body, prompt_len: int, chat: bool, logprobs: bool):
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        rid, kind = new_id("chatcmpl" if chat else "cmpl"), "chat.completion" if chat else "text_completion"

        def choice(i, text, finish, tokens, lps, delta=False):
            if chat:
                return chat_choice(i, text, finish, tokens, lps, delta)
            return completion_choice(i, text, finish, tokens, lps)

        if body.stream:
            kind += ".chunk" if chat else ""
            chunk = lambda *a: envelope(kind, rid, limits.model_name, [choice(*a, delta=True)])  # noqa: E731
            head = [chunk(i, None, None, None, None) for i in range(body.n)] if chat else ()  # role first
            tail = None
            if (body.stream_options or {}).get("include_usage"):
                tail = lambda k: envelope(kind, rid, limits.model_name, [], usage(prompt_len, k))  # noqa: E731
            return _sse_response(stream(p, endpoint, chunk, logprobs, head, tail))
        results, stops = await collect(p, endpoint), body.stop_strings()
        choices = [choice(r.sample_index, cut_at_stop(decode(r.token_ids), stops)[0], finish_reason(r.finish_reason),
                          [decode([t]) for t in r.token_ids] if logprobs else None, r.logprobs.tolist())
                   for r in results]
        return envelope(kind, rid, limits.model_name, choices,
                        usage(prompt_len, sum(len(r.token_ids) for r in results)))

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = parse(CompletionRequest, await http.body())
        check_model(body.model)
        ids = tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else body.prompt
        p = engine_loop.submit(make_request(ids, "prompt", body.max_tokens, "max_tokens", body))
        return await openai_reply(p, body, len(ids), chat=False, logprobs=body.logprobs is not None)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        body = parse(ChatRequest, await http.body())
        check_model(body.model)
        ids = apply_chat_template(tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages])
        max_field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        p = engine_loop.submit(make_request(ids, "messages", body.max_new_tokens(limits.default_max_tokens),
                                            max_field, body))
        return await openai_reply(p, body, len(ids), chat=True, logprobs=body.logprobs)

    @app.post("/generate")
    async def generate(http: HTTPRequest):
        body = parse(GenerateRequest, await http.body())
        sp = body.sampling_params
        field = "input_ids" if body.input_ids is not None else "text"
        ids = body.input_ids if body.input_ids is not None else tokenizer.encode(body.text)
        p = engine_loop.submit(make_request(ids, field, sp.max_new_tokens, "sampling_params.max_new_tokens", sp))
        results = await collect(p, "/generate")
        return {"id": p.request.request_id, "prompt_ids": ids, "outputs": [
            {"index": r.sample_index, "token_ids": r.token_ids, "logprobs": r.logprobs.tolist(),
             "text": cut_at_stop(decode(r.token_ids), sp.stop_strings())[0],
             "finish_reason": finish_reason(r.finish_reason), "weight_version": r.weight_version,
             "seed": r.seed, "num_cached_prompt_tokens": r.num_cached_prompt_tokens,
             "timings": dataclasses.asdict(r.timings)} for r in results]}

    @app.post("/update_weights")
    async def update_weights(http: HTTPRequest):
        body = parse(UpdateWeightsRequest, await http.body())
        if not Path(body.path).is_dir():
            raise ApiError(f"path: {body.path!r} is not a directory; give an HF checkpoint directory "
                           "holding *.safetensors", "path")
        try:
            weights = await asyncio.to_thread(load_weights, body.path)
        except (ValueError, OSError) as e:  # CheckpointError is a ValueError
            raise ApiError(f"path: cannot load weights from {body.path}: {e}", "path") from None
        try:
            await engine_loop.call(lambda: engine.update_weights(weights, body.version))
        except ValueError as e:  # names or shapes that do not fit the served model
            raise ApiError(f"path: {body.path} does not fit the served model: {e}", "path") from None
        served["version"] = body.version
        metrics.weight_version.set(body.version)
        return {"ok": True, "weight_version": body.version}

    @app.get("/health")
    async def health():
        if not engine_loop.alive():
            return JSONResponse(error_body("engine loop is not running", "server_error"), status_code=503)
        return {"status": "ok", "weight_version": served["version"]}

    @app.get("/v1/models")
    async def models():
        card = {"id": limits.model_name, "object": "model", "created": 0, "owned_by": "miles-fsdp",
                "max_model_len": limits.max_model_len}
        return {"object": "list", "data": [card]}

    return app


def apply_chat_template(tokenizer, messages: list[dict]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError("this model's tokenizer has no chat template; use /v1/completions", "messages")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja raises for roles or orders a template refuses
        raise ApiError(f"messages: the chat template rejected them: {e}", "messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _sse_response(gen) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class ServerThread:
    """Serve an app with uvicorn on a background thread: `with ServerThread(app) as url: ...`.

    port=0 takes a free ephemeral port; `url` is e.g. "http://127.0.0.1:41234".
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 30.0):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.host, self.start_timeout_s = host, start_timeout_s
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start within {self.start_timeout_s}s (see its log above)")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://{self.host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
