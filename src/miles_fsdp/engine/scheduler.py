"""Who runs next, and what happens to them after.

A step is either a prefill step (chunks of prompts, newest work last) or a decode step (one
token for every running sequence that has exactly one uncomputed token). Both are the same
operation for the runner: compute KV for tokens [num_computed, num_computed + q) of each
sequence and, if that reaches the sequence's last token, sample the next one. So a sequence
that was preempted (pages freed, requeued at the front of `waiting`) simply prefills its
prompt + completion again and continues where it stopped: nothing lost, nothing duplicated.

Chunk ends fall on multiples of mk.ATTN_BLOCK (unless a chunk ends the sequence) and
prefix-cache hits cover whole pages, so every chunk starts on a kernel block boundary.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from miles_fsdp.engine.block_manager import BlockManager
from miles_fsdp.engine.sequence import FinishReason, Sequence, SeqStatus, StepOutput


@dataclass
class Scheduled:
    seq: Sequence
    start: int  # first position computed this step (== seq.num_computed when scheduled)
    q_len: int  # tokens computed this step
    sample: bool  # the chunk reaches the last token: sample the next one
    draft: int = 0  # speculative tokens verified (decode: q_len = 1 + draft, one sample per position)


@dataclass
class Batch:
    items: list[Scheduled]
    is_decode: bool
    src: list[int] | None = None  # overlap: item i's input id is the previous step's sampled row src[i]


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_prefill_tokens: int,
        attn_block: int,
        detokenize: Callable[[list[int]], str] | None = None,
    ):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.attn_block = attn_block
        self.detokenize = detokenize
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.only_started = False  # weight-update drain: admit only samples that already have tokens
        self.num_preemptions = 0
        self.spec = SpecCounts()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch | None:
        batch = self._schedule_prefill()
        return batch if batch is not None else self._schedule_decode()

    def _chunk(self, start: int, remaining: int, budget: int) -> int:
        if remaining <= budget:
            return remaining
        return (start + budget) // self.attn_block * self.attn_block - start

    def _schedule_prefill(self) -> Batch | None:
        budget, items = self.max_prefill_tokens, []
        for seq in list(self.running):  # continue chunked prefills first
            if len(seq.token_ids) - seq.num_computed <= 1 or seq.status is not SeqStatus.RUNNING:
                continue
            q = self._chunk(seq.num_computed, seq.num_uncomputed, budget)
            if q <= 0:
                break
            if self._make_room(seq, seq.num_computed + q, items):
                items.append(self._scheduled(seq, q))
                budget -= q
        for seq in list(self.waiting):  # then admit, front first; stop at the first that does not fit
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if self._must_wait(seq):
                continue
            pages, keys = self.blocks.match(seq)
            start = len(pages) * self.blocks.page_size
            q = self._chunk(start, seq.num_tokens - start, budget)
            if q <= 0 or not self.blocks.admit(seq, pages, keys, start + q):
                break
            self.waiting.remove(seq)
            seq.status = SeqStatus.RUNNING
            if seq.t_scheduled is None:
                seq.t_scheduled = time.perf_counter()
                seq.num_cached_prompt_tokens = min(start, seq.prompt_len)
            self.running.append(seq)
            items.append(self._scheduled(seq, q))
            budget -= q
        return Batch(items, is_decode=False) if items else None

    def _must_wait(self, seq: Sequence) -> bool:
        if self.only_started and seq.num_tokens == seq.prompt_len:
            return True
        # Later samples of a group wait while sample 0 prefills the prompt, then hit its pages.
        lead = seq.leader
        return (
            lead is not None
            and self.blocks.cache is not None
            and (seq.prompt_len - 1) // self.blocks.page_size > 0  # a full page to share
            and lead.status is SeqStatus.RUNNING
            and lead.num_uncomputed > 1
        )

    def _schedule_decode(self) -> Batch | None:
        items: list[Scheduled] = []
        S = self.blocks.page_size
        for seq in list(self.running):  # hot loop: one pass per decode step, plain attribute reads
            n = len(seq.token_ids)
            if n - seq.num_computed != 1 or seq.status is not SeqStatus.RUNNING:
                continue
            k = len(seq.draft)  # verify the draft with the last token: positions n-1 .. n-1+k
            if n + k <= len(seq.block_table) * S or self._make_room(seq, n + k, items):
                items.append(Scheduled(seq, n - 1, 1 + k, True, k))
            else:
                self.preempt(seq)
        return Batch(items, is_decode=True) if items else None

    def schedule_next(self, prev: Batch) -> Batch | None:
        """Overlap scheduling: the decode step after `prev` (a plain decode batch whose tokens
        are still on the device), decided before they are seen. Each sequence continues at
        the position of its unseen token, its input id that token (Batch.src). Left out: a
        sequence that prev ends by length; one that prev ends by a stop token is computed
        once more and dropped in postprocess. None (the caller waits for prev, then the
        normal schedule runs) when a waiting sequence could be admitted or a sequence needs
        a page that only preemption would give."""
        if self.waiting and len(self.running) < self.max_num_seqs:
            return None
        items, src, S = [], [], self.blocks.page_size
        for i, it in enumerate(prev.items):
            seq = it.seq
            if seq.status is not SeqStatus.RUNNING:
                continue
            p = len(seq.token_ids)  # where prev's token goes
            if p + 1 - seq.prompt_len >= seq.params.max_new_tokens:
                continue
            if p + 1 > len(seq.block_table) * S and not self.blocks.grow(seq, p + 1):
                return None
            items.append(Scheduled(seq, p, 1, True))
            src.append(i)
        return Batch(items, is_decode=True, src=src) if items else None

    def _scheduled(self, seq: Sequence, q: int) -> Scheduled:
        return Scheduled(seq, seq.num_computed, q, seq.num_computed + q == seq.num_tokens)

    def _make_room(self, seq: Sequence, end: int, scheduled: list[Scheduled]) -> bool:
        """Grow `seq` to cover [0, end), preempting the newest running sequence not already
        scheduled this step if needed."""
        while not self.blocks.grow(seq, end):
            protected = {it.seq.seq_id for it in scheduled}
            victims = [s for s in self.running if s is not seq and s.seq_id not in protected]
            if not victims:
                return False
            self.preempt(victims[-1])
        return True

    def preempt(self, seq: Sequence) -> None:
        """Free the pages of a running `seq` and requeue it at the front (it recomputes)."""
        self.blocks.free(seq)
        self.running.remove(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def preempt_all(self) -> None:
        for seq in reversed(list(self.running)):  # keeps the running order at the queue front
            self.preempt(seq)

    def postprocess(self, batch: Batch, token_ids: list[int], logprobs: list[float], version: int) -> list[StepOutput]:
        """Record computed KV, append sampled tokens, finish. A sampling item brings 1 + draft
        sampled tokens, in order: the draft is accepted while it equals them, then the first
        token that differs is taken too (speculative.py); a stop ends the sample there."""
        now, outs, k = time.perf_counter(), [], 0
        S, register = self.blocks.page_size, self.blocks.register if self.blocks.cache is not None else None
        for it in batch.items:
            seq = it.seq
            if seq.status is not SeqStatus.RUNNING:  # finished or aborted while the step ran (overlap)
                k += (1 + it.draft) * it.sample
                continue
            if not it.sample:
                self._computed(seq, it.start + it.q_len, register, S)
                continue
            toks, lps = token_ids[k: k + 1 + it.draft], logprobs[k: k + 1 + it.draft]
            k += 1 + it.draft
            new = accepted(seq.draft[: it.draft], toks)
            if it.draft:
                self.spec.add(it.draft, len(new) - 1)
            seq.draft = []
            seq.weight_version = version
            if seq.t_first_token is None:
                seq.t_first_token = now
            reason = None
            for i in range(len(new)):
                seq.token_ids.append(toks[i])
                seq.logprobs.append(lps[i])
                reason = self._finish_reason(seq)
                if reason is not None:
                    new = new[: i + 1]
                    break
            if reason is not None:
                self.finish(seq, reason, now)
            else:  # KV is valid up to the last accepted input; the rejected positions' is dropped
                self._computed(seq, it.start + it.q_len - it.draft + len(new) - 1, register, S)
                if it.draft:
                    self.blocks.trim(seq, seq.num_tokens)
            outs.append(self._output(seq, toks[: len(new)], lps[: len(new)]))
        return outs

    def _computed(self, seq: Sequence, done: int, register, S: int) -> None:
        seq.num_computed = done
        if register is not None and done >= (len(seq.page_hashes) + 1) * S:  # a page filled up
            register(seq)

    def _finish_reason(self, seq: Sequence) -> FinishReason | None:
        p = seq.params
        if seq.token_ids[-1] in seq.stop_ids:
            return FinishReason.STOP
        if p.stop_strings and self.detokenize is not None:
            # A new match must end in the newest token; a char is <= 4 bytes/tokens.
            window = 4 * max(len(s) for s in p.stop_strings) + 4
            text = self.detokenize(seq.completion_ids[-window:])
            if any(s in text for s in p.stop_strings):
                return FinishReason.STOP
        if seq.num_tokens - seq.prompt_len >= p.max_new_tokens:
            return FinishReason.LENGTH
        return None

    def finish(self, seq: Sequence, reason: FinishReason, now: float | None = None) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.blocks.free(seq)
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.t_finish = now if now is not None else time.perf_counter()

    def _output(self, seq: Sequence, toks: list[int], lps: list[float]) -> StepOutput:
        result = seq.to_result() if seq.status is SeqStatus.FINISHED else None
        return StepOutput(seq.request_id, seq.sample_index, toks, lps, result=result)

    def abort(self, request_id: str) -> list[StepOutput]:
        outs = []
        for seq in [s for s in (*self.running, *self.waiting) if s.request_id == request_id]:
            self.finish(seq, FinishReason.ABORT)
            outs.append(self._output(seq, [], []))
        return outs


class SpecCounts:
    """Speculative verify steps since the last `take` (drafts proposed and accepted per draft
    position), and totals since the start (`totals`: verify steps, draft tokens, accepted)."""

    def __init__(self):
        self.steps, self.proposed, self.accepted = 0, [], []
        self.totals = getattr(self, "totals", [0, 0, 0])

    def add(self, n_draft: int, n_accepted: int) -> None:
        grow = n_draft - len(self.proposed)
        self.proposed += [0] * grow
        self.accepted += [0] * grow
        for i in range(n_draft):
            self.proposed[i] += 1
            self.accepted[i] += i < n_accepted
        self.steps += 1
        self.totals = [self.totals[0] + 1, self.totals[1] + n_draft, self.totals[2] + n_accepted]

    def take(self) -> dict[str, float]:
        """engine/spec_* metrics (rates per draft position, tokens per verify step), then reset."""
        if not self.steps:
            return {}
        out = {f"engine/spec_accept_rate_{i + 1}": a / p for i, (a, p) in enumerate(zip(self.accepted, self.proposed))}
        out["engine/spec_accept_rate"] = sum(self.accepted) / sum(self.proposed)
        out["engine/spec_mean_accept_len"] = 1 + sum(self.accepted) / self.steps  # tokens per verify step
        self.__init__()
        return out


def accepted(draft: list[int], sampled: list[int]) -> list[int]:
    """The target's tokens a verify step keeps: sampled[i] is the target's choice after the
    first i draft tokens, so the draft is kept while it equals those choices, and the
    choice at the first mismatch (or after the whole draft) is kept too."""
    j = 0
    while j < len(draft) and draft[j] == sampled[j]:
        j += 1
    return sampled[: j + 1]
