"""The in-process rollout engine: continuous batching over a paged, prefix-cached KV cache.

    add_request(Request) -> waiting queue
    step(): batch = scheduler.schedule()          who runs, how many tokens each
            out   = runner.run(batch)             token ids + logprobs, nothing else
            return scheduler.postprocess(...)     append, finish, free pages -> [StepOutput]

Overlap scheduling (EngineConfig.overlap_schedule, decode steps on CUDA graphs): step() launches
decode step n+1 (scheduler.schedule_next: its input ids are step n's sampled ids, still on the
device) before it waits for step n and post-processes it, so the host's work hides behind
the GPU's. The same tokens and logprobs either way; a sample that step n ends with a stop
token is computed once more and that row dropped.

One thread drives the engine: step(), add_request(), abort(), update_weights() and
release()/resume() must all be called from it (the HTTP server runs step() in a
background thread and hands it requests and aborts through a queue). `generate()` is the
blocking offline entry point built on the same calls, `agenerate()` the awaitable one for
generate hooks; with update_weights/release/resume/metrics/close they are the rollout
interface (engine/source.py). Every forward and sample runs in the engine's kernel mode.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

import miles_kernels as mk
import torch

from miles_fsdp.engine.block_manager import BlockManager
from miles_fsdp.engine.config import (AUTO_PREFILL_TOKENS, EngineConfig, auto_prefill_tokens, cpu_kv_bytes,
                                      prefill_bytes_per_token)
from miles_fsdp.engine.runner import Runner, kv_bytes_per_page
from miles_fsdp.engine.sampler import Sampled
from miles_fsdp.engine.scheduler import Batch, Scheduler
from miles_fsdp.engine.sequence import Request, Result, SamplingParams, Sequence, StepOutput
from miles_fsdp.engine.speculative import Drafter
from miles_fsdp.observe.memory import is_oom, oom_error

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None,
                 eos_token_ids: list[int] | None = None, detokenize=None, kernel_mode: str = "invariant"):
        """model: a miles_fsdp Transformer (or anything with its forward/logits/args contract),
        already on its device and dtype. tokenizer: optional; gives the eos id and the
        detokenizer used by stop_strings (or pass eos_token_ids / detokenize directly).
        kernel_mode: the miles_kernels mode every step runs in, on whichever thread calls it
        ("fast" trades the bitwise match with the trainer for vendor kernels)."""
        self.config = config = config or EngineConfig()
        config.check_kernel_alignment(mk.ATTN_BLOCK)
        if kernel_mode not in mk.MODES:
            raise ValueError(f"Engine: kernel_mode={kernel_mode!r}; expected one of {mk.MODES}")
        self.kernel_mode = kernel_mode
        self.model = model
        if eos_token_ids is None and tokenizer is not None and tokenizer.eos_token_id is not None:
            eos_token_ids = [tokenizer.eos_token_id]
        self.eos_token_ids = frozenset(eos_token_ids or ())
        if detokenize is None and tokenizer is not None:
            detokenize = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
        self.detokenize = detokenize
        self.max_model_len = config.max_model_len or model.args.max_position_embeddings
        S = config.page_size
        K = config.num_speculative_tokens
        self.runner = Runner(model, S, -(-self.max_model_len // S), config.cuda_graphs, config.cuda_graph_max_batch,
                             config.cuda_graph_by_width, config.cuda_graphs_required, draft_layers=1 if K else 0,
                             verify_rows=1 + K)
        self.num_pages = self._num_pages()
        self.max_prefill_tokens = config.max_prefill_tokens or self._auto_prefill_tokens()
        self.blocks = BlockManager(self.num_pages, S, config.prefix_cache)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, self.max_prefill_tokens, mk.ATTN_BLOCK, detokenize)
        self.drafter = Drafter(model, self.runner, self.blocks, K) if K else None
        self._allocate()
        self.weight_version = 0
        self._released = False
        self._pending: list[StepOutput] = []  # produced outside step() (abort, drain), returned by the next step()
        self._inflight: tuple[Batch, Sampled] | None = None  # overlap: a launched decode step not yet seen
        self._num_overlapped = 0  # decode steps launched before the previous one was seen
        self._requests: dict[str, list[Sequence]] = {}
        self._rng = random.Random(config.seed)
        self._awaited: dict[str, tuple[asyncio.Future, Callable[[], bool] | None]] = {}  # agenerate's calls
        self._driver: asyncio.Task | None = None

    def _allocate(self) -> None:
        """KV cache (and decode CUDA graphs); an OOM names the settings that size them."""
        try:
            with mk.use_mode(self.kernel_mode):  # graphs capture the kernels of this mode
                self.runner.allocate(self.num_pages)
        except RuntimeError as e:
            if not is_oom(e):
                raise
            self.runner.free()
            gib = self.num_pages * kv_bytes_per_page(self.model, self.config.page_size, self.runner.dtype,
                                                     self.runner.draft_layers) / 2**30
            raise oom_error(e, f"engine KV cache ({self.num_pages} pages, {gib:.2f} GiB) with its CUDA graphs",
                            "lower EngineConfig.kv_memory_fraction, kv_memory_bytes or num_pages, or "
                            "cuda_graph_max_batch") from e

    def _num_pages(self) -> int:
        c, r = self.config, self.runner
        per_page = kv_bytes_per_page(self.model, c.page_size, r.dtype, r.draft_layers)
        if c.num_pages:
            return c.num_pages
        if c.kv_memory_bytes:
            budget = c.kv_memory_bytes
        elif r.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(r.device)
            budget = int(free * c.kv_memory_fraction)
        else:
            budget = cpu_kv_bytes()
            log.info("KV cache on CPU: %d MiB (EngineConfig.kv_memory_bytes / num_pages not set)", budget // 2**20)
        pages = budget // per_page
        if pages < 2:
            raise ValueError(
                f"EngineConfig: a KV budget of {budget} bytes holds {pages} pages of {per_page} bytes; "
                "need at least 2 (raise kv_memory_bytes / kv_memory_fraction, or lower page_size)"
            )
        return pages

    def _auto_prefill_tokens(self) -> int:
        """EngineConfig.max_prefill_tokens=0: auto_prefill_tokens against the device memory free
        now less the KV cache about to be allocated (CUDA); AUTO_PREFILL_TOKENS[-1] on CPU."""
        r = self.runner
        if r.device.type != "cuda":
            return AUTO_PREFILL_TOKENS[-1]
        free, _ = torch.cuda.mem_get_info(r.device)
        left = free - self.num_pages * kv_bytes_per_page(self.model, self.config.page_size, r.dtype, r.draft_layers)
        n = auto_prefill_tokens(self.model.args, r.dtype.itemsize, left)
        need = n * prefill_bytes_per_token(self.model.args, r.dtype.itemsize)
        log.info("EngineConfig.max_prefill_tokens=0: %d tokens a prefill step (~%.1f GiB of activations; "
                 "%.1f GiB free beside the KV cache)", n, need / 2**30, left / 2**30)
        return n

    # --- requests ------------------------------------------------------------------------

    def add_request(self, req: Request) -> str:
        """Queue `req` (its n samples); returns its request_id."""
        p, rid = req.params, req.request_id
        if rid in self._requests:
            raise ValueError(f"Request {rid!r}: a request with this id is still unfinished; use a unique request_id")
        total = len(req.prompt_ids) + p.max_new_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"Request {rid!r}: prompt ({len(req.prompt_ids)} tokens) + max_new_tokens ({p.max_new_tokens}) = "
                f"{total} exceeds max_model_len {self.max_model_len}; shorten the prompt or lower max_new_tokens"
            )
        if self.blocks.pages_for(total) > self.num_pages - 1:
            raise ValueError(
                f"Request {rid!r}: {total} tokens need {self.blocks.pages_for(total)} KV pages, the cache has "
                f"{self.num_pages - 1}; raise EngineConfig.kv_memory_bytes/num_pages or lower max_new_tokens"
            )
        V = self.model.args.vocab_size
        if min(req.prompt_ids) < 0 or max(req.prompt_ids) >= V:
            raise ValueError(f"Request {rid!r}: prompt_ids must lie in [0, {V}) (the model's vocab_size)")
        if p.stop_strings and self.detokenize is None:
            raise ValueError(f"Request {rid!r}: stop_strings need a tokenizer; pass tokenizer= or detokenize= to Engine")
        seed = p.seed if p.seed is not None else self._rng.randrange(2**32)
        stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_token_ids)
        now, seqs = time.perf_counter(), []
        for i in range(p.n):
            seq = Sequence(req, i, seed, now, leader=seqs[0] if seqs else None)
            seq.stop_ids = stop_ids
            seqs.append(seq)
            self.scheduler.add(seq)
        self._requests[rid] = seqs
        return rid

    def abort(self, request_id: str) -> None:
        """Finish every sample of the request with FinishReason.ABORT (reported by the next step())."""
        self._pending += self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending) or self._inflight is not None

    def step(self) -> list[StepOutput]:
        """Run one scheduled batch (under overlap scheduling: see the step in flight through and
        launch the next); return what each sample produced (for streaming)."""
        outs, self._pending = self._pending, []
        outs += self._step()
        for out in outs:
            if out.finished and all(s.finish_reason is not None for s in self._requests.get(out.request_id, ())):
                self._requests.pop(out.request_id, None)
        return outs

    def _step(self) -> list[StepOutput]:
        if self._released:
            raise RuntimeError("Engine.step(): KV memory is released; call resume() first")
        batch = None
        if self._inflight is None:
            batch = self.scheduler.schedule()
            if batch is None:
                return []
        running = batch if batch is not None else self._inflight[0]  # named by an OOM message
        try:
            with mk.use_mode(self.kernel_mode):
                if batch is not None and not self._overlaps(batch):
                    tokens, logprobs = self.runner.run(batch)
                    outs = self.scheduler.postprocess(batch, tokens, logprobs, self.weight_version)
                    if self.drafter is not None:
                        self.drafter.propose(batch)
                    return outs
                if batch is not None:
                    self._inflight = (batch, self.runner.launch(batch))
                return self._advance()
        except RuntimeError as e:
            if not is_oom(e):
                raise
            c, n = self.config, sum(it.q_len for it in running.items)
            self._inflight = None
            now = f"{self.max_prefill_tokens}" + ("" if c.max_prefill_tokens else ", chosen at start")
            raise oom_error(e, f"engine step ({len(running.items)} sequences, {n} tokens)",
                            f"lower EngineConfig.max_prefill_tokens (now {now}) or max_num_seqs "
                            f"(now {c.max_num_seqs}), or kv_memory_fraction to leave room for activations") from e

    def _overlaps(self, batch: Batch) -> bool:
        """Overlap scheduling applies: a plain decode batch (no speculation) on the graphs."""
        return (self.config.overlap_schedule and batch.is_decode and self.drafter is None
                and self.runner.can_launch(batch))

    def _advance(self) -> list[StepOutput]:
        """Launch the decode step after the one in flight (when the scheduler can decide it
        unseen), then wait for the one in flight and post-process it while the next runs."""
        batch, sampled = self._inflight
        nxt = self.scheduler.schedule_next(batch)
        self._inflight = None
        if nxt is not None and self.runner.can_launch(nxt):
            self._inflight = (nxt, self.runner.launch(nxt, sampled))
            self._num_overlapped += 1
        tokens, logprobs = sampled.wait()
        return self.scheduler.postprocess(batch, tokens, logprobs, self.weight_version)

    def _drain(self) -> None:
        """Wait for and post-process a step still in flight (its outputs go to the next step())."""
        if self._inflight is not None:
            batch, sampled = self._inflight
            self._inflight = None
            self._pending += self.scheduler.postprocess(batch, *sampled.wait(), self.weight_version)

    def generate(self, requests: list[Request], stop: Callable[[], bool] | None = None) -> list[list[Result]]:
        """Blocking: run `requests` to completion; results[i][j] is sample j of requests[i].
        `stop()` is polled between steps: once it returns True every unfinished sample is
        aborted (FinishReason.ABORT, with what it produced so far) and generate returns."""
        if self.has_unfinished():
            raise RuntimeError("Engine.generate(): the engine has unfinished streamed requests; drain them with step() first")
        rids = [self.add_request(r) for r in requests]
        results: dict[str, list[Result | None]] = {rid: [None] * r.params.n for rid, r in zip(rids, requests)}
        stopping = False
        while self.has_unfinished():
            if stop is not None and not stopping and stop():
                stopping = True
                for rid in rids:
                    self.abort(rid)
            for out in self.step():
                if out.finished:
                    results[out.request_id][out.sample_index] = out.result
        return [results[rid] for rid in rids]

    @property
    def cuda_graphs_active(self) -> bool | None:
        """Whether decode steps replay CUDA graphs; None where they do not apply (CPU, or
        cuda_graphs off). False means a capture failed and decode runs eagerly."""
        if not self.runner.use_graphs:
            return None
        return self.runner.graphs is not None and not self.runner.graphs.failed

    def metrics(self) -> dict[str, float]:
        """Per-step run metrics: engine/cuda_graphs_active (1 while decode replays CUDA graphs,
        0 once a capture failed and decode runs eagerly; absent on CPU or with graphs off) and
        engine/preemptions_total (samples preempted for KV space so far: raise the KV size if it climbs);
        engine/draft_graphs_active (with speculation and graphs: 1 while the drafter replays its graphs);
        engine/overlap_steps_total (with graphs and overlap_schedule, no speculation: decode steps
        launched before the previous one was post-processed, so far);
        with speculation, engine/spec_accept_rate(_i) and engine/spec_mean_accept_len since the last call."""
        out = {"engine/preemptions_total": float(self.scheduler.num_preemptions)}
        if self.cuda_graphs_active is not None:
            out["engine/cuda_graphs_active"] = float(self.cuda_graphs_active)
            if self.drafter is not None:
                out["engine/draft_graphs_active"] = float(self.runner.draft_graphs is not None)
            elif self.config.overlap_schedule:
                out["engine/overlap_steps_total"] = float(self._num_overlapped)
        return out | self.scheduler.spec.take()

    async def agenerate(self, prompt_ids: list[int], params: SamplingParams,
                        stop: Callable[[], bool] | None = None) -> Result:
        """One sample (params.n == 1), awaitable: concurrent calls from one event loop share
        engine steps (a driver task steps while any is waiting). Once `stop()` is True the
        sample is aborted and returns with what it produced."""
        if params.n != 1:
            raise ValueError(f"Engine.agenerate: params.n={params.n}; one sample per call (n=1)")
        rid = self.add_request(Request(list(prompt_ids), params))
        fut = asyncio.get_running_loop().create_future()
        self._awaited[rid] = (fut, stop)
        if self._driver is None or self._driver.done():
            self._driver = asyncio.ensure_future(self._drive())
        return await fut

    async def _drive(self) -> None:
        while self._awaited:
            await asyncio.sleep(0)  # let the other callers add their requests first
            for rid, (_, stop) in list(self._awaited.items()):
                if stop is not None and stop():
                    self.abort(rid)
            for out in self.step():
                if out.finished and out.request_id in self._awaited:
                    self._awaited.pop(out.request_id)[0].set_result(out.result)

    def stats(self) -> dict[str, int]:
        s, b = self.scheduler, self.blocks
        return dict(num_running=len(s.running), num_waiting=len(s.waiting), num_free_pages=b.num_free,
                    num_pages=self.num_pages, num_preemptions=s.num_preemptions,
                    num_cached_pages=len(b.cache) if b.cache is not None else 0, weight_version=self.weight_version)

    # --- weights and memory ----------------------------------------------------------------

    @torch.no_grad()
    def update_weights(self, weights, version: int) -> None:
        """Copy new weights into the model in place, between steps: a WeightSource (streamed
        bucket by bucket: peak extra memory is one bucket), a state dict with the model's
        parameter names, or a module. Samples already generating are finished on the old
        weights or restarted on the new (EngineConfig.weight_update); no sample mixes versions.
        The prefix cache is invalidated (its KV came from the old weights)."""
        params = dict(self.model.named_parameters())
        if hasattr(weights, "buckets"):
            buckets = weights.buckets()
        else:  # a whole state dict is checked before anything changes
            whole = dict(weights.state_dict() if isinstance(weights, torch.nn.Module) else weights)
            _check_bucket(whole, params, version, complete=True)
            buckets = iter([whole])
        self._drain()
        self._settle_in_flight()
        done: set[str] = set()
        for bucket in buckets:
            _check_bucket(bucket, params, version)
            for name, t in bucket.items():
                params[name].copy_(t)
            done |= bucket.keys()
            bucket = t = None  # drop this bucket before the source builds the next one: one alive at a time
        if missing := sorted(params.keys() - done):  # a broken source: the next full update repairs the engine
            raise ValueError(f"Engine.update_weights(version={version}): the source never sent {missing[:8]}")
        self.blocks.invalidate_cache()
        self.weight_version = version

    def _settle_in_flight(self) -> None:
        sched = self.scheduler
        started = lambda s: s.num_tokens > s.prompt_len  # noqa: E731
        if self.config.weight_update == "restart":
            sched.preempt_all()
            for seq in sched.waiting:
                if started(seq):
                    seq.reset_completion()
                    self._pending.append(StepOutput(seq.request_id, seq.sample_index, [], [], reset=True))
            return
        for seq in [s for s in sched.running if not started(s)]:  # nothing sampled yet: just recompute later
            sched.preempt(seq)
        sched.only_started = True
        try:
            while any(started(s) for s in (*sched.running, *sched.waiting)):
                self._pending += self._step()
            self._drain()
        finally:
            sched.only_started = False

    def release(self) -> None:
        """Drop the KV cache and CUDA graphs; unfinished samples are kept and recompute after resume."""
        self._release()

    def _release(self) -> None:
        if self._released:
            return
        self._drain()
        self.scheduler.preempt_all()
        self.blocks.invalidate_cache()
        self.runner.free()
        self._released = True

    def resume(self) -> None:
        """Rebuild the KV cache and CUDA graphs dropped by release()."""
        if self._released:
            self._allocate()
            self._released = False

    def close(self) -> None:
        """The rollout interface's close: release() (the KV cache and CUDA graphs go back to the
        device at once, not when the engine object is collected); resume() would rebuild them."""
        self._release()


def _check_bucket(bucket: dict, params: dict, version: int, complete: bool = False) -> None:
    missing = sorted(params.keys() - bucket.keys()) if complete else []
    unexpected = sorted(bucket.keys() - params.keys())
    misshaped = [f"{n}: got {tuple(t.shape)}, model has {tuple(params[n].shape)}"
                 for n, t in bucket.items() if n in params and t.shape != params[n].shape]
    if missing or unexpected or misshaped:
        raise ValueError(f"Engine.update_weights(version={version}): missing {missing[:8]}, unexpected "
                         f"{unexpected[:8]}, misshaped {misshaped[:8]}; pass every model parameter, by its name")
