"""The engine side of the HTTP server: one thread owns the engine, handlers talk to it by queue.

    handlers (event loop) --submit/abort/call--> queue.Queue --> EngineLoop thread
         ^                                                        | engine.add_request
         |                                                        | engine.step()  (only here)
         +---- asyncio.Queue per request <-- call_soon_threadsafe-+

Weight updates run on the EngineLoop thread between two steps, so no step sees half-updated weights.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from miles_fsdp.engine.sequence import Request

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
        # speculative decoding, totals since start: acceptance = accepted / draft tokens,
        # tokens per verify step = 1 + accepted / verify steps
        self.spec = [Gauge(f"miles_spec_{name}", doc, registry=r) for name, doc in (
            ("verify_steps", "Speculative verify steps"), ("draft_tokens", "Draft tokens proposed"),
            ("accepted_tokens", "Draft tokens accepted"))]


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
