"""The in-process rollout engine: continuous batching over a paged, prefix-cached KV cache.

    add_request(Request) -> waiting queue
    step(): batch = scheduler.schedule()          who runs, how many tokens each
            out   = runner.run(batch)             token ids + logprobs, nothing else
            return scheduler.postprocess(...)     append, finish, free pages -> [StepOutput]

One thread drives the engine: step(), add_request(), abort(), update_weights() and
release/resume_memory() must all be called from it (the HTTP server runs step() in a
background thread and hands it requests and aborts through a queue). `generate()` is the
blocking offline entry point built on the same calls.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import miles_kernels as mk
import torch

from miles_fsdp.engine.block_manager import BlockManager
from miles_fsdp.engine.config import EngineConfig
from miles_fsdp.engine.runner import Runner, kv_bytes_per_page
from miles_fsdp.engine.scheduler import Scheduler
from miles_fsdp.engine.sequence import Request, Result, Sequence, StepOutput
from miles_fsdp.observe.memory import is_oom, oom_error


class Engine:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None,
                 eos_token_ids: list[int] | None = None, detokenize=None):
        """model: a miles_fsdp Transformer (or anything with its forward/logits/args contract),
        already on its device and dtype. tokenizer: optional; gives the eos id and the
        detokenizer used by stop_strings (or pass eos_token_ids / detokenize directly)."""
        self.config = config = config or EngineConfig()
        config.check_kernel_alignment(mk.ATTN_BLOCK)
        self.model = model
        if eos_token_ids is None and tokenizer is not None and tokenizer.eos_token_id is not None:
            eos_token_ids = [tokenizer.eos_token_id]
        self.eos_token_ids = frozenset(eos_token_ids or ())
        if detokenize is None and tokenizer is not None:
            detokenize = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
        self.detokenize = detokenize
        self.max_model_len = config.max_model_len or model.args.max_position_embeddings
        S = config.page_size
        self.runner = Runner(model, S, -(-self.max_model_len // S), config.cuda_graphs, config.cuda_graph_max_batch,
                             config.cuda_graph_by_width, config.cuda_graphs_required)
        self.num_pages = self._num_pages()
        self.blocks = BlockManager(self.num_pages, S, config.prefix_cache)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_prefill_tokens, mk.ATTN_BLOCK, detokenize)
        self._allocate()
        self.weight_version = 0
        self._released = False
        self._pending: list[StepOutput] = []  # produced outside step() (abort, drain), returned by the next step()
        self._requests: dict[str, list[Sequence]] = {}
        self._rng = random.Random(config.seed)

    def _allocate(self) -> None:
        """KV cache (and decode CUDA graphs); an OOM names the settings that size them."""
        try:
            self.runner.allocate(self.num_pages)
        except RuntimeError as e:
            if not is_oom(e):
                raise
            self.runner.free()
            gib = self.num_pages * kv_bytes_per_page(self.model, self.config.page_size, self.runner.dtype) / 2**30
            raise oom_error(e, f"engine KV cache ({self.num_pages} pages, {gib:.2f} GiB) with its CUDA graphs",
                            "lower EngineConfig.kv_memory_fraction, kv_memory_bytes or num_pages, or "
                            "cuda_graph_max_batch") from e

    def _num_pages(self) -> int:
        c, r = self.config, self.runner
        per_page = kv_bytes_per_page(self.model, c.page_size, r.dtype)
        if c.num_pages:
            return c.num_pages
        if c.kv_memory_bytes:
            budget = c.kv_memory_bytes
        elif r.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(r.device)
            budget = int(free * c.kv_memory_fraction)
        else:
            raise ValueError(
                f"EngineConfig.kv_memory_bytes is 0 and the model is on {r.device}: set it to the KV cache "
                f"size in bytes (one page of {c.page_size} tokens takes {per_page} bytes), or set num_pages"
            )
        pages = budget // per_page
        if pages < 2:
            raise ValueError(
                f"EngineConfig: a KV budget of {budget} bytes holds {pages} pages of {per_page} bytes; "
                "need at least 2 (raise kv_memory_bytes / kv_memory_fraction, or lower page_size)"
            )
        return pages

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
        return self.scheduler.has_unfinished() or bool(self._pending)

    def step(self) -> list[StepOutput]:
        """Run one scheduled batch; return what each sample produced (for streaming)."""
        outs, self._pending = self._pending, []
        outs += self._step()
        for out in outs:
            if out.finished and all(s.finish_reason is not None for s in self._requests.get(out.request_id, ())):
                self._requests.pop(out.request_id, None)
        return outs

    def _step(self) -> list[StepOutput]:
        if self._released:
            raise RuntimeError("Engine.step(): KV memory is released; call resume_memory() first")
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        try:
            tokens, logprobs = self.runner.run(batch)
        except RuntimeError as e:
            if not is_oom(e):
                raise
            c, n = self.config, sum(it.q_len for it in batch.items)
            raise oom_error(e, f"engine step ({len(batch.items)} sequences, {n} tokens)",
                            f"lower EngineConfig.max_prefill_tokens (now {c.max_prefill_tokens}) or max_num_seqs "
                            f"(now {c.max_num_seqs}), or kv_memory_fraction to leave room for activations") from e
        return self.scheduler.postprocess(batch, tokens, logprobs, self.weight_version)

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
        engine/preemptions_total (samples preempted for KV space so far: raise the KV size if it climbs)."""
        out = {"engine/preemptions_total": float(self.scheduler.num_preemptions)}
        if self.cuda_graphs_active is not None:
            out["engine/cuda_graphs_active"] = float(self.cuda_graphs_active)
        return out

    def stats(self) -> dict[str, int]:
        s, b = self.scheduler, self.blocks
        return dict(num_running=len(s.running), num_waiting=len(s.waiting), num_free_pages=b.num_free,
                    num_pages=self.num_pages, num_preemptions=s.num_preemptions,
                    num_cached_pages=len(b.cache) if b.cache is not None else 0, weight_version=self.weight_version)

    # --- weights and memory ----------------------------------------------------------------

    @torch.no_grad()
    def update_weights(self, weights, version: int) -> None:
        """Copy `weights` (a state dict with the model's parameter names, or a module) into the
        model in place, between steps. Samples already generating are finished on the old
        weights or restarted on the new (EngineConfig.weight_update); no sample mixes versions.
        The prefix cache is invalidated (its KV came from the old weights)."""
        src = weights.state_dict() if isinstance(weights, torch.nn.Module) else dict(weights)
        params = dict(self.model.named_parameters())
        missing, unexpected = sorted(params.keys() - src.keys()), sorted(src.keys() - params.keys())
        misshaped = [f"{n}: got {tuple(src[n].shape)}, model has {tuple(p.shape)}"
                     for n, p in params.items() if n in src and src[n].shape != p.shape]
        if missing or unexpected or misshaped:
            raise ValueError(f"Engine.update_weights(version={version}): missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}, misshaped {misshaped[:8]}; pass every model parameter")
        self._settle_in_flight()
        for name, p in params.items():
            p.copy_(src[name])
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
        finally:
            sched.only_started = False

    def release_memory(self) -> None:
        """Drop the KV cache and CUDA graphs; unfinished samples are kept and recompute after resume."""
        if self._released:
            return
        self.scheduler.preempt_all()
        self.blocks.invalidate_cache()
        self.runner.free()
        self._released = True

    def resume_memory(self) -> None:
        if self._released:
            self._allocate()
            self._released = False
