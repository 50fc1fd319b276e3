"""From scored samples to a training step: advantages, TrainSeqs, and the loss function.

True on-policy costs no extra forward: the trainer's forward that computes the loss (the
first optimizer step after a rollout, weights unchanged) already gives the log-probs the
engine recorded. `RLLoss` compares them there, token by token, and the loop asserts the
max abs difference is 0.0 in invariant mode. In fast mode that difference is the
mismatch the correction (TIS/MIS) acts on, and the PPO ratio is taken against the trainer's
own (detached) log-probs, as in decoupled PPO.
"""

from __future__ import annotations

import torch

from miles_fsdp.data.sample import Sample
from miles_fsdp.rl import advantages as adv_lib
from miles_fsdp.rl.config import AlgoConfig
from miles_fsdp.rl.corrections import mis_mask, tis_weights
from miles_fsdp.rl.kl import kl_estimate, kl_reward_penalty
from miles_fsdp.rl.losses import gspo_loss, ppo_clip_loss, token_loss
from miles_fsdp.train.packing import MicroBatch, TrainSeq


def padded_masks(samples: list[Sample]) -> torch.Tensor:
    """Response loss masks as fp32 [N, L] (L = longest response)."""
    L = max((s.response_length for s in samples), default=0)
    mask_NL = torch.zeros(len(samples), max(L, 1))
    for i, s in enumerate(samples):
        mask_NL[i, : s.response_length] = torch.tensor(s.loss_mask, dtype=torch.float32)
    return mask_NL


def kl_penalties(samples: list[Sample], ref_logps: list[list[float]], algo: AlgoConfig) -> torch.Tensor:
    """Per-token penalty [N, L] = kl_reward_coef * KL_t on loss tokens, KL_t = logp_t - ref_logp_t
    (k1, from the rollout's log-probs): what KL-in-reward subtracts from the rewards."""
    mask_NL = padded_masks(samples)
    logp_NL, ref_NL = torch.zeros_like(mask_NL), torch.zeros_like(mask_NL)
    for i, (s, ref) in enumerate(zip(samples, ref_logps)):
        logp_NL[i, : s.response_length] = torch.tensor(s.response_logprobs, dtype=torch.float32)
        ref_NL[i, : s.response_length] = torch.tensor(ref, dtype=torch.float32)
    return -kl_reward_penalty(logp_NL, ref_NL, mask_NL, algo.kl_reward_coef, "k1")


def compute_advantages(samples: list[Sample], n: int, algo: AlgoConfig, all_reduce=None,
                       kl_penalty_NL: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token advantages [N, L] over the response tokens (0 off the loss mask).

    kl_penalty_NL (from `kl_penalties`) folds KL into the reward: REINFORCE++ takes it
    per token (rew_t = -penalty_t, returns to go); outcome estimators (GRPO, Dr.GRPO, RLOO,
    GSPO) take each sample's sum, r_i - sum_t penalty_t, before the group baseline.
    """
    rewards_N = torch.tensor([float(s.reward) for s in samples])
    mask_NL = padded_masks(samples)
    kw = {"all_reduce": all_reduce} if all_reduce is not None else {}
    if kl_penalty_NL is not None:
        if algo.advantage in ("reinforce_pp", "reinforce_pp_baseline"):
            kw.update(kl_NL=kl_penalty_NL, kl_coef=1.0)
        else:
            rewards_N = rewards_N - (kl_penalty_NL * mask_NL).sum(1)
    if algo.advantage in ("grpo", "gspo"):
        a_N = adv_lib.grpo_advantages(rewards_N, n, norm_std=algo.std_normalize)
    elif algo.advantage == "dr_grpo":
        a_N = adv_lib.dr_grpo_advantages(rewards_N, n)
    elif algo.advantage == "rloo":
        a_N = adv_lib.rloo_advantages(rewards_N, n)
    elif algo.advantage == "reinforce_pp":
        return adv_lib.reinforce_pp_advantages(rewards_N, mask_NL, **kw) * mask_NL
    else:
        return adv_lib.reinforce_pp_baseline_advantages(rewards_N, n, mask_NL, **kw) * mask_NL
    return adv_lib.to_tokens(a_N, mask_NL)


def to_train_seqs(samples: list[Sample], adv_NL: torch.Tensor | None = None,
                  ref_logps: list[list[float]] | None = None) -> list[TrainSeq]:
    """prompt + response tokens; loss only on the response's model tokens. Fields per token:
    adv (if given), rollout_logp, ref_logp (if given, one value per response token)."""
    seqs = []
    for i, s in enumerate(samples):
        P, R = len(s.prompt_ids), s.response_length
        fields = {"rollout_logp": [0.0] * P + list(s.response_logprobs)}
        if adv_NL is not None:
            fields["adv"] = [0.0] * P + adv_NL[i, :R].tolist()
        if ref_logps is not None:
            fields["ref_logp"] = [0.0] * P + list(ref_logps[i])
        seqs.append(TrainSeq(list(s.prompt_ids) + list(s.response_ids), [0] * P + list(s.loss_mask), fields))
    return seqs


def _segments(mb: MicroBatch, x_T: torch.Tensor) -> torch.Tensor:
    """Packed [T] -> padded [B, Lmax] per sequence (zeros after each sequence's end)."""
    cu = mb.cu_seqlens.tolist()
    L = max(b - a for a, b in zip(cu[:-1], cu[1:]))
    out = x_T.new_zeros(len(cu) - 1, L)
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        out[i, : b - a] = x_T[a:b]
    return out


class RLLoss:
    """loss_fn(logp_T, entropy_T, mb) for Trainer.train_step, with the on-policy check.

    Collects, over the micro-batches of a step: max |trainer logp - rollout logp| on loss
    tokens (`diff_max`), and token sums for clip fraction, entropy, KL and IS statistics.
    """

    def __init__(self, algo: AlgoConfig, fast_mode: bool, first_step_after_rollout: bool = True):
        self.algo = algo
        self.fast = fast_mode
        self.check = first_step_after_rollout
        self.diff_max = torch.zeros(())
        self.sums: dict[str, torch.Tensor] = {}

    def _add(self, name: str, value_T: torch.Tensor, mask_T: torch.Tensor) -> None:
        v = (value_T.detach().float() * mask_T).sum().cpu()
        self.sums[name] = self.sums.get(name, torch.zeros(())) + v

    def __call__(self, logp_T: torch.Tensor, ent_T: torch.Tensor | None, mb: MicroBatch):
        dev = logp_T.device
        mask_T = mb.mask_T.to(dev)
        w_T = mb.weight_T.to(dev)
        adv_T = mb.fields["adv"].to(dev)
        rollout_T = mb.fields["rollout_logp"].to(dev)
        # off the loss mask (prompt tokens) a truncated (top-k/top-p) log-prob may be -inf
        logp_T = torch.where(mask_T > 0, logp_T, torch.zeros_like(logp_T))
        diff_T = (logp_T.detach() - rollout_T).abs() * mask_T
        if self.check:
            self.diff_max = torch.maximum(self.diff_max, diff_T.max().cpu())
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
            kl_T = kl_estimate(logp_T, mb.fields["ref_logp"].to(dev), self.algo.kl_estimator)
            self._add("kl", kl_T, mask_T)
        loss_T = token_loss(pg_T, mask_T, ent_T, self.algo.entropy_coef, kl_T, self.algo.kl_coef)
        if ent_T is not None:
            self._add("entropy", ent_T, mask_T)
        n_tok = mask_T.sum().cpu()
        self.sums["clipped"] = self.sums.get("clipped", torch.zeros(())) + stats["clip_frac"].cpu() * n_tok
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


def _unsegment(mb: MicroBatch, x_BL: torch.Tensor) -> torch.Tensor:
    cu = mb.cu_seqlens.tolist()
    return torch.cat([x_BL[i, : b - a] for i, (a, b) in enumerate(zip(cu[:-1], cu[1:]))])
