"""Advantage estimators: pure functions over rewards and response masks.

Shapes: N samples in a rollout batch, in G = N / n groups of n samples each (the n
responses of one prompt are contiguous: sample i belongs to group i // n). Token-level
tensors are padded [N, L] (L = longest response) with `mask_NL` 1.0 on loss tokens.

Every estimator returns token-level advantages `adv_NL` (zero where mask is 0), so the
policy loss never needs to know which estimator produced them.

| estimator            | per-sample / per-token advantage                                   |
| -------------------- | ------------------------------------------------------------------ |
| grpo                 | (r_i - mean_g) / (std_g + eps)     (std_g unbiased, skip if off)   |
| dr_grpo              | r_i - mean_g   (pair with the "constant" loss aggregation)        |
| rloo                 | r_i - mean_{j != i in g} r_j  =  n/(n-1) * (r_i - mean_g)          |
| reinforce_pp         | whiten over all tokens of all ranks of G_t = sum_{s>=t} rew_s      |
| reinforce_pp_baseline| reinforce_pp with rew_final = r_i - mean_g                         |

GSPO uses GRPO advantages; its sequence-level ratio lives in `losses.gspo_loss`.
"""

from collections.abc import Callable

import torch

AllReduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over data-parallel ranks and returns it (in place is fine), e.g.
`lambda t: (dist.all_reduce(t), t)[1]`. The default is the single-process identity."""


def _single_process(t: torch.Tensor) -> torch.Tensor:
    return t


def _groups(rewards_N: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] -> [G, n]; errors name the mismatch instead of a reshape failure."""
    if rewards_N.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards_N.shape)}")
    if group_size < 1 or rewards_N.numel() % group_size != 0:
        raise ValueError(
            f"{rewards_N.numel()} rewards do not split into groups of n={group_size}; "
            "each prompt must contribute exactly n contiguous samples"
        )
    return rewards_N.float().view(-1, group_size)


def to_tokens(adv_N: torch.Tensor, mask_NL: torch.Tensor) -> torch.Tensor:
    """Broadcast one advantage per sample over its response tokens: adv_NL = adv_N[:, None] * mask."""
    return adv_N[:, None].float() * mask_NL.float()


def grpo_advantages(
    rewards_N: torch.Tensor, group_size: int, norm_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO: A_i = (r_i - mean_g) / (std_g + eps), std unbiased (as verl/TRL); -> adv_N.

    With `norm_std=False` this is Dr.GRPO's A_i = r_i - mean_g.
    """
    r_Gn = _groups(rewards_N, group_size)
    adv_Gn = r_Gn - r_Gn.mean(dim=1, keepdim=True)
    if norm_std:
        if group_size < 2:
            raise ValueError("GRPO std normalisation needs n >= 2 samples per prompt; set n >= 2 or norm_std=False")
        adv_Gn = adv_Gn / (r_Gn.std(dim=1, keepdim=True) + eps)
    return adv_Gn.reshape(-1)


def dr_grpo_advantages(rewards_N: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr.GRPO: A_i = r_i - mean_g (no std division; aggregate the loss with "constant")."""
    return grpo_advantages(rewards_N, group_size, norm_std=False)


def rloo_advantages(rewards_N: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: A_i = r_i - (sum_g - r_i) / (n - 1), the mean of the other samples of the group."""
    if group_size < 2:
        raise ValueError("RLOO needs n >= 2 samples per prompt (the baseline leaves one out)")
    r_Gn = _groups(rewards_N, group_size)
    baseline_Gn = (r_Gn.sum(dim=1, keepdim=True) - r_Gn) / (group_size - 1)
    return (r_Gn - baseline_Gn).reshape(-1)


def masked_whiten(
    x_NL: torch.Tensor, mask_NL: torch.Tensor, eps: float = 1e-8, all_reduce: AllReduce = _single_process
) -> torch.Tensor:
    """(x - mean) / (std + eps) over the masked tokens of every rank; std is the population std.

    Sums, squared sums and counts are reduced in one all_reduce call, so every rank sees
    the same global statistics.
    """
    mask_NL = mask_NL.float()
    x_NL = x_NL.float()
    stats_3 = torch.stack([(x_NL * mask_NL).sum(), (x_NL * x_NL * mask_NL).sum(), mask_NL.sum()])
    total, total_sq, count = all_reduce(stats_3.double()).tolist()
    if count == 0:
        raise ValueError("cannot normalise advantages: the batch has no loss tokens on any rank")
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0)
    return (x_NL - mean) / (var**0.5 + eps) * mask_NL


def reinforce_pp_advantages(
    rewards_N: torch.Tensor,
    mask_NL: torch.Tensor,
    kl_NL: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    eps: float = 1e-8,
    all_reduce: AllReduce = _single_process,
) -> torch.Tensor:
    """REINFORCE++: token rewards, undiscounted returns, global whitening; -> adv_NL.

    rew_t = -kl_coef * kl_t  (+ r_i on the last loss token of sample i)
    G_t   = sum_{s >= t} rew_s            (gamma = 1, over loss tokens only)
    A_t   = (G_t - mean(G)) / (std(G) + eps), statistics over all loss tokens of all ranks.
    `kl_NL` is a per-token KL estimate (see `kl.kl_estimate`), treated as a constant.
    """
    mask_NL = mask_NL.float()
    lengths_N = mask_NL.sum(dim=1)
    if (lengths_N == 0).any():
        bad = (lengths_N == 0).nonzero().flatten().tolist()
        raise ValueError(f"samples {bad} have no loss tokens; REINFORCE++ places the reward on the last loss token")
    rew_NL = torch.zeros_like(mask_NL)
    if kl_NL is not None and kl_coef != 0.0:
        rew_NL = rew_NL - kl_coef * kl_NL.detach().float() * mask_NL
    # last loss token: highest position whose mask is 1
    pos_NL = torch.arange(mask_NL.shape[1], device=mask_NL.device).expand_as(mask_NL)
    last_N = torch.where(mask_NL > 0, pos_NL, -1).max(dim=1).values
    rew_NL[torch.arange(mask_NL.shape[0]), last_N] += rewards_N.float()
    # reverse cumulative sum = return-to-go
    returns_NL = rew_NL.flip(1).cumsum(1).flip(1) * mask_NL
    return masked_whiten(returns_NL, mask_NL, eps=eps, all_reduce=all_reduce)


def reinforce_pp_baseline_advantages(
    rewards_N: torch.Tensor,
    group_size: int,
    mask_NL: torch.Tensor,
    kl_NL: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    eps: float = 1e-8,
    all_reduce: AllReduce = _single_process,
) -> torch.Tensor:
    """REINFORCE++-baseline: r_i - mean_g, then REINFORCE++ (returns + global whitening)."""
    centred_N = dr_grpo_advantages(rewards_N, group_size)
    return reinforce_pp_advantages(centred_N, mask_NL, kl_NL, kl_coef, eps, all_reduce)
