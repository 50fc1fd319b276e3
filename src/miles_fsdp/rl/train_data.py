"""A scored rollout batch as training data: reference scores, per-token advantages (with
KL-in-reward), and the packed-ready TrainSeqs (prompt + response, loss on response tokens).

    samples --reference_logprobs--> ref_logps (per response token, scored like the policy)
            --kl_penalties--------> penalty_NL (algo.kl_reward_coef * KL_t)
            --compute_advantages--> adv_NL   (rl/advantages.py estimators)
            --to_train_seqs-------> TrainSeqs with fields adv, rollout_logp[, ref_logp]
"""

from __future__ import annotations

import torch

from miles_fsdp.data.sample import Sample
from miles_fsdp.rl import advantages as adv_lib
from miles_fsdp.rl.config import AlgoConfig
from miles_fsdp.rl.kl import kl_reward_penalty
from miles_fsdp.train.packing import TrainSeq, unpack
from miles_fsdp.train.reference import ReferencePolicy
from miles_fsdp.train.scoring import ScoringSpec


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


def reference_logprobs(reference: ReferencePolicy, trainer, samples: list[Sample], spec: ScoringSpec) -> list[list[float]]:
    """Each sample's response tokens scored by the reference policy as `spec` says (one list
    per sample, one value per response token). Collective."""
    mbs = trainer.pack(to_train_seqs(samples))
    per_seq: dict[int, torch.Tensor] = {}
    for mb, logp_T in zip(mbs, reference.ref_logprobs(mbs, spec)):
        per_seq.update(unpack(mb, logp_T.cpu()))
    return [per_seq[i][len(s.prompt_ids):].tolist() for i, s in enumerate(samples)]
