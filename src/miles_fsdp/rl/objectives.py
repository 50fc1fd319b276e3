"""Policy objectives as per-token terms: PPO clip (with DAPO clip-higher and dual clip),
GSPO's sequence-level ratio, and the per-token loss with entropy bonus and KL to the
reference. Pure functions over padded [N, L] tensors with a loss mask; how the per-token
losses are summed and normalised over the global batch is train/loss.py's job (the
trainer's LossNorm, which RLConfig.loss_norm derives from algo.aggregation).
"""

from typing import Literal

import torch

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "constant"]
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "constant")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _clip_objective(
    ratio: torch.Tensor,
    adv: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-min(r A, clip(r, 1-eps_low, 1+eps_high) A), dual clip: max(that, -c A) for A < 0."""
    if not (0.0 <= eps_low < 1.0 and eps_high >= 0.0):
        raise ValueError(f"clip range needs 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    unclipped = -ratio * adv
    clipped = -ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    loss = torch.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    if dual_clip_c is not None:
        if dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1 (typically 3), got {dual_clip_c}")
        # for negative advantages cap the loss at -c*A = c*|A| so huge ratios cannot dominate
        capped = torch.minimum(loss, -dual_clip_c * adv)
        is_clipped = is_clipped | ((adv < 0) & (capped < loss))
        loss = torch.where(adv < 0, capped, loss)
    return loss, is_clipped


def _stats(log_ratio, ratio, is_clipped, mask) -> dict[str, torch.Tensor]:
    masked_ratio = torch.where(mask > 0, ratio, torch.zeros_like(ratio))
    return {
        "clip_frac": _masked_mean(is_clipped.float(), mask).detach(),
        "ratio_mean": _masked_mean(ratio, mask).detach(),
        "ratio_max": masked_ratio.max().detach(),
        # k3 estimate of KL(pi_old || pi) from tokens sampled by pi_old
        "approx_kl": _masked_mean(torch.expm1(log_ratio) - log_ratio, mask).detach(),
    }


def ppo_clip_loss(
    logp_NL: torch.Tensor,
    old_logp_NL: torch.Tensor,
    adv_NL: torch.Tensor,
    mask_NL: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level PPO clip; -> (loss_NL zero off-mask, stats).

    r_t = exp(logp_t - old_logp_t);  l_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t)
    eps_high > eps_low is DAPO's clip-higher; dual clip (Ye et al.) bounds l_t <= c |A_t| when A_t < 0.
    """
    mask_NL = mask_NL.float()
    log_ratio_NL = (logp_NL.float() - old_logp_NL.float()) * mask_NL
    ratio_NL = torch.exp(log_ratio_NL)
    loss_NL, clipped_NL = _clip_objective(ratio_NL, adv_NL.float(), eps_low, eps_high, dual_clip_c)
    return loss_NL * mask_NL, _stats(log_ratio_NL.detach(), ratio_NL.detach(), clipped_NL, mask_NL)


def gspo_loss(
    logp_NL: torch.Tensor,
    old_logp_NL: torch.Tensor,
    adv_NL: torch.Tensor,
    mask_NL: torch.Tensor,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO: one importance ratio per sequence, clipped at sequence level; -> (loss_NL, stats).

    s_i = exp( (1/|y_i|) sum_t (logp_it - old_logp_it) )
    l_it = -min(s_i A_it, clip(s_i, 1 - eps_low, 1 + eps_high) A_it) on every loss token of i
    With GRPO advantages (constant over the sequence) and "seq-mean-token-mean" aggregation
    this is exactly the GSPO objective; the default eps are the paper's.
    """
    mask_NL = mask_NL.float()
    tokens_N = mask_NL.sum(dim=1).clamp(min=1.0)
    log_ratio_NL = (logp_NL.float() - old_logp_NL.float()) * mask_NL
    seq_log_ratio_N = log_ratio_NL.sum(dim=1) / tokens_N
    ratio_NL = torch.exp(seq_log_ratio_N)[:, None].expand_as(mask_NL)
    loss_NL, clipped_NL = _clip_objective(ratio_NL, adv_NL.float(), eps_low, eps_high, None)
    stats = _stats(log_ratio_NL.detach(), ratio_NL.detach(), clipped_NL, mask_NL)
    return loss_NL * mask_NL, stats


def token_loss(
    pg_loss_NL: torch.Tensor,
    mask_NL: torch.Tensor,
    entropy_NL: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    kl_NL: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """l_t = pg_t - entropy_coef * H_t + kl_coef * KL_t on loss tokens (entropy bonus, KL loss).

    Entropy is only a loss term when entropy_coef != 0 (RLLoss logs it regardless).
    """
    mask_NL = mask_NL.float()
    loss_NL = pg_loss_NL
    if entropy_coef != 0.0:
        if entropy_NL is None:
            raise ValueError("entropy_coef is set but no entropy was computed; request entropy from mk.logprobs")
        loss_NL = loss_NL - entropy_coef * entropy_NL.float()
    if kl_coef != 0.0:
        if kl_NL is None:
            raise ValueError("kl_coef is set but no KL was given; compute it with kl.kl_estimate vs the reference")
        loss_NL = loss_NL + kl_coef * kl_NL.float()
    return loss_NL * mask_NL
