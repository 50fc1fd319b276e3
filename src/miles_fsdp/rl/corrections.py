"""Train/rollout mismatch: statistics and importance-sampling corrections (fast mode only).

In invariant mode the trainer's logprobs equal the rollout's and none of this is needed
(the weights are exactly 1). In fast mode the rollout policy mu (engine kernels) and the
trainer's pi_old differ slightly; with log rho_t = old_logp_t - rollout_logp_t:
    token level:      rho_t
    sequence level:   rho_i = exp(sum_t log rho_t)          (product of token ratios)
    geometric level:  rho_i = exp(mean_t log rho_t)         (length-normalised)
TIS multiplies the per-token loss by min(rho, C) (truncated IS); MIS keeps only tokens or
sequences with lo <= rho <= hi (masked IS). Both return detached weights [N, L] to
multiply into the per-token policy loss before `losses.aggregate`.
"""

import math
from typing import Literal

import torch

Level = Literal["token", "sequence", "geometric"]


def mismatch_stats(
    train_logp_NL: torch.Tensor, rollout_logp_NL: torch.Tensor, mask_NL: torch.Tensor
) -> dict[str, float]:
    """abs-diff max/mean and KL(mu || pi_old) estimates (k1 and k3) over loss tokens."""
    mask_NL = mask_NL.float()
    count = mask_NL.sum().clamp(min=1.0)
    log_rho_NL = (train_logp_NL.float() - rollout_logp_NL.float()) * mask_NL
    abs_diff_NL = log_rho_NL.abs()
    return {
        "logprob_abs_diff_max": float(abs_diff_NL.max()) if mask_NL.any() else 0.0,
        "logprob_abs_diff_mean": float(abs_diff_NL.sum() / count),
        # tokens were sampled from mu, so log(mu/pi) = -log_rho
        "kl_k1": float((-log_rho_NL).sum() / count),
        "kl_k3": float(((torch.expm1(log_rho_NL) - log_rho_NL) * mask_NL).sum() / count),
    }


def _log_ratio(train_logp_NL, rollout_logp_NL, mask_NL, level: Level) -> torch.Tensor:
    """log rho at the requested level, broadcast to [N, L]."""
    mask_NL = mask_NL.float()
    log_rho_NL = (train_logp_NL.detach().float() - rollout_logp_NL.float()) * mask_NL
    if level == "token":
        return log_rho_NL
    if level == "sequence":
        return log_rho_NL.sum(dim=1, keepdim=True).expand_as(log_rho_NL)
    if level == "geometric":
        mean_N1 = log_rho_NL.sum(dim=1, keepdim=True) / mask_NL.sum(dim=1, keepdim=True).clamp(min=1.0)
        return mean_N1.expand_as(log_rho_NL)
    raise ValueError(f"unknown importance-sampling level {level!r}; expected 'token', 'sequence' or 'geometric'")


def tis_weights(
    train_logp_NL: torch.Tensor,
    rollout_logp_NL: torch.Tensor,
    mask_NL: torch.Tensor,
    cap: float = 2.0,
    level: Level = "token",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated IS: w = min(rho, cap) on loss tokens, 0 elsewhere; -> (w_NL, stats)."""
    if cap <= 0:
        raise ValueError(f"TIS cap must be positive (typically 2), got {cap}")
    mask_NL = mask_NL.float()
    log_rho_NL = _log_ratio(train_logp_NL, rollout_logp_NL, mask_NL, level)
    # clamp in log space: a sequence product can overflow exp
    log_cap = math.log(cap)
    w_NL = torch.exp(log_rho_NL.clamp(max=log_cap)) * mask_NL
    truncated = ((log_rho_NL > log_cap) & (mask_NL > 0)).float()
    return w_NL, {"tis_truncated_frac": float(truncated.sum() / mask_NL.sum().clamp(min=1.0))}


def mis_mask(
    train_logp_NL: torch.Tensor,
    rollout_logp_NL: torch.Tensor,
    mask_NL: torch.Tensor,
    lo: float = 0.5,
    hi: float = 2.0,
    level: Level = "token",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Masked IS: keep_NL = mask * [lo <= rho <= hi] (whole sequences at sequence levels); -> (keep, stats)."""
    if not 0 <= lo < 1 < hi:
        raise ValueError(f"MIS bounds must satisfy 0 <= lo < 1 < hi, got lo={lo}, hi={hi}")
    mask_NL = mask_NL.float()
    log_rho_NL = _log_ratio(train_logp_NL, rollout_logp_NL, mask_NL, level)
    rho_NL = torch.exp(log_rho_NL)
    keep_NL = ((rho_NL >= lo) & (rho_NL <= hi)).float() * mask_NL
    dropped = float((mask_NL - keep_NL).sum() / mask_NL.sum().clamp(min=1.0))
    return keep_NL, {"mis_dropped_frac": dropped}
