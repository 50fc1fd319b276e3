"""Per-token KL(pi || ref) estimators from samples drawn from pi (Schulman, "Approximating KL").

With log r = logp_ref - logp (per sampled token):
    k1 = -log r                    unbiased, high variance, can be negative
    k2 = (log r)^2 / 2             biased, low variance, its gradient is the KL gradient
    k3 = (r - 1) - log r           unbiased, low variance, always >= 0
As a loss term, `kl_estimate(...)` keeps the gradient w.r.t. `logp_NL`; as a reward
penalty (`kl_reward_penalty`) it is detached and scaled by -coef.
"""

from typing import Literal

import torch

KLKind = Literal["k1", "k2", "k3"]


def kl_estimate(
    logp_NL: torch.Tensor, ref_logp_NL: torch.Tensor, kind: KLKind = "k3", clamp: float | None = 20.0
) -> torch.Tensor:
    """Per-token KL estimate, any shape; `clamp` bounds log r before exp (k3 overflows otherwise)."""
    log_r = ref_logp_NL.float() - logp_NL.float()
    if clamp is not None:
        log_r = log_r.clamp(-clamp, clamp)
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r * log_r
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of 'k1', 'k2', 'k3'")


def kl_reward_penalty(
    logp_NL: torch.Tensor, ref_logp_NL: torch.Tensor, mask_NL: torch.Tensor, coef: float, kind: KLKind = "k1"
) -> torch.Tensor:
    """Per-token reward term -coef * KL_t on loss tokens, no gradient (REINFORCE++ KL-in-reward)."""
    kl_NL = kl_estimate(logp_NL.detach(), ref_logp_NL.detach(), kind)
    return -coef * kl_NL * mask_NL.float()
