"""Sequence packing: sequences -> micro-batches of at most `max_tokens` tokens, no padding.

Token alignment. Callers think per token: `TrainSeq.loss_mask[j] = 1` means token j is
trained (its log-prob is in the loss), and `fields[name][j]` is a value of token j (e.g. its
advantage or rollout log-prob). The model at position i predicts token i+1, so packing
shifts everything left by one inside each sequence:

    tokens   t0 t1 t2 t3 | u0 u1 u2        (two sequences, cu_seqlens = [0, 4, 7])
    ids_T    t0 t1 t2 t3   u0 u1 u2
    targets  t1 t2 t3 0    u1 u2 0         (last position of a sequence predicts nothing)
    mask_T   m1 m2 m3 0    n1 n2 0

`logp_T[i]` from the trainer is then the log-prob of `targets_T[i]`; `unpack` turns a
per-position tensor back into per-sequence token-aligned lists (entry 0 of each is 0).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import torch


@dataclass
class TrainSeq:
    """One training sequence (prompt + response), token-aligned.

    tokens: [n] token ids. loss_mask: [n] 1/0 per token, None = every token but the first.
    fields: per-token float values for the loss function, each of length n.
    """

    tokens: list[int]
    loss_mask: list[int] | None = None
    fields: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class MicroBatch:
    """Sequences packed into one row of T tokens.

    ids_T, pos_T, targets_T: int64 [T]. mask_T: fp32 [T] (1 = target trained).
    cu_seqlens: int32 [B+1]. seq_index: [B] index of each sequence in the list given to `pack`.
    fields: name -> fp32 [T], shifted like the targets.
    weight_T: fp32 [T] per-token loss weight, set by `loss.assign_weights` before a step
    (mask_T times the normalisation's per-token factor). dummy: padding micro-batch that only
    keeps collectives in step across ranks; it never reaches the loss function.
    """

    ids_T: torch.Tensor
    pos_T: torch.Tensor
    targets_T: torch.Tensor
    mask_T: torch.Tensor
    cu_seqlens: torch.Tensor
    seq_index: list[int]
    fields: dict[str, torch.Tensor] = field(default_factory=dict)
    weight_T: torch.Tensor | None = None
    dummy: bool = False

    @property
    def num_tokens(self) -> int:
        return int(self.ids_T.numel())


def first_fit_decreasing(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Bins of sequence indices with total length <= max_tokens. Deterministic: longest
    first, ties by index; each bin lists its indices in ascending order."""
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise ValueError(
                f"sequence {i} has {n} tokens, more than max_tokens_per_micro_batch={max_tokens}; "
                f"raise the budget or truncate the data"
            )
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for b in range(len(bins)):
            if room[b] >= lengths[i]:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return [sorted(b) for b in bins]


def _shifted(parts: list[torch.Tensor], ends: torch.Tensor, fill: float) -> torch.Tensor:
    """The concatenated per-sequence values moved one token left, `fill` at each sequence's last
    token (the targets' alignment)."""
    out = torch.cat(parts).roll(-1)
    out[ends] = fill
    return out


def _collate(seqs: list[TrainSeq], index: list[int]) -> MicroBatch:
    names = sorted(seqs[index[0]].fields) if index else []
    lens = [len(seqs[i].tokens) for i in index]
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int64)
    ends = cu[1:] - 1
    tokens = [torch.tensor(seqs[i].tokens, dtype=torch.int64) for i in index]
    masks = [torch.tensor(seqs[i].loss_mask, dtype=torch.float32) if seqs[i].loss_mask is not None
             else torch.ones(n, dtype=torch.float32) for i, n in zip(index, lens)]
    T = int(cu[-1])
    return MicroBatch(
        ids_T=torch.cat(tokens) if tokens else torch.zeros(0, dtype=torch.int64),
        pos_T=torch.arange(T, dtype=torch.int64) - torch.repeat_interleave(cu[:-1], torch.tensor(lens, dtype=torch.int64)),
        targets_T=_shifted(tokens, ends, 0) if tokens else torch.zeros(0, dtype=torch.int64),
        mask_T=_shifted(masks, ends, 0.0) if masks else torch.zeros(0),
        cu_seqlens=cu.to(torch.int32),
        seq_index=list(index),
        fields={k: _shifted([torch.tensor(seqs[i].fields[k], dtype=torch.float32) for i in index], ends, 0.0)
                for k in names},
    )


def _check(seqs: list[TrainSeq]) -> None:
    names = sorted(seqs[0].fields) if seqs else []
    for i, s in enumerate(seqs):
        n = len(s.tokens)
        if n < 2:
            raise ValueError(f"sequence {i} has {n} token(s); training needs at least 2 (a token and its target)")
        if s.loss_mask is not None and len(s.loss_mask) != n:
            raise ValueError(f"sequence {i}: loss_mask has {len(s.loss_mask)} entries for {n} tokens")
        if sorted(s.fields) != names:
            raise ValueError(f"sequence {i}: fields {sorted(s.fields)} differ from sequence 0's {names}")
        for k, v in s.fields.items():
            if len(v) != n:
                raise ValueError(f"sequence {i}: field {k!r} has {len(v)} entries for {n} tokens")


def pack(seqs: list[TrainSeq], max_tokens: int) -> list[MicroBatch]:
    """Pack `seqs` into micro-batches of at most `max_tokens` tokens (first-fit decreasing)."""
    _check(seqs)
    return [_collate(seqs, b) for b in first_fit_decreasing([len(s.tokens) for s in seqs], max_tokens)]


def pinned(mb: MicroBatch) -> MicroBatch:
    """mb with its per-token tensors in pinned host memory (cu_seqlens stays as it is: the host
    reads it), so `.to(device, non_blocking=True)` copies without waiting for the GPU's queue:
    a pageable copy issued after the trunk's forward would hold the host until that forward
    ends, and the GPU would idle while the host then queues the loss and the backward. Needs
    CUDA; the values and the dataclass's other fields are mb's."""
    pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
    return dataclasses.replace(mb, ids_T=pin(mb.ids_T), pos_T=pin(mb.pos_T), targets_T=pin(mb.targets_T),
                               mask_T=pin(mb.mask_T), weight_T=pin(mb.weight_T),
                               fields={k: pin(v) for k, v in mb.fields.items()})


def dummy_like(mb: MicroBatch | None) -> MicroBatch:
    """A 2-token micro-batch with zero mask: run on ranks that have fewer micro-batches than
    others so every rank issues the same FSDP collectives."""
    fields = {k: torch.zeros(2) for k in (mb.fields if mb is not None else {})}
    return MicroBatch(
        ids_T=torch.zeros(2, dtype=torch.int64), pos_T=torch.arange(2), targets_T=torch.zeros(2, dtype=torch.int64),
        mask_T=torch.zeros(2), cu_seqlens=torch.tensor([0, 2], dtype=torch.int32), seq_index=[],
        fields=fields, weight_T=torch.zeros(2), dummy=True,
    )


def unpack(mb: MicroBatch, x_T: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per-position values -> {sequence index: token-aligned [n] tensor}; entry 0 is 0
    (the first token has no prediction)."""
    out = {}
    for b, i in enumerate(mb.seq_index):
        lo, hi = int(mb.cu_seqlens[b]), int(mb.cu_seqlens[b + 1])
        out[i] = torch.cat([x_T.new_zeros(1), x_T[lo : hi - 1]])
    return out
