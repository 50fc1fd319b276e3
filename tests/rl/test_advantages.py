"""Advantage estimators against hand-computed values."""

import math

import pytest
import torch

from miles_fsdp.rl import advantages as A


def test_grpo_hand_values():
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])
    # group 1: mean .25, unbiased std sqrt(.75/3) = .5; group 2: mean .5, std sqrt(1/3)
    s = 0.5 / math.sqrt(1 / 3)
    expect = torch.tensor([1.5, -0.5, -0.5, -0.5, s, s, -s, -s])
    torch.testing.assert_close(A.grpo_advantages(r, 4, eps=0.0), expect)


def test_grpo_equal_group_is_zero_not_nan():
    adv = A.grpo_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), 2)
    assert adv[:2].tolist() == [0.0, 0.0]
    assert not torch.isnan(adv).any()


def test_dr_grpo_and_rloo_hand_values():
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])
    torch.testing.assert_close(
        A.dr_grpo_advantages(r, 4), torch.tensor([0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5])
    )
    torch.testing.assert_close(
        A.rloo_advantages(r, 4), torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3, 2 / 3, 2 / 3, -2 / 3, -2 / 3])
    )


def test_bad_group_size_message():
    with pytest.raises(ValueError, match="groups of n=3"):
        A.grpo_advantages(torch.ones(4), 3)
    with pytest.raises(ValueError, match="n >= 2"):
        A.rloo_advantages(torch.ones(4), 1)


def _whiten_list(values):
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / std for v in values]


def test_reinforce_pp_returns_and_whitening():
    r = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    adv = A.reinforce_pp_advantages(r, mask, eps=0.0)
    # returns [[1, 1, -], [0, 0, 0]]
    hi, lo = _whiten_list([1, 1, 0, 0, 0])[0], _whiten_list([1, 1, 0, 0, 0])[2]
    torch.testing.assert_close(adv, torch.tensor([[hi, hi, 0.0], [lo, lo, lo]]))


def test_reinforce_pp_kl_in_reward():
    r = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    kl = torch.tensor([[0.1, 0.2, 9.0], [0.3, 0.0, 0.5]])  # 9.0 is padding, must be ignored
    # token rewards [[-.05, -.1 + 1], [-.15, 0, -.25]] -> returns [[.85, .9], [-.4, -.25, -.25]]
    w = _whiten_list([0.85, 0.9, -0.4, -0.25, -0.25])
    adv = A.reinforce_pp_advantages(r, mask, kl_NL=kl, kl_coef=0.5, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[w[0], w[1], 0.0], [w[2], w[3], w[4]]]))


def test_reinforce_pp_two_ranks_match_one():
    r = torch.tensor([1.0, 0.0, 0.5, 2.0])
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
    full = A.reinforce_pp_advantages(r, mask)
    # rank 0 holds samples 0-1, rank 1 samples 2-3; the fake all_reduce adds the other rank's stats
    captured = {}

    def record(key):
        def f(t):
            captured[key] = t.clone()
            return t
        return f

    A.reinforce_pp_advantages(r[2:], mask[2:], all_reduce=record(1))
    A.reinforce_pp_advantages(r[:2], mask[:2], all_reduce=record(0))
    rank0 = A.reinforce_pp_advantages(r[:2], mask[:2], all_reduce=lambda t: t + captured[1])
    rank1 = A.reinforce_pp_advantages(r[2:], mask[2:], all_reduce=lambda t: t + captured[0])
    torch.testing.assert_close(torch.cat([rank0, rank1]), full)


def test_reinforce_pp_baseline():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    mask = torch.ones(4, 1)
    # centred [.5, -.5, 0, 0]; population std sqrt(.125)
    s = 0.5 / math.sqrt(0.125)
    torch.testing.assert_close(
        A.reinforce_pp_baseline_advantages(r, 2, mask, eps=0.0), torch.tensor([[s], [-s], [0.0], [0.0]])
    )


def test_to_tokens_masks_padding():
    adv = A.to_tokens(torch.tensor([2.0, -1.0]), torch.tensor([[1.0, 1, 0], [1, 0, 0]]))
    assert adv.tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]


def test_reinforce_pp_empty_response_is_named():
    with pytest.raises(ValueError, match=r"samples \[1\] have no loss tokens"):
        A.reinforce_pp_advantages(torch.ones(2), torch.tensor([[1.0, 0], [0, 0]]))


def test_kl_in_reward_hand_values():
    from miles_fsdp.data.sample import Sample
    from miles_fsdp.rl.config import AlgoConfig
    from miles_fsdp.rl.train_data import compute_advantages, kl_penalties

    def sample(lps, reward):
        s = Sample(prompt="", prompt_ids=[1, 2])
        s.response_ids, s.response_logprobs, s.loss_mask, s.reward = [5] * len(lps), lps, [1] * len(lps), reward
        return s

    samples = [sample([-1.0, -2.0], 1.0), sample([-0.5], 0.0)]
    ref = [[-1.5, -1.0], [-0.25]]
    # penalty_t = coef * (logp_t - ref_t) = 0.1 * [0.5, -1.0] and 0.1 * [-0.25]
    pen = kl_penalties(samples, ref, AlgoConfig(advantage="dr_grpo", kl_reward_coef=0.1))
    torch.testing.assert_close(pen, torch.tensor([[0.05, -0.1], [-0.025, 0.0]]))
    # outcome estimator: r_i - sum_t penalty = [1.05, 0.025]; Dr.GRPO: minus the group mean 0.5375
    adv = compute_advantages(samples, 2, AlgoConfig(advantage="dr_grpo", kl_reward_coef=0.1), kl_penalty_NL=pen)
    torch.testing.assert_close(adv, torch.tensor([[0.5125, 0.5125], [-0.5125, 0.0]]))
    # REINFORCE++: rew = [-0.05, 0.1 + 1.0], [0.025 + 0.0]; returns to go [1.05, 1.1], [0.025]; whitened
    adv = compute_advantages(samples, 2, AlgoConfig(advantage="reinforce_pp", kl_reward_coef=0.1), kl_penalty_NL=pen)
    g = torch.tensor([1.05, 1.1, 0.025])
    w = (g - g.mean()) / (g.var(unbiased=False).sqrt() + 1e-8)
    torch.testing.assert_close(adv, torch.tensor([[w[0], w[1]], [w[2], 0.0]]))
