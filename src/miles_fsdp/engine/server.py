"""HTTP server around one Engine: OpenAI-compatible completions/chat, native /generate,
/update_weights, /health and Prometheus /metrics.

    request --> ApiKeyMiddleware (server_auth.py) --> route
      generation routes (server_generate.py): parse + tokenize on the tokenizer thread,
          submit to the EngineLoop, stream or collect; a client that hangs up is aborted
      /update_weights (server_weights.py): load under the weights root, swap between steps
      /health, /v1/models, /metrics (here)
    EngineLoop (server_loop.py): the only thread that touches the engine

Route handlers are plain functions; what they share is the ServerState in app.state.server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from miles_fsdp.engine import server_generate as gen
from miles_fsdp.engine.protocol import ApiError, error_body
from miles_fsdp.engine.server_auth import ApiKeyMiddleware
from miles_fsdp.engine.server_loop import EngineLoop, ServerMetrics
from miles_fsdp.engine.server_weights import update_weights

log = logging.getLogger(__name__)


@dataclass
class ServerLimits:
    """What the server checks before a request reaches the engine."""

    model_name: str
    max_model_len: int
    vocab_size: int
    max_n: int = 64
    kv_capacity_tokens: int = 0  # one sample's prompt + completion must fit; 0: not checked
    default_max_tokens: int = 0  # requests without max_tokens: at most this many; 0: all that fits

    def __post_init__(self):
        if self.max_model_len < 1:
            raise ValueError(f"ServerLimits.max_model_len={self.max_model_len}: expected >= 1")


@dataclass
class ServerState:
    """What the route handlers share (app.state.server)."""

    engine: Any
    engine_loop: EngineLoop
    tokenizer: Any
    limits: ServerLimits
    metrics: ServerMetrics
    load_weights: Callable[[str], Any]
    weights_root: Path | None  # /update_weights loads only under it; None: nowhere
    # One thread runs every encode: HF fast tokenizers may raise "Already borrowed" when two
    # threads encode at once (transformers sets truncation/padding on the shared backend).
    tokenizer_thread: ThreadPoolExecutor
    weight_version: int = 0

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    async def prepare(self, fn: Callable, *args):
        """`fn(*args)` on the tokenizer thread, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_thread, fn, *args)


def build_app(engine, tokenizer, limits: ServerLimits, load_weights: Callable[[str], Any],
              weights_root: str | Path | None = None, api_key: str = "") -> FastAPI:
    """The FastAPI app serving `engine`. `load_weights(dir)` returns what `engine.update_weights`
    takes (a state dict or module) for POST /update_weights, which loads only from directories
    under `weights_root` (None: refuses every path). A non-empty `api_key` is required as
    `Authorization: Bearer <key>` on every endpoint but /health."""
    metrics = ServerMetrics()
    s = ServerState(engine, EngineLoop(engine, metrics), tokenizer, limits, metrics, load_weights,
                    Path(weights_root) if weights_root is not None else None,
                    ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer"),
                    weight_version=int(getattr(engine, "weight_version", 0)))
    metrics.weight_version.set(s.weight_version)
    metrics.cuda_graphs_active.set_function(lambda: float(getattr(engine, "cuda_graphs_active", None) is True))
    spec = getattr(getattr(engine, "scheduler", None), "spec", None)
    for i, gauge in enumerate(metrics.spec):
        gauge.set_function(lambda i=i: float(spec.totals[i]) if spec is not None else 0.0)

    @asynccontextmanager
    async def lifespan(app):
        s.engine_loop.start()
        try:
            yield
        finally:
            s.engine_loop.stop()
            s.tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="miles-fsdp", lifespan=lifespan)
    app.state.server, app.state.engine_loop, app.state.metrics = s, s.engine_loop, metrics
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    install_error_handling(app, metrics)  # after: its counting middleware is outermost and counts the 401s
    app.add_api_route("/v1/completions", gen.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", gen.chat_completions, methods=["POST"])
    app.add_api_route("/generate", gen.generate, methods=["POST"])
    app.add_api_route("/update_weights", update_weights, methods=["POST"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/metrics", metrics_text, methods=["GET"])
    return app


async def health(http: HTTPRequest):
    s: ServerState = http.app.state.server
    if not s.engine_loop.alive():
        return JSONResponse(error_body("engine loop is not running", "server_error"), status_code=503)
    return {"status": "ok", "weight_version": s.weight_version}


async def models(http: HTTPRequest):
    limits = http.app.state.server.limits
    card = {"id": limits.model_name, "object": "model", "created": 0, "owned_by": "miles-fsdp",
            "max_model_len": limits.max_model_len}
    return {"object": "list", "data": [card]}


async def metrics_text(http: HTTPRequest) -> Response:
    return Response(generate_latest(http.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


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
