"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, static buffers.

A graph runs the very kernels the eager path runs, on the same values, so replay changes
no output bit. Rows beyond the real batch are padding: they read and write only the
scratch page 0 (kv_len 1, slot 0), and every kernel is row-independent, so they cannot
disturb real rows. The block table is captured at its full width (max pages per sequence).
Models whose forward cannot be captured (e.g. a host sync) fall back to eager decode.
"""

from __future__ import annotations

import logging

import miles_kernels as mk
import torch

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 1, 16))
    return sorted({b for b in sizes if b <= max_batch} | {max_batch})


class DecodeGraphs:
    def __init__(self, forward_logits, kv_caches, max_batch: int, max_pages: int, device: torch.device):
        self.buckets = batch_buckets(max_batch)
        B, dev = self.buckets[-1], device
        self.ids_B = torch.zeros(B, dtype=torch.int64, device=dev)
        self.pos_B = torch.zeros(B, dtype=torch.int64, device=dev)
        self.slot_B = torch.zeros(B, dtype=torch.int64, device=dev)
        self.kv_lens_B = torch.ones(B, dtype=torch.int32, device=dev)
        self.cu_B1 = torch.arange(B + 1, dtype=torch.int32, device=dev)
        self.table_BP = torch.zeros(B, max_pages, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        try:
            self._capture(forward_logits, kv_caches)
        except Exception as e:  # noqa: BLE001 - any capture failure means: decode eagerly
            log.warning("CUDA graph capture failed (%s: %s); decoding eagerly", type(e).__name__, e)
            self.graphs, self.logits = {}, {}
            torch.cuda.synchronize()

    @torch.inference_mode()
    def _capture(self, forward_logits, kv_caches) -> None:
        pool = None
        for bs in reversed(self.buckets):  # largest first, so smaller graphs reuse its pool
            meta = mk.AttnMeta(self.cu_B1[: bs + 1], self.kv_lens_B[:bs], self.table_BP[:bs], max_q_len=1)
            args = (self.ids_B[:bs], self.pos_B[:bs], meta, self.slot_B[:bs], kv_caches)
            forward_logits(*args)  # warm-up: Triton compiles and autotune-free launches settle
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs] = forward_logits(*args)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def fits(self, batch_size: int) -> bool:
        return bool(self.graphs) and batch_size <= self.buckets[-1]

    def replay(self, ids, pos, slots, kv_lens, table_BP) -> torch.Tensor:
        n = len(ids)
        bs = next(b for b in self.buckets if b >= n)
        width = len(table_BP[0])
        self.ids_B[:n].copy_(torch.tensor(ids), non_blocking=True)
        self.pos_B[:n].copy_(torch.tensor(pos), non_blocking=True)
        self.slot_B[:n].copy_(torch.tensor(slots), non_blocking=True)
        self.kv_lens_B[:n].copy_(torch.tensor(kv_lens, dtype=torch.int32), non_blocking=True)
        self.table_BP[:n].zero_()
        self.table_BP[:n, :width].copy_(torch.tensor(table_BP, dtype=torch.int32), non_blocking=True)
        # padding rows: scratch page 0, one KV token
        self.ids_B[n:bs].zero_()
        self.pos_B[n:bs].zero_()
        self.slot_B[n:bs].zero_()
        self.kv_lens_B[n:bs].fill_(1)
        self.table_BP[n:bs].zero_()
        self.graphs[bs].replay()
        return self.logits[bs][:n]
