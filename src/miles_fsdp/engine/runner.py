"""Builds the model's inputs for a scheduled batch, runs it, samples. Decides nothing.

For each scheduled sequence the runner computes tokens [start, start + q) of it:
    ids_T, pos_T        the tokens and their absolute positions, packed
    meta.cu_seqlens_q   chunk offsets; meta.kv_lens = start + q (KV after this step)
    meta.block_table    the sequence's pages, padded with the scratch page 0
    slot_T              page * S + offset where each new token's K/V is written
Only the last row of a chunk that reaches the sequence's end goes through `model.logits`
and the sampler: launch(batch) = sample_launch(logits(batch), rows), run(batch) = its wait();
a speculative verify item (decode with `draft` tokens) samples at every one of its 1 + draft
positions. The runner owns the KV
cache tensors (with `draft_layers` extra layers for the MTP draft) and the decode CUDA graphs;
with a draft it keeps the last forward's hidden states (`hidden_TD`) for it, and its decode
graphs verify: each sequence gets `verify_rows` (1 + K) rows, the unused ones padding.

Host work per step is small and copies are few: decode batches that fit a graph write
their inputs into the graph's pinned buffer (one host-to-device copy); other batches pack
everything into one int64 array (one copy); the sampler does one copy in and one out.
"""

from __future__ import annotations

import logging

import miles_kernels as mk
import numpy as np
import torch

from miles_fsdp.engine.cuda_graph import DecodeGraphs
from miles_fsdp.engine.draft_graph import DraftGraphs
from miles_fsdp.engine.sampler import RowParams, Sampled, sample, sample_launch
from miles_fsdp.engine.scheduler import Batch

log = logging.getLogger(__name__)


def kv_bytes_per_page(model, page_size: int, dtype: torch.dtype, draft_layers: int = 0) -> int:
    a = model.args
    return 2 * (a.n_layers + draft_layers) * page_size * a.n_kv_heads * a.head_dim * dtype.itemsize


def graphed_forward(model, with_hidden: bool):
    """The decode graphs' forward: (logits,) of every row; with a draft (logits, hidden states). A
    function of the model alone: the runner's bound method made runner <-> graphs a reference cycle,
    so a dropped engine's KV cache, graphs and pinned buffers waited for a garbage collection (which
    could then come inside another engine's capture)."""
    def forward(ids_T, pos_T, meta, slot_T, kv_caches) -> tuple[torch.Tensor, ...]:
        hidden_TD = model.forward(ids_T, pos_T, meta, slot_T, kv_caches)
        return (model.logits(hidden_TD), hidden_TD) if with_hidden else (model.logits(hidden_TD),)
    return forward


class Runner:
    def __init__(self, model, page_size: int, max_pages_per_seq: int, use_graphs: bool, graph_max_batch: int,
                 graph_by_width: bool = False, graphs_required: bool = False, draft_layers: int = 0,
                 verify_rows: int = 1):
        self.model = model
        self.verify_rows = verify_rows
        self.graph_capture = True  # False: "graphs" run eagerly on their padded inputs (CPU tests)
        self.draft_layers = draft_layers
        self.draft_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.hidden_TD: torch.Tensor | None = None  # the last eager forward's hidden states (drafting)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.page_size = page_size
        self.max_pages_per_seq = max_pages_per_seq
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.graph_max_batch = graph_max_batch
        self.graph_by_width = graph_by_width
        self.graphs_required = graphs_required
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.graphs: DecodeGraphs | None = None
        self.draft_graphs: DraftGraphs | None = None  # the drafter's chain after a verify (draft_graph.py)
        self.sample = sample  # (logits_BV, rows) -> (tokens, logprobs): the drafter's
        self.sample_launch = sample_launch  # (logits_BV, rows) -> Sampled; a benchmark may wrap it to time it

    def allocate(self, num_pages: int) -> None:
        a = self.model.args
        shape = (num_pages, self.page_size, a.n_kv_heads, a.head_dim)
        # zeros: the scratch page and never-written slots stay finite
        caches = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device), torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in range(a.n_layers + self.draft_layers)
        ]
        self.kv_caches, self.draft_kv = caches[: a.n_layers], caches[a.n_layers:]
        if self.use_graphs:
            R, S = self.verify_rows, self.page_size
            pages = -(-(self.max_pages_per_seq * S + R - 1) // S)  # a padded verify reaches R - 1 past the end
            forward = graphed_forward(self.model, bool(self.draft_layers))
            self.graphs = DecodeGraphs(forward, self.kv_caches, self.graph_max_batch, pages, self.device,
                                       self.graph_by_width, self.graphs_required, R, self.graph_capture)
            if self.draft_layers and not self.graphs.failed:
                self.draft_graphs = self._draft_graphs(pages)

    def _draft_graphs(self, pages: int) -> DraftGraphs | None:
        """The drafter's graphs; a failed capture raises when graphs are required, else the
        drafter runs eagerly (logged, and engine/draft_graphs_active is 0)."""
        try:
            return DraftGraphs(self.model, self.draft_kv[0], self.graph_max_batch, self.verify_rows - 1, pages,
                               self.page_size, self.device, self.dtype, self.graph_capture)
        except Exception as e:  # noqa: BLE001 - any capture failure means: draft eagerly (or raise)
            if self.graphs_required:
                raise RuntimeError(f"CUDA graph capture of the speculative draft step failed: {type(e).__name__}: "
                                   f"{e}; set EngineConfig.cuda_graphs_required=False to draft eagerly") from e
            log.warning("CUDA graph capture of the draft step failed (%s: %s); drafting eagerly", type(e).__name__, e)
            return None

    def free(self) -> None:
        self.graphs = self.draft_graphs = None
        self.kv_caches, self.draft_kv, self.hidden_TD = None, [], None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def run(self, batch: Batch) -> tuple[list[int], list[float]]:
        """Compute every scheduled chunk; return (token, logprob) per sampling item, in order."""
        return self.launch(batch).wait()

    @torch.inference_mode()
    def launch(self, batch: Batch, prev: Sampled | None = None) -> Sampled:
        """run() without waiting: the step and its sampling queued on the device. With `prev`
        (overlap scheduling) the batch's input ids are prev's sampled ids at batch.src, which
        the host has not seen yet; only a decode batch that fits the graphs (can_launch)."""
        # row i of a sampling item samples the token of position end - draft + i (decode: num_tokens)
        rows = [RowParams(it.seq.params.temperature, it.seq.params.top_k, it.seq.params.top_p, it.seq.seed,
                          it.seq.sample_index, it.start + it.q_len - it.draft + i)
                for it in batch.items if it.sample for i in range(1 + it.draft)]
        logits_BV = self.logits(batch, prev)
        if logits_BV is None:
            return Sampled(torch.zeros(2, 0, dtype=torch.int64))
        return self.sample_launch(logits_BV, rows)

    def can_launch(self, batch: Batch) -> bool:
        """Can this decode batch take its input ids from the device (a graph for its shape
        exists or was just captured)? False after a failed capture."""
        g, S = self.graphs, self.page_size
        if g is None or self.draft_layers or not g.fits(len(batch.items)):
            return False
        return g.ensure(len(batch.items), max(it.start // S for it in batch.items) + 1) is not None

    def logits(self, batch: Batch, prev: Sampled | None = None) -> torch.Tensor | None:
        """Logits of the sampling rows (None if there are none): a graph replay for decode
        batches that fit, else eager. prev: see launch()."""
        items, S = batch.items, self.page_size
        if batch.is_decode and self.draft_layers and self.graphs is not None and self.graphs.fits(len(items)):
            logits_BV = self._replay_verify(items)
            if logits_BV is not None:
                return logits_BV
        elif batch.is_decode and self.graphs is not None and self.graphs.fits(len(items)):
            width = max(it.start // S for it in items) + 1
            key = self.graphs.ensure(len(items), width)
            if key is not None:
                h, n = self.graphs.buf.np, len(items)
                starts = [it.start for it in items]
                tables = [it.seq.block_table for it in items]
                if prev is None:
                    h["ids"][:n] = [it.seq.token_ids[p] for it, p in zip(items, starts)]
                else:
                    h["src"][:n] = batch.src
                h["pos"][:n] = starts
                h["slot"][:n] = [t[p // S] * S + p % S for t, p in zip(tables, starts)]
                h["kv_lens"][:n] = [p + 1 for p in starts]
                tab = h["table"]
                tab[:n, : key[1]] = 0
                for i, (t, p) in enumerate(zip(tables, starts)):
                    k = p // S + 1
                    tab[i, :k] = t[:k]
                return (self.graphs.replay(key, n) if prev is None else self.graphs.replay(key, n, prev.ids))[0]
        if prev is not None:
            raise RuntimeError("Runner.launch(prev=...): only a decode batch that fits the CUDA graphs "
                               "takes its ids from the device; check can_launch(batch) first")
        return self._eager(batch)

    def _replay_verify(self, items) -> torch.Tensor | None:
        """A speculative decode step from a graph: item b (draft d) fills rows b*R .. b*R + d of
        the graph's b*R .. b*R + R - 1; keeps the logits and hidden states of the filled rows
        (the eager layout). None if the capture failed."""
        S, R, n = self.page_size, self.verify_rows, len(items)
        key = self.graphs.ensure(n, max(-(-(it.start + R) // S) for it in items))
        if key is None:
            return None
        h = self.graphs.buf.np
        ids, pos, slot, tab = h["ids"], h["pos"], h["slot"], h["table"]
        ids[: n * R], slot[: n * R], tab[:n, : key[1]] = 0, 0, 0
        keep = []
        for b, it in enumerate(items):
            seq, d, p0, r = it.seq, it.draft, it.start, b * R
            pages = seq.block_table[: -(-(p0 + 1 + d) // S)]
            tab[b, : len(pages)] = pages
            ids[r] = seq.token_ids[p0]
            ids[r + 1: r + 1 + d] = seq.draft[:d]
            pos[r: r + R] = p0  # padding rows: any position inside the model's range
            pos[r: r + 1 + d] = range(p0, p0 + 1 + d)
            slot[r: r + 1 + d] = [pages[q // S] * S + q % S for q in range(p0, p0 + 1 + d)]
            h["kv_lens"][b] = p0 + R  # so that row i sits at position p0 + i
            keep += range(r, r + 1 + d)
        logits_NV, hidden_ND = self.graphs.replay(key, n)
        rows = torch.tensor(keep, dtype=torch.int64)
        rows = rows.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else rows
        self.hidden_TD = hidden_ND.index_select(0, rows)
        return logits_NV.index_select(0, rows)

    def _eager(self, batch: Batch) -> torch.Tensor | None:
        """Pack the batch on the host with numpy, move it in one copy, run model + logits."""
        S, items = self.page_size, batch.items
        B = len(items)
        T = sum(it.q_len for it in items)
        width = max(-(-(it.start + it.q_len) // S) for it in items)
        n_last = sum(1 + it.draft for it in items if it.sample)
        # layout (int64): ids T | pos T | slot T | cu B+1 | kv_lens B | last rows R | table B*width
        buf = np.zeros(3 * T + 2 * B + 1 + n_last + B * width, dtype=np.int64)
        ids, pos, slot = buf[:T], buf[T : 2 * T], buf[2 * T : 3 * T]
        cu = buf[3 * T : 3 * T + B + 1]
        kv = buf[3 * T + B + 1 : 3 * T + 2 * B + 1]
        last = buf[3 * T + 2 * B + 1 : 3 * T + 2 * B + 1 + n_last]
        table = buf[3 * T + 2 * B + 1 + n_last :].reshape(B, width)
        t = r = 0
        for b, it in enumerate(items):
            seq, end = it.seq, it.start + it.q_len
            pages = np.asarray(seq.block_table[: -(-end // S)], dtype=np.int64)
            p = np.arange(it.start, end, dtype=np.int64)
            ids[t : t + it.q_len] = seq.token_ids[it.start : end] + seq.draft[: it.draft] if it.draft \
                else seq.token_ids[it.start : end]  # a verify item's inputs: the last token, then the draft
            pos[t : t + it.q_len] = p
            slot[t : t + it.q_len] = pages[p // S] * S + p % S
            table[b, : len(pages)] = pages
            kv[b] = end
            t += it.q_len
            cu[b + 1] = t
            if it.sample:  # the last row, or the 1 + draft rows of a verify item
                last[r: r + 1 + it.draft] = np.arange(t - 1 - it.draft, t)
                r += 1 + it.draft
        host = torch.from_numpy(buf)
        dev = self.device
        d = host.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else host
        meta = mk.AttnMeta(
            cu_seqlens_q=d[3 * T : 3 * T + B + 1].to(torch.int32),
            kv_lens=d[3 * T + B + 1 : 3 * T + 2 * B + 1].to(torch.int32),
            block_table=d[3 * T + 2 * B + 1 + n_last :].view(B, width).to(torch.int32),
            max_q_len=max(it.q_len for it in items),
            host=(tuple(cu.tolist()), tuple(kv.tolist())),  # fast mode's per-sequence prefill: no sync
        )
        hidden_TD = self.model.forward(d[:T], d[T : 2 * T], meta, d[2 * T : 3 * T], self.kv_caches)
        if self.draft_layers:
            self.hidden_TD = hidden_TD
        if not n_last:
            return None
        last_R = d[3 * T + 2 * B + 1 : 3 * T + 2 * B + 1 + n_last]
        return self.model.logits(hidden_TD.index_select(0, last_R))
