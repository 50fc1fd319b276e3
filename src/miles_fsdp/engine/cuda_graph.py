"""Decode steps replayed from CUDA graphs: one graph per (batch, table width) bucket.

With speculation (`rows` = 1 + K) every sequence of a graph has `rows` query rows: a verify
item of d <= K draft tokens fills the first 1 + d and pads the rest (they write the scratch
page and come after the real rows, so causal attention keeps them out of the real rows);
its kv_len is start + rows, so the real rows sit at their positions. The forward then
returns (logits, hidden states) of every row: the runner keeps the real ones.

A graph runs the very kernels the eager path runs, on the same values, so replay changes
no output bit. Rows beyond the real batch are padding: they read and write only the
scratch page 0 (kv_len 1, slot 0), and every kernel is row-independent, so they cannot
disturb real rows. The block table is captured at its full width (max pages per sequence)
and all batch buckets are captured up front; with `by_width` graphs are also keyed by a
power-of-two table width >= the batch's longest table and captured on first use (less
empty attention work, but each new width costs a capture and new Triton specializations).
Attention reads only the pages under kv_len, so extra columns are unread padding, and the
invariant kernels give the same bits at any width.

Inputs live in one static device byte buffer that the runner fills with a single
host-to-device copy from one of two pinned twins (StepBuffers). Under overlap scheduling
the input ids come from the previous step's sampled ids on the device
(`replay(ids_from=...)`). Capture runs a warm-up and the capture on padding inputs.
A forward that cannot be captured (e.g. a host sync) raises when `required`, else it logs a
warning and decode runs eagerly (`failed`; the engine reports it as cuda_graphs_active).
"""

from __future__ import annotations

import logging

import miles_kernels as mk
import torch

from miles_fsdp.graph_capture import capture_graph

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 1, 16))
    return sorted({b for b in sizes if b <= max_batch} | {max_batch})


def width_buckets(max_pages: int) -> list[int]:
    sizes, w = [], 1
    while w < max_pages:
        sizes.append(w)
        w *= 2
    return sizes + [max_pages]


class StepBuffers:
    """One byte buffer holding ids, pos, slot (int64 [B * rows]), src (int64 [B]), kv_lens
    (int32 [B]) and the block table (int32 [B, P]). Two pinned host twins (on CUDA) take
    turns mirroring `dev`: `np` / `host_u8` is the one to fill next, so a step can be filled
    while the previous step's upload may still be queued behind work in flight."""

    def __init__(self, max_batch: int, max_pages: int, device: torch.device, rows: int = 1):
        B, P = max_batch, max_pages
        self.B, self.P, self.R = B, P, rows
        nbytes = 3 * 8 * B * rows + 8 * B + 4 * B + 4 * B * P
        pin = device.type == "cuda"
        self.twins = [torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(2 if pin else 1)]
        self.dev_u8 = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self.dev = self._views(self.dev_u8)
        self._views_np = [{k: v.numpy() for k, v in self._views(t).items()} for t in self.twins]
        self._turn = 0

    @property
    def host_u8(self) -> torch.Tensor:
        return self.twins[self._turn]

    @property
    def np(self) -> dict:
        return self._views_np[self._turn]

    def _views(self, u8: torch.Tensor) -> dict[str, torch.Tensor]:
        B, P, N = self.B, self.P, self.B * self.R
        i64 = u8[: 24 * N + 8 * B].view(torch.int64)
        i32 = u8[24 * N + 8 * B :].view(torch.int32)
        return dict(ids=i64[:N], pos=i64[N : 2 * N], slot=i64[2 * N : 3 * N], src=i64[3 * N :], kv_lens=i32[:B],
                    table=i32[B:].view(B, P))

    def upload(self) -> None:
        """Copy the filled twin to the device (queued on the stream), then turn to the other.
        A twin is refilled two uploads later: by then the engine has waited for a step
        queued after its copy."""
        self.dev_u8.copy_(self.host_u8, non_blocking=True)
        self._turn = (self._turn + 1) % len(self.twins)


class DecodeGraphs:
    """forward(ids, pos, meta, slot, kv_caches) -> a tuple of [rows * batch, ...] tensors
    (the logits, and with speculation the hidden states). capture=False replays by running
    forward on the static buffers: the same inputs without a graph (CPU tests of the layout)."""

    def __init__(self, forward, kv_caches, max_batch: int, max_pages: int, device: torch.device,
                 by_width: bool = False, required: bool = False, rows: int = 1, capture: bool = True):
        self.buckets = batch_buckets(max_batch)
        self.widths = width_buckets(max_pages) if by_width else [max_pages]
        self.forward, self.kv_caches = forward, kv_caches
        self.rows, self.capture = rows, capture
        self.buf = StepBuffers(self.buckets[-1], max_pages, device, rows)
        self.cu_B1 = torch.arange(self.buckets[-1] + 1, dtype=torch.int32, device=device) * rows
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph | None] = {}
        self.outputs: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self.pool = None
        self.failed = False
        self.required = required
        if not by_width:  # one width: capture every batch bucket now, largest first (pool reuse)
            for bs in reversed(self.buckets):
                if not self._capture((bs, max_pages)):
                    break

    def fits(self, batch_size: int) -> bool:
        return not self.failed and batch_size <= self.buckets[-1]

    def bucket(self, n: int, width: int) -> tuple[int, int]:
        return next(b for b in self.buckets if b >= n), next(w for w in self.widths if w >= width)

    def _args(self, bs: int, w: int):
        d, n = self.buf.dev, bs * self.rows
        # the table is a column slice of the [B, P] buffer: rows keep the full stride
        meta = mk.AttnMeta(self.cu_B1[: bs + 1], d["kv_lens"][:bs], d["table"][:bs, :w], max_q_len=self.rows)
        return d["ids"][:n], d["pos"][:n], meta, d["slot"][:n], self.kv_caches

    def _pad(self, n: int, bs: int, w: int) -> None:
        """Padding sequences n..bs: every row reads and writes only the scratch page 0."""
        h, R = self.buf.np, self.rows
        h["ids"][n * R: bs * R], h["pos"][n * R: bs * R], h["slot"][n * R: bs * R] = 0, 0, 0
        h["kv_lens"][n:bs], h["table"][n:bs, :w] = R, 0

    @torch.inference_mode()
    def _capture(self, key: tuple[int, int]) -> bool:
        """Capture the graph of `key` on padding inputs; False (and eager from now on) on failure."""
        bs, w = key
        if not self.capture:
            self.graphs[key] = None
            return True
        self._pad(0, bs, self.buf.P)
        torch.cuda.synchronize()
        self.buf.upload()
        try:
            args = self._args(bs, w)
            self.forward(*args)  # warm-up: Triton compiles, lazy inits settle
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with capture_graph(graph, pool=self.pool):
                self.outputs[key] = self.forward(*args)
            self.pool = graph.pool()
            self.graphs[key] = graph
        except Exception as e:  # noqa: BLE001 - any capture failure means: decode eagerly (or raise)
            if self.required:
                raise RuntimeError(
                    f"CUDA graph capture of the decode step (batch {bs}, table width {w}) failed: "
                    f"{type(e).__name__}: {e}. The model's forward must not sync with the host; "
                    "set EngineConfig.cuda_graphs_required=False to decode eagerly instead") from e
            log.warning("CUDA graph capture failed (%s: %s); decoding eagerly (slower; the run logs "
                        "engine/cuda_graphs_active=0)", type(e).__name__, e)
            self.failed = True
            self.graphs, self.outputs = {}, {}
        torch.cuda.synchronize()
        return not self.failed

    def ensure(self, n: int, width: int) -> tuple[int, int] | None:
        """The bucket for n rows and a table of `width` pages, captured if new (this
        overwrites the host buffer: call before filling it); None if capture failed."""
        key = self.bucket(n, width)
        if key not in self.graphs and not self._capture(key):
            return None
        return key

    def replay(self, key: tuple[int, int], n: int, ids_from: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Pad sequences [n, bucket), upload the buffer (one copy), replay; the outputs of the
        n sequences' rows (views of the graph's static outputs: use before the next replay).
        ids_from: the input ids are ids_from[src[:n]] (the previous step's sampled tokens,
        still on the device), not the uploaded ids (rows = 1 only)."""
        bs, w = key
        self._pad(n, bs, w)
        self.buf.upload()
        if ids_from is not None:
            d = self.buf.dev
            torch.index_select(ids_from, 0, d["src"][:n], out=d["ids"][:n])
        if self.graphs[key] is None:  # capture=False
            out = self.forward(*self._args(bs, w))
        else:
            self.graphs[key].replay()
            out = self.outputs[key]
        return tuple(t[: n * self.rows] for t in out)
