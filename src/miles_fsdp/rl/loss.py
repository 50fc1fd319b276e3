"""RLLoss: the RL training loss over packed micro-batches, and the on-policy check.

True on-policy costs no extra forward: the training forward (the first optimizer step after
a rollout, weights unchanged) already gives the log-probs the engine recorded. RLLoss
compares them there, token by token; the loop asserts the max abs difference is 0.0 in
invariant mode. In fast mode that difference is the mismatch the correction (TIS/MIS) acts
on, and the PPO ratio is taken against the trainer's own (detached) log-probs, as in
decoupled PPO. Per-token objectives are in rl/objectives.py; normalisation is the trainer's.
"""

from __future__ import annotations

import torch

from miles_fsdp.rl.config import AlgoConfig
from miles_fsdp.rl.corrections import mis_mask, tis_weights
from miles_fsdp.rl.kl import kl_estimate
from miles_fsdp.rl.objectives import gspo_loss, ppo_clip_loss, token_loss
from miles_fsdp.train.packing import MicroBatch
from miles_fsdp.train.scoring import ScoringSpec


class RLLoss:
    """loss_fn(logp_T, entropy_T, mb) for Trainer.train_step, with the on-policy check.

    Collects, over the micro-batches of a step: max |trainer logp - rollout logp| on loss
    tokens (`diff_max`), and token sums for clip fraction, entropy, KL and IS statistics.
    """

    def __init__(self, algo: AlgoConfig, spec: ScoringSpec):
        self.algo = algo
        self.fast = spec.kernel_mode == "fast"
        self.diff_max = torch.zeros(())
        self.sums: dict[str, torch.Tensor] = {}

    def _add(self, name: str, value_T: torch.Tensor, mask_T: torch.Tensor) -> None:
        # on the device: a .cpu() here would wait for the forward before the backward is queued
        v = (value_T.detach().float() * mask_T).sum()
        self.sums[name] = self.sums[name] + v if name in self.sums else v

    def __call__(self, logp_T: torch.Tensor, ent_T: torch.Tensor | None, mb: MicroBatch):
        dev = logp_T.device
        # non-blocking: the trainer pins the micro-batch (packing.pinned), so no copy waits for the forward
        mask_T = mb.mask_T.to(dev, non_blocking=True)
        w_T = mb.weight_T.to(dev, non_blocking=True)
        adv_T = mb.fields["adv"].to(dev, non_blocking=True)
        rollout_T = mb.fields["rollout_logp"].to(dev, non_blocking=True)
        # off the loss mask (prompt tokens) a truncated (top-k/top-p) log-prob may be -inf
        logp_T = torch.where(mask_T > 0, logp_T, torch.zeros_like(logp_T))
        diff_T = (logp_T.detach() - rollout_T).abs() * mask_T
        self.diff_max = torch.maximum(self.diff_max.to(dev), diff_T.max())
        self._add("diff_sum", diff_T, mask_T)
        self._add("tokens", torch.ones_like(mask_T), mask_T)
        # the policy that sampled (invariant: identical to the trainer's) / proximal policy (fast)
        old_T = logp_T.detach() if self.fast else rollout_T
        seg = lambda x: _segments(mb, x)  # noqa: E731
        mask_BL = seg(mask_T)
        if self.algo.advantage == "gspo":
            pg_BL, stats = gspo_loss(seg(logp_T), seg(old_T), seg(adv_T), mask_BL, self.algo.eps_low, self.algo.eps_high)
        else:
            pg_BL, stats = ppo_clip_loss(seg(logp_T), seg(old_T), seg(adv_T), mask_BL,
                                         self.algo.eps_low, self.algo.eps_high, self.algo.dual_clip_c)
        pg_T = _unsegment(mb, pg_BL)
        if self.fast and self.algo.correction != "none":
            pg_T = pg_T * self._correction(logp_T, rollout_T, mb, mask_T)
        kl_T = None
        if self.algo.kl_coef:
            kl_T = kl_estimate(logp_T, mb.fields["ref_logp"].to(dev, non_blocking=True), self.algo.kl_estimator)
            self._add("kl", kl_T, mask_T)
        loss_T = token_loss(pg_T, mask_T, ent_T, self.algo.entropy_coef, kl_T, self.algo.kl_coef)
        if ent_T is not None:
            self._add("entropy", ent_T, mask_T)
        self._add("clipped", stats["clip_frac"] * mask_T.sum(), torch.ones((), device=dev))
        return (loss_T * w_T).sum(), {}

    def _correction(self, logp_T, rollout_T, mb, mask_T) -> torch.Tensor:
        seg = lambda x: _segments(mb, x)  # noqa: E731
        level = self.algo.correction_level
        if self.algo.correction == "tis":
            w_BL, _ = tis_weights(seg(logp_T.detach()), seg(rollout_T), seg(mask_T), self.algo.tis_cap, level)
        else:
            w_BL, _ = mis_mask(seg(logp_T.detach()), seg(rollout_T), seg(mask_T),
                               self.algo.mis_low, self.algo.mis_high, level)
        w_T = _unsegment(mb, w_BL)
        self._add("is_weight", w_T, mask_T)
        return w_T


def _segments(mb: MicroBatch, x_T: torch.Tensor) -> torch.Tensor:
    """Packed [T] -> padded [B, Lmax] per sequence (zeros after each sequence's end)."""
    cu = mb.cu_seqlens.tolist()
    L = max(b - a for a, b in zip(cu[:-1], cu[1:]))
    out = x_T.new_zeros(len(cu) - 1, L)
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        out[i, : b - a] = x_T[a:b]
    return out


def _unsegment(mb: MicroBatch, x_BL: torch.Tensor) -> torch.Tensor:
    cu = mb.cu_seqlens.tolist()
    return torch.cat([x_BL[i, : b - a] for i, (a, b) in enumerate(zip(cu[:-1], cu[1:]))])
