"""Speculative decoding with the model's MTP draft, exact by construction.

A running sequence holds committed tokens x_0..x_n (KV computed below n) and a draft
d_{n+1}..d_{n+K}. One step:
    verify   the trunk runs [x_n, d_{n+1}, ..., d_{n+K}] at positions n..n+K: the same
             invariant kernels as chunked prefill, so row i gives the logits decode would give
             there, and the sampler draws the token of position n+i+1 with the same Gumbel
             noise (a hash of seed, sample, position, token) as decode would
    accept   the draft while it equals those draws, then the draw at the first mismatch
             (scheduler.accepted); tokens after a stop are dropped; the KV of the rejected
             positions is given back
    draft    `Drafter.propose`, below
So tokens and log-probs are bitwise those of K = 0: the draft decides which forwards run,
never a logit or a noise value.

The draft keeps its own paged KV (one layer beside the trunk's, same block tables). Entry s
is MTP(H_{s-1}, emb(x_s)) at position s: H the trunk's hidden state (after its final norm),
H_{-1} = 0 (models/mtp.py has the same convention for training). After every trunk step
the entries of the newly computed positions are written teacher-forced; the output at the
last committed token gives d_{n+1}; then module 0 runs on its own output and the token it
drew, K - 1 more times (speculative entries, overwritten once positions are committed). The
draft samples with the target's noise and filter, so it draws the target's token whenever
its distribution is close. Where a sequence's KV came from the prefix cache, its first new
entry uses H = 0 (the hidden state before it is not at hand): a slightly weaker draft there,
never a different output.
"""

from __future__ import annotations

import miles_kernels as mk
import numpy as np
import torch

from miles_fsdp.engine.sampler import RowParams
from miles_fsdp.engine.scheduler import Batch, Scheduled
from miles_fsdp.engine.sequence import Sequence, SeqStatus


class Drafter:
    def __init__(self, model, runner, blocks, k: int):
        if getattr(model.args, "n_mtp", 0) < 1:
            raise ValueError(f"EngineConfig.num_speculative_tokens={k} needs a model with an MTP draft "
                             "(num_nextn_predict_layers >= 1 in config.json); train one with `miles-fsdp train-draft`, "
                             "or set it to 0")
        self.model, self.runner, self.blocks, self.k = model, runner, blocks, k
        self.page_size = blocks.page_size

    @torch.inference_mode()
    def propose(self, batch: Batch) -> None:
        """Write the draft KV of the positions the last step committed; give every sequence
        that is ready to decode a draft of up to k tokens (`seq.draft`). After a decode step
        this is one graph replay (draft_graph.py) where the runner has draft graphs."""
        if batch.is_decode and self.runner.draft_graphs is not None and self._propose_graphed(batch):
            return
        hidden_TD = self.runner.hidden_TD
        items, t = [], 0
        for it in batch.items:
            seq, rows = it.seq, t
            t += it.q_len
            if seq.status is SeqStatus.RUNNING:
                # a sequence ready to decode needs pages up to its next verify; its last entry
                # (position num_computed) needs its page in any case (no preemption for a draft)
                ready = seq.num_tokens - seq.num_computed == 1
                self.blocks.grow(seq, seq.num_tokens + self.k if ready else seq.num_computed + 1)
                hi = min(seq.num_computed, len(seq.block_table) * self.page_size - 1)
                items.append((it, rows, hi, ready and hi == seq.num_computed))
        if not items:
            return
        g_TD, last = self._teacher_forced(items, hidden_TD)
        ready = [(it.seq, g_TD[r], room) for (it, _, _, ok), r in zip(items, last)
                 if ok and (room := min(self.k, len(it.seq.block_table) * self.page_size - it.seq.num_tokens)) > 0]
        self._draft(ready)

    def _propose_graphed(self, batch: Batch) -> bool:
        """propose() for a decode batch through runner.draft_graphs; False (nothing drafted,
        no sequence changed but pages grown as the eager path grows them) where a sequence
        does not fit that path: then the eager path runs."""
        graphs, S = self.runner.draft_graphs, self.page_size
        items, t = [], 0
        for it in batch.items:
            if it.seq.status is SeqStatus.RUNNING:
                items.append((it, t))
            t += it.q_len
        if not items:
            return True
        if not graphs.fits(len(items)):
            return False
        for it, _ in items:
            seq = it.seq
            if seq.num_tokens - seq.num_computed != 1 or seq.draft_computed != it.start + 1:
                return False
            self.blocks.grow(seq, seq.num_tokens + self.k)
            if len(seq.block_table) * S <= seq.num_computed:  # no page for the last entry
                return False
        graphs.clear(len(items))
        rooms = []
        for b, (it, rows) in enumerate(items):
            seq = it.seq
            rooms.append(max(0, min(self.k, len(seq.block_table) * S - seq.num_tokens)))
            graphs.fill(b, seq, it.start, seq.num_computed - 1 - it.start, rows, rooms[-1])
            seq.draft_computed = seq.num_computed + 1
        for (it, _), room, toks in zip(items, rooms, graphs.run(len(items), self.runner.hidden_TD)):
            it.seq.draft = toks[:room]
        return True

    def _teacher_forced(self, items: list[tuple[Scheduled, int, int, bool]], hidden_TD: torch.Tensor):
        """Entries s in (start, hi] of each item (and s = start when it was never written)
        from H_{s-1} (this step's rows) and x_s; returns their outputs and, per item, the row
        of its last entry."""
        hid, ids, pos, last, spans = [], [], [], [], []
        for it, rows, hi, _ in items:
            seq = it.seq
            lo = it.start if seq.draft_computed <= it.start else it.start + 1
            h = hidden_TD[rows: rows + hi - it.start]  # H_{s-1} for s in (start, hi]
            if lo == it.start:  # no hidden state before `start` at hand (first token, or a prefix hit)
                h = torch.cat([h.new_zeros(1, h.shape[1]), h])
            hid.append(h)
            ids += seq.token_ids[lo: hi + 1]
            pos += range(lo, hi + 1)
            spans.append((seq, lo, hi + 1))
            last.append(len(pos) - 1)
            seq.draft_computed = hi + 1
        g_TD = self._forward(torch.cat(hid), ids, pos, spans)
        return g_TD, last

    def _draft(self, ready: list[tuple[Sequence, torch.Tensor, int]]) -> None:
        """Draw d_{n+1} from each last entry's output, then run module 0 on its own output and
        the drawn token, one position further each time, until every draft is full."""
        for step in range(self.k if ready else 0):
            seqs = [s for s, _, _ in ready]
            g_BD = torch.stack([g for _, g, _ in ready])
            toks, _ = self.runner.sample(self.model.draft_logits(g_BD), [
                RowParams(s.params.temperature, s.params.top_k, s.params.top_p, s.seed, s.sample_index,
                          s.num_tokens + step) for s in seqs])
            for s, tok in zip(seqs, toks):
                s.draft.append(tok)
            ready = [(s, g, room) for s, g, (_, _, room) in zip(seqs, g_BD, ready) if len(s.draft) < room]
            if not ready:
                return
            p = [s.num_tokens + step for s, _, _ in ready]  # the position of the token just drawn
            spans = [(s, q, q + 1) for (s, _, _), q in zip(ready, p)]
            g_BD = self._forward(torch.stack([g for _, g, _ in ready]), [s.draft[-1] for s, _, _ in ready], p, spans)
            ready = [(s, g, room) for (s, _, room), g in zip(ready, g_BD)]

    def _forward(self, hidden_TD: torch.Tensor, ids: list[int], pos: list[int], spans) -> torch.Tensor:
        """model.draft_forward over packed entries; spans: (seq, first position, end) per sequence.
        The inputs go to the device in one copy (layout: ids T | pos T | slot T | cu B+1 | kv B | table B*width)."""
        S, dev = self.page_size, hidden_TD.device
        T, B = len(ids), len(spans)
        width = max(-(-end // S) for _, _, end in spans)
        buf = np.zeros(3 * T + 2 * B + 1 + B * width, dtype=np.int64)
        buf[:T], buf[T: 2 * T] = ids, pos
        slot, cu = buf[2 * T: 3 * T], buf[3 * T: 3 * T + B + 1]
        kv, table = buf[3 * T + B + 1: 3 * T + 2 * B + 1], buf[3 * T + 2 * B + 1:].reshape(B, width)
        t = 0
        for b, (seq, lo, end) in enumerate(spans):
            pages = np.asarray(seq.block_table[: -(-end // S)], dtype=np.int64)
            table[b, : len(pages)] = pages
            q = np.arange(lo, end)
            slot[t: t + end - lo] = pages[q // S] * S + q % S
            t += end - lo
            cu[b + 1], kv[b] = t, end
        host = torch.from_numpy(buf)
        d = host.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else host
        meta = mk.AttnMeta(d[3 * T: 3 * T + B + 1].to(torch.int32), d[3 * T + B + 1: 3 * T + 2 * B + 1].to(torch.int32),
                           d[3 * T + 2 * B + 1:].view(B, width).to(torch.int32),
                           max_q_len=max(e - lo for _, lo, e in spans), host=(tuple(cu.tolist()), tuple(kv.tolist())))
        return self.model.draft_forward(hidden_TD, d[:T], d[T: 2 * T], meta, d[2 * T: 3 * T],
                                        kv_cache=self.runner.draft_kv[0])
