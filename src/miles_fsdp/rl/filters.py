"""DAPO sample filtering and reward shaping.

Dynamic sampling: a group whose n rewards are all equal has zero advantage under any
group baseline, so it carries no gradient; DAPO drops it and samples more prompts until
the batch holds the target number of informative groups.

Overlong shaping (DAPO eq. 13), with max length Lmax and a soft buffer of L tokens:
    penalty(len) = 0                              if len <= Lmax - L
                 = ((Lmax - L) - len) / L * f     if Lmax - L < len <= Lmax
                 = -f                             if len > Lmax
"""

import math
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class GroupFilterResult:
    keep_G: torch.Tensor
    """bool [G]: True for groups whose rewards are not all equal."""
    num_kept: int
    num_dropped: int
    groups_needed: int
    """Informative groups still missing to reach the target (0 when the batch is full)."""
    prompts_to_sample: int
    """Prompts to sample next to expect `groups_needed` more, at this batch's keep rate."""


def dynamic_sampling_filter(
    rewards_N: torch.Tensor, group_size: int, target_groups: int, atol: float = 0.0
) -> GroupFilterResult:
    """Keep groups with max(r) - min(r) > atol; report how many more prompts to sample.

    prompts_to_sample = ceil(groups_needed / keep_rate) with keep_rate = kept / G of this
    batch (if no group survived, the whole batch size G again is requested).
    """
    if rewards_N.dim() != 1 or group_size < 1 or rewards_N.numel() % group_size != 0:
        raise ValueError(f"rewards of shape {tuple(rewards_N.shape)} do not split into groups of n={group_size}")
    r_Gn = rewards_N.float().view(-1, group_size)
    keep_G = (r_Gn.max(dim=1).values - r_Gn.min(dim=1).values) > atol
    num_groups = r_Gn.shape[0]
    kept = int(keep_G.sum())
    needed = max(0, target_groups - kept)
    if needed == 0:
        to_sample = 0
    elif kept == 0:
        to_sample = max(num_groups, needed)
    else:
        to_sample = math.ceil(needed * num_groups / kept)
    return GroupFilterResult(keep_G, kept, num_groups - kept, needed, to_sample)


def expand_group_mask(keep_G: torch.Tensor, group_size: int) -> torch.Tensor:
    """bool [G] -> bool [N] selecting the samples of kept groups."""
    return keep_G.repeat_interleave(group_size)


def overlong_penalty(
    response_lens_N: torch.Tensor, max_len: int, buffer_len: int, factor: float = 1.0
) -> torch.Tensor:
    """DAPO soft overlong punishment (module docstring); add the result to the rewards."""
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"overlong buffer_len must be in (0, max_len={max_len}], got {buffer_len}")
    lens_N = response_lens_N.float()
    expected = max_len - buffer_len
    linear_N = (expected - lens_N) / buffer_len * factor
    penalty_N = torch.where(lens_N <= expected, torch.zeros_like(lens_N), linear_N)
    return torch.where(lens_N > max_len, torch.full_like(lens_N, -factor), penalty_N)
