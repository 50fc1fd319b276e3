"""The trunk's forward and backward of a training micro-batch replayed from CUDA graphs.

On one GPU the trainer is host-bound: a 4k-token step of a Qwen3-0.6B-shaped model launches
~1,800 kernels, and Python issues them slower than the GPU runs them. With
`TrainerConfig.cuda_graphs` (one rank, fsdp_units "none") the trunk (embedding, blocks,
final norm: `model.forward`) of each micro-batch is one graph replay forward and one
backward; the scoring tail (lm_head + logprobs), the loss and the draft stay eager.

Shapes are fixed per bucket: the micro-batch's T tokens are padded to a power of two (at
least MIN_TOKENS) by one extra padding sequence, and its B sequences (+ the padding one) to
a power of two of sequences (zero-length ones). Real tokens never see padding: every
sequence attends only to itself, and the kernels are batch-invariant, so the real rows'
hidden states (so the log-probs) are the bits the eager trunk gives; the padding rows get a
zero output grad, so the weight grads change only by the summation order of the matmuls.
A bucket is warmed (Triton compiles, flash and the LSE check run) and captured on first use;
all buckets share one memory pool (their forwards and backwards never interleave) and one
set of grad outputs (the first bucket's; later buckets copy theirs in), so a new size costs
its static inputs and output, not another copy of the grads. The
compute-dtype shadows (parallel/local.py) are the graphs' parameters: they keep their
storage while graphs are on (refreshed in place); their grads are the backward graph's static
grads, lent to .grad until the next replay (LEND_GRADS, below), or autograd's copies of them.

A capture that fails (a sync or a CPU op inside the trunk, an op CUDA graphs refuse) is
logged once and the trainer runs the trunk eagerly from then on. `capture=False` runs the
same padded inputs eagerly (CPU tests of the padding).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

import miles_kernels as mk
from miles_fsdp.graph_capture import capture_graph
from miles_fsdp.models.transformer import TRAIN_PAGE_SIZE
from miles_fsdp.train.packing import MicroBatch

log = logging.getLogger(__name__)

MIN_TOKENS = 256  # smallest token bucket
MIN_SEQS = 8  # smallest sequence bucket (the padding sequence included)
# LEND_GRADS: the backward graph's static grads go to the parameters' .grad as they are, lent
# until the next replay of any bucket's graph (TrunkGraphs.before_replay has their holder copy them
# then), instead of autograd's copy of each (the 16k step's 320 device copies, ~1.1 ms at 0.6B,
# and 310 AccumulateGrad calls on the host), and the replay takes no autograd edge a parameter
# (~1 ms of host time a micro-batch at 310 parameters). Not only the next backward: the first
# bucket's forward graph was captured before the grads were allocated, so its temporaries may lie
# where they are (copied only before the next backward, the next micro-batch's forward replay of
# that bucket overwrote them: a NaN grad norm in run_rl at scale, H200, 2026-12-05). The same bits
# as the copies: tests/train/test_graphs.py (CPU, stand-in graphs whose forward rewrites them) and
# tests/gpu/test_optim_gpu.py (one bucket replayed while they are lent), test_on_policy_at_scale.py.
LEND_GRADS = True


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, n - 1).bit_length())


def padded_offsets(cu: list[int], t_bucket: int, b_bucket: int) -> list[int]:
    """cu (B + 1 offsets of T real tokens) padded to b_bucket + 1 offsets over t_bucket tokens:
    one padding sequence of the T_bucket - T extra tokens, then zero-length sequences."""
    out = list(cu)
    if out[-1] < t_bucket:
        out.append(t_bucket)
    return out + [t_bucket] * (b_bucket + 1 - len(out))


def fill_packing(cu: torch.Tensor, kv_lens: torch.Tensor, table: torch.Tensor, slot: torch.Tensor,
                 page_size: int) -> None:
    """varlen_meta's kv_lens, block table (zero past a sequence's pages, as wide as `table`) and
    slot mapping of the offsets cu, written into the given tensors with ops on their device (no
    host sync): each sequence on fresh pages, in order."""
    lens = (cu[1:] - cu[:-1]).to(kv_lens.dtype)
    kv_lens.copy_(lens)
    pages = (lens.long() + page_size - 1) // page_size
    first = torch.cumsum(pages, 0) - pages
    j = torch.arange(table.shape[1], device=table.device)
    table.copy_(torch.where(j[None, :] < pages[:, None], first[:, None] + j[None, :], 0))
    t = torch.arange(slot.shape[0], device=slot.device)
    seq = torch.searchsorted(cu[1:].long(), t, right=True)  # the sequence of each token
    slot.copy_(first[seq] * page_size + t - cu[seq].long())


@dataclass
class _Bucket:
    ids: torch.Tensor  # [T_b] int64
    pos: torch.Tensor  # [T_b] int64
    cu: torch.Tensor  # [B_b + 1] int32
    kv_lens: torch.Tensor  # [B_b] int32
    table: torch.Tensor  # [B_b, T_b / page] int32
    slot: torch.Tensor  # [T_b] int64
    params: list[nn.Parameter]
    out: torch.Tensor | None = None  # [T_b, D]
    grad_out: torch.Tensor | None = None
    grads: tuple[torch.Tensor | None, ...] = ()
    fwd: object = None  # torch.cuda.CUDAGraph
    bwd: object = None


class _Replay(torch.autograd.Function):
    """hidden = the bucket's forward graph; its backward graph gives the parameters' grads:
    copies through autograd, or (LEND_GRADS) the static grads themselves in .grad."""

    @staticmethod
    def forward(ctx, graphs: "TrunkGraphs", bucket: _Bucket, *inputs):
        """inputs: the parameters (their grads leave through autograd), or with LEND_GRADS one
        anchor that only makes the output differentiable (the grads go to .grad in backward):
        no autograd edge a parameter to record each micro-batch."""
        bucket.fwd.replay()
        ctx.graphs, ctx.bucket, ctx.n_inputs = graphs, bucket, len(inputs)
        return bucket.out.clone()  # the next replay rewrites bucket.out

    @staticmethod
    def backward(ctx, g_TD):
        graphs, bucket = ctx.graphs, ctx.bucket
        lend = LEND_GRADS and graphs.before_replay is not None
        graphs.own_lent()
        bucket.grad_out.copy_(g_TD)
        bucket.bwd.replay()
        if not lend:
            return (None, None, *(None if g is None else g.clone() for g in bucket.grads))
        for p, g in zip(bucket.params, bucket.grads):
            if g is not None:  # lent; a tied weight's eager grad is added, before or after (in place)
                p.grad = g if p.grad is None else p.grad + g
        graphs.lent = True
        return (None, None, *(None for _ in range(ctx.n_inputs)))


class TrunkGraphs:
    def __init__(self, model: nn.Module, device: torch.device, max_tokens: int, capture: bool = True):
        self.model, self.device, self.capture = model, device, capture
        self.max_tokens = _pow2_at_least(max_tokens, MIN_TOKENS)
        self.buckets: dict[tuple[str, int, int], _Bucket] = {}  # (kernel mode, tokens, sequences)
        self.failed = ""  # why capture failed: the trunk runs eagerly from then on
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.grads: tuple[torch.Tensor | None, ...] | None = None  # every bucket's grad outputs
        # LEND_GRADS: called with the static grads before the next replay (forward or backward, any
        # bucket) may rewrite them; whoever holds them (parallel/local.py LocalParams.own_grads) copies them then
        self.before_replay: Callable[[tuple], None] | None = None
        self.lent = False  # static grads are lent out (since the last backward replay)
        self._anchor = torch.zeros((), device=device, requires_grad=True)  # LEND_GRADS: see _Replay

    def hidden(self, mb: MicroBatch) -> torch.Tensor | None:
        """The trunk's hidden states of mb's T tokens ([T, D], differentiable in the model's
        parameters), from the bucket's graphs; None where graphs cannot serve (the caller
        runs the trunk eagerly)."""
        cu = [int(x) for x in mb.cu_seqlens.tolist()]  # CPU offsets: no device sync
        T, B = cu[-1], len(cu) - 1
        t_b = _pow2_at_least(T, MIN_TOKENS)
        b_b = _pow2_at_least(B + 1, MIN_SEQS)
        if self.failed or T == 0 or t_b > self.max_tokens:
            return None
        key = (mk.get_mode(), t_b, b_b)  # a graph keeps the kernels of the mode it was captured in
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = self._bucket(t_b, b_b)
        self.own_lent()  # before this micro-batch's graphs are captured or replayed
        self._fill(bucket, mb, padded_offsets(cu, t_b, b_b))
        if not self.capture:
            return self._trunk(bucket)[:T]
        if bucket.fwd is None:
            try:
                self._record(bucket)
            except Exception as e:  # noqa: BLE001 - any capture failure: run eagerly, say why once
                if isinstance(e, torch.OutOfMemoryError):  # the trainer's OOM message says what to lower
                    raise
                self.failed = f"{type(e).__name__}: {e}"
                log.warning("trainer.cuda_graphs: capturing the trunk failed (%s); the trunk runs eagerly",
                            self.failed)
                self.buckets.pop(key, None)
                return None
        if LEND_GRADS and self.before_replay is not None:
            return _Replay.apply(self, bucket, self._anchor)[:T]
        return _Replay.apply(self, bucket, *bucket.params)[:T]

    def own_lent(self) -> None:
        """Have the lent static grads' holder copy them before a replay may rewrite them."""
        if self.lent:
            self.lent = False
            self.before_replay(self.grads)

    def _bucket(self, t_b: int, b_b: int) -> _Bucket:
        dev, i32 = self.device, torch.int32
        width = -(-t_b // TRAIN_PAGE_SIZE)
        return _Bucket(
            ids=torch.zeros(t_b, dtype=torch.int64, device=dev), pos=torch.zeros(t_b, dtype=torch.int64, device=dev),
            cu=torch.zeros(b_b + 1, dtype=i32, device=dev), kv_lens=torch.zeros(b_b, dtype=i32, device=dev),
            table=torch.zeros(b_b, width, dtype=i32, device=dev), slot=torch.zeros(t_b, dtype=torch.int64, device=dev),
            params=[p for p in self.model.parameters() if p.requires_grad],
        )

    def _fill(self, bucket: _Bucket, mb: MicroBatch, cu: list[int]) -> None:
        """Copy mb's tokens and positions and the padded offsets into the bucket's static inputs
        and derive the rest of the packing from the offsets where they live (padding tokens: id 0
        at positions 0, 1, ... of their own sequence). On CUDA: three copies from pinned memory and
        a few small kernels, no host tensor math: the host's ops here (varlen_meta's) took 1-16 ms
        at each 16k step's start while the GPU waited (H200 profiles, 2026-12-04)."""
        T = mb.num_tokens
        cuda = bucket.ids.is_cuda
        host = lambda t: t.pin_memory() if cuda else t  # noqa: E731  (pinned: the copies do not wait on the GPU)
        bucket.cu.copy_(host(torch.tensor(cu, dtype=torch.int32)), non_blocking=cuda)
        bucket.ids[:T].copy_(host(mb.ids_T), non_blocking=cuda)
        bucket.pos[:T].copy_(host(mb.pos_T), non_blocking=cuda)
        fill_packing(bucket.cu, bucket.kv_lens, bucket.table, bucket.slot, TRAIN_PAGE_SIZE)
        bucket.ids[T:] = 0
        torch.arange(bucket.pos.shape[0] - T, out=bucket.pos[T:])  # the padding sequence starts at T

    def _trunk(self, bucket: _Bucket) -> torch.Tensor:
        t_b = bucket.ids.shape[0]
        meta = mk.AttnMeta(cu_seqlens_q=bucket.cu, kv_lens=bucket.kv_lens, block_table=bucket.table,
                           max_q_len=t_b, packed=True)  # no host lists: nothing may read them in a graph
        return self.model(bucket.ids, bucket.pos, meta, bucket.slot)

    def _record(self, bucket: _Bucket) -> None:
        """Warm up (compiles, flash's first call, the LSE check) on a side stream, then capture
        the forward and the backward (torch.autograd.grad into static grads)."""
        # the shadows' AccumulateGrad nodes were made on the default stream; capture never runs them
        torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(False)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                out = self._trunk(bucket)
                torch.autograd.grad(out, bucket.params, torch.zeros_like(out), allow_unused=True)
        torch.cuda.current_stream(self.device).wait_stream(side)
        del out
        fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with capture_graph(fwd, pool=self.pool):
            bucket.out = self._trunk(bucket)
        bucket.grad_out = torch.empty_like(bucket.out)
        with capture_graph(bwd, pool=self.pool):
            grads = torch.autograd.grad(bucket.out, bucket.params, bucket.grad_out, allow_unused=True)
            if self.grads is None:
                self.grads = grads
            else:  # the same parameters: the same shapes, and the same unused ones
                torch._foreach_copy_([a for a in self.grads if a is not None], [g for g in grads if g is not None])
            del grads  # later buckets' own grads go back to the pool
        bucket.grads = self.grads
        bucket.fwd, bucket.bwd = fwd, bwd
