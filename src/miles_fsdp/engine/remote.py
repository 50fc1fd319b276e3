"""Rollout on standalone engine servers (`miles-fsdp serve`) over HTTP: disaggregated rollout.

The rollout interface (engine/source.py) as HTTP calls:
    generate(requests)                 POST /generate, one HTTP request per prompt (its n samples
                                        share the prompt's KV on one server); prompts spread
                                        round-robin over the servers, sent concurrently
    agenerate(prompt_ids, params)      the same for one sample, for multi-turn generate hooks
    update_weights(weights, version)   the weights as an HF checkpoint in weights_dir/v<version>
                                        (a directory every server can read: a shared filesystem),
                                        then POST /update_weights {path, version} to every server
The trainer writes param.to(dtype) and the server loads it as is, so a server that runs the
same kernels in the same dtype records the log-probs the trainer recomputes (the loop still
asserts diff 0 in invariant mode). Plain http.client in threads: no extra dependency; a stop
cuts the calls in flight and the servers abort them.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import shutil
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import torch
import torch.distributed as dist

from miles_fsdp.engine.sequence import FinishReason, Request, Result, SamplingParams, Timings
from miles_fsdp.engine.source import WeightSource
from miles_fsdp.errors import UserError


logger = logging.getLogger(__name__)


class RemoteEngineError(UserError, RuntimeError):
    """A rollout server could not be reached or refused a request."""


class RemoteEngineCancelled(RemoteEngineError):
    """A call cut short by cancel_inflight (a stop was requested)."""


class RemoteEngine:
    def __init__(self, urls: tuple[str, ...] | list[str], weights_dir: str | Path = "", timeout_s: float = 3600.0,
                 start: int = 0, max_inflight_per_server: int = 64, wait_s: float = 60.0):
        """weights_dir: where update_weights writes each version for the servers to load (every
        server must read it under the same path). wait_s: how long to wait for servers that
        are still starting (polling /health)."""
        if not urls:
            raise ValueError("RemoteEngine: give at least one server URL (RolloutConfig.servers)")
        self.urls = [u.rstrip("/") for u in urls]
        self.weights_dir = Path(weights_dir) if weights_dir else None
        self.timeout_s = timeout_s
        self._next = start  # round-robin cursor; ranks start at their rank to spread load
        self._lock = threading.Lock()
        self._inflight: set[http.client.HTTPConnection] = set()
        self._cancelled = False
        self._pool = ThreadPoolExecutor(max_workers=max_inflight_per_server * len(self.urls),
                                        thread_name_prefix="rollout-http")
        self.versions = [self._wait_healthy(u, wait_s)["weight_version"] for u in self.urls]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def metrics(self) -> dict[str, float]:
        """None here: each server reports its engine in its own /metrics (miles_*)."""
        return {}

    def release(self) -> None:
        """Nothing to release here: the servers keep their own memory."""

    def resume(self) -> None:
        """See release()."""

    def __enter__(self) -> RemoteEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- HTTP ---------------------------------------------------------------------------

    def _call(self, url: str, path: str, body: dict | None = None, timeout_s: float | None = None) -> dict:
        u = urllib.parse.urlsplit(url)
        conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(u.hostname, u.port, timeout=timeout_s or self.timeout_s)
        headers = {"Content-Type": "application/json"}
        if key := os.environ.get("MILES_API_KEY"):  # the servers' key (`miles-fsdp serve` reads the same variable)
            headers["Authorization"] = f"Bearer {key}"
        with self._lock:
            self._inflight.add(conn)
        try:
            conn.request("GET" if body is None else "POST", u.path.rstrip("/") + path,
                         None if body is None else json.dumps(body).encode(), headers)
            r = conn.getresponse()
            status, raw = r.status, r.read()
        except (OSError, http.client.HTTPException) as e:  # refused, DNS, timeout, cut by cancel_inflight
            if self._cancelled:
                raise RemoteEngineCancelled(f"{url}{path}: cancelled (stop requested)") from None
            raise RemoteEngineError(
                f"rollout server {url}{path}: {e}; check RolloutConfig.servers and that "
                f"`miles-fsdp serve` runs there (raise rollout.request_timeout_s for very long rollouts)") from None
        finally:
            with self._lock:
                self._inflight.discard(conn)
            conn.close()
        if status >= 400:
            text = raw.decode(errors="replace")
            try:
                msg = json.loads(text)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = text[:500]
            raise RemoteEngineError(f"rollout server {url}{path} answered HTTP {status}: {msg}")
        return json.loads(raw)

    def cancel_inflight(self) -> None:
        """Cut every HTTP call in flight (their servers see the disconnect and abort the request);
        calls made from now on still run. Used when a stop is requested mid-rollout."""
        with self._lock:
            self._cancelled = True
            for conn in self._inflight:
                if conn.sock is not None:
                    try:
                        conn.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def health(self, url: str) -> dict:
        return self._call(url, "/health", timeout_s=min(30.0, self.timeout_s))

    def _wait_healthy(self, url: str, wait_s: float) -> dict:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self.health(url)
            except RemoteEngineError:
                if time.monotonic() >= deadline:
                    raise
                logger.info("waiting for rollout server %s", url)
                time.sleep(2.0)

    # --- the engine interface the loop uses ---------------------------------------------

    def generate(self, requests: list[Request], stop: Callable[[], bool] | None = None) -> list[list[Result]]:
        """Blocking: results[i][j] is sample j of requests[i] (as Engine.generate). `stop()` is
        polled while waiting: once True the calls in flight are cut (the servers abort them) and
        their samples come back ABORTED with no tokens."""
        self._cancelled = False
        jobs = []
        for req in requests:
            url = self.urls[self._next % len(self.urls)]
            self._next += 1
            jobs.append(self._pool.submit(self._generate, url, req))
        pending = set(jobs)
        while pending:
            _, pending = wait(pending, timeout=0.1)
            if pending and stop is not None and stop():
                self.cancel_inflight()
                wait(pending)
                break
        return [_results_or_aborted(job, req) for job, req in zip(jobs, requests)]

    async def agenerate(self, prompt_ids: list[int], params: SamplingParams,
                        stop: Callable[[], bool] | None = None) -> Result:
        """One sample (params.n must be 1), awaitable: what a generate hook's engine call does.
        Once `stop()` is True the calls in flight are cut and this sample comes back aborted."""
        url = self.urls[self._next % len(self.urls)]
        self._next += 1
        req = Request(list(prompt_ids), params)
        self._cancelled = False
        job = asyncio.wrap_future(self._pool.submit(self._generate, url, req))
        while not job.done():
            await asyncio.wait([job], timeout=0.1)
            if not job.done() and stop is not None and stop():
                self.cancel_inflight()
                await asyncio.wait([job])
        return _results_or_aborted(job, req)[0]

    def update_weights(self, weights: WeightSource, version: int) -> None:
        """Write `weights` as an HF checkpoint to weights_dir/v<version> (collective; rank 0
        writes), then rank 0 has every server load it; older versions are removed. A server
        that fails stops every rank (no rank waits forever on a collective)."""
        if self.weights_dir is None:
            raise ValueError("RemoteEngine.update_weights: no weights_dir; pass the directory the servers read")
        out = weights.save_hf(self.weights_dir / f"v{version:06d}")
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        error = None
        if rank0:
            try:
                jobs = [self._pool.submit(self._call, url, "/update_weights", {"path": str(out.resolve()),
                                                                               "version": version})
                        for url in self.urls]
                for job in jobs:
                    job.result()
                self.versions = [version] * len(self.urls)
            except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
                error = e
            for old in self.weights_dir.glob("v*"):
                if old != out and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
        failed = torch.tensor([float(error is not None)])
        if dist.is_initialized():  # also the barrier: no rank samples before the servers hold the version
            dist.all_reduce(failed)
        if error is not None:
            raise error
        if failed.item():
            raise RemoteEngineError("rank 0 could not update the rollout servers' weights; its error says why")

    def _generate(self, url: str, req: Request) -> list[Result]:
        p = req.params
        if p.ignore_eos:
            raise ValueError("RemoteEngine: ignore_eos is not supported by the /generate endpoint")
        body = {"input_ids": list(req.prompt_ids), "sampling_params": {
            "max_new_tokens": p.max_new_tokens, "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k,
            "n": p.n, "stop": list(p.stop_strings) or None, "stop_token_ids": list(p.stop_token_ids) or None,
            "seed": p.seed}}
        out = self._call(url, "/generate", body)
        return [_result(out["id"], o) for o in sorted(out["outputs"], key=lambda o: o["index"])]


def _results_or_aborted(job, req: Request) -> list[Result]:
    """The job's results, or the request's n samples ABORTED with no tokens if it was cut."""
    try:
        return job.result()
    except RemoteEngineCancelled:
        return [Result(request_id=req.request_id or "", sample_index=i, token_ids=[],
                       logprobs=torch.zeros(0, dtype=torch.float32), finish_reason=FinishReason.ABORT,
                       timings=Timings(), weight_version=-1, seed=req.params.seed or 0, num_cached_prompt_tokens=0)
                for i in range(req.params.n)]


def _result(request_id: str, o: dict) -> Result:
    return Result(
        request_id=request_id, sample_index=o["index"], token_ids=list(o["token_ids"]),
        # JSON carries each fp32 logprob as the exact double of it: the round trip is exact
        logprobs=torch.tensor(o["logprobs"], dtype=torch.float32),
        finish_reason=FinishReason(o["finish_reason"]), timings=Timings(**o["timings"]),
        weight_version=o["weight_version"], seed=o["seed"], num_cached_prompt_tokens=o["num_cached_prompt_tokens"])
