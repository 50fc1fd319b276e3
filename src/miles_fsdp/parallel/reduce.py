"""Sums and maxima of host scalars over the ranks: the one way metrics, loss denominators and
collective decisions are reduced. Without a process group they return their input."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_sum(values: list[float], group=None) -> list[float]:
    """Element-wise sum over ranks, in float64 (exact for counts up to 2**53). Collective."""
    return _reduce(values, dist.ReduceOp.SUM, group)


def all_reduce_max(values: list[float], group=None) -> list[float]:
    """Element-wise maximum over ranks. Collective."""
    return _reduce(values, dist.ReduceOp.MAX, group)


def sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """In-place sum of a CPU tensor over ranks, returned (the advantage estimators' AllReduce)."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def _reduce(values: list[float], op, group) -> list[float]:
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size(group) > 1:  # one rank: nothing to exchange
        dist.all_reduce(t, op=op, group=group)
    return t.tolist()
