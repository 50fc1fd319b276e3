"""Builds the model's inputs for a scheduled batch, runs it, samples. Decides nothing.

For each scheduled sequence the runner computes tokens [start, start + q) of it:
    ids_T, pos_T        the tokens and their absolute positions, packed
    meta.cu_seqlens_q   chunk offsets; meta.kv_lens = start + q (KV after this step)
    meta.block_table    the sequence's pages, padded with the scratch page 0
    slot_T              page * S + offset where each new token's K/V is written
Only the last row of a chunk that reaches the sequence's end goes through `model.logits`
and the sampler. The runner owns the KV cache tensors and the decode CUDA graphs.
"""

from __future__ import annotations

import miles_kernels as mk
import torch

from miles_fsdp.engine.cuda_graph import DecodeGraphs
from miles_fsdp.engine.sampler import RowParams, sample
from miles_fsdp.engine.scheduler import Batch


def kv_bytes_per_page(model, page_size: int, dtype: torch.dtype) -> int:
    a = model.args
    return 2 * a.n_layers * page_size * a.n_kv_heads * a.head_dim * dtype.itemsize


class Runner:
    def __init__(self, model, page_size: int, max_pages_per_seq: int, use_graphs: bool, graph_max_batch: int):
        self.model = model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.page_size = page_size
        self.max_pages_per_seq = max_pages_per_seq
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.graph_max_batch = graph_max_batch
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.graphs: DecodeGraphs | None = None

    def allocate(self, num_pages: int) -> None:
        a = self.model.args
        shape = (num_pages, self.page_size, a.n_kv_heads, a.head_dim)
        # zeros: the scratch page and never-written slots stay finite
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device), torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in range(a.n_layers)
        ]
        if self.use_graphs:
            self.graphs = DecodeGraphs(self._forward_logits, self.kv_caches, self.graph_max_batch, self.max_pages_per_seq, self.device)

    def free(self) -> None:
        self.graphs = None
        self.kv_caches = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _forward_logits(self, ids_T, pos_T, meta, slot_T, kv_caches):
        return self.model.logits(self.model.forward(ids_T, pos_T, meta, slot_T, kv_caches))

    @torch.inference_mode()
    def run(self, batch: Batch) -> tuple[list[int], list[float]]:
        """Compute every scheduled chunk; return (token, logprob) per sampling item, in order."""
        S = self.page_size
        ids, pos, slots, cu, kv_lens, tables, last_rows, rows = [], [], [], [0], [], [], [], []
        for it in batch.items:
            seq, end = it.seq, it.start + it.q_len
            ids.extend(seq.token_ids[it.start : end])
            for p in range(it.start, end):
                pos.append(p)
                slots.append(seq.block_table[p // S] * S + p % S)
            cu.append(cu[-1] + it.q_len)
            kv_lens.append(end)
            tables.append(seq.block_table[: -(-end // S)])
            if it.sample:
                last_rows.append(cu[-1] - 1)
                p = seq.params
                rows.append(RowParams(p.temperature, p.top_k, p.top_p, seq.seed, seq.sample_index, seq.num_tokens))
        width = max(len(t) for t in tables)
        table_BP = [t + [0] * (width - len(t)) for t in tables]

        dev = self.device
        if batch.is_decode and self.graphs is not None and self.graphs.fits(len(ids)):
            logits_BV = self.graphs.replay(ids, pos, slots, kv_lens, table_BP)
        else:
            meta = mk.AttnMeta(
                cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
                kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=dev),
                block_table=torch.tensor(table_BP, dtype=torch.int32, device=dev),
                max_q_len=max(it.q_len for it in batch.items),
            )
            ids_T = torch.tensor(ids, dtype=torch.int64, device=dev)
            pos_T = torch.tensor(pos, dtype=torch.int64, device=dev)
            slot_T = torch.tensor(slots, dtype=torch.int64, device=dev)
            hidden_TD = self.model.forward(ids_T, pos_T, meta, slot_T, self.kv_caches)
            if not last_rows:
                return [], []
            hidden_BD = hidden_TD.index_select(0, torch.tensor(last_rows, device=dev))
            logits_BV = self.model.logits(hidden_BD)
        return sample(logits_BV, rows)
