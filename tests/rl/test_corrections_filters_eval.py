"""Mismatch corrections, DAPO filters and eval metrics against hand-computed values."""

import math

import pytest
import torch

from miles_fsdp.rl import corrections as C
from miles_fsdp.rl import eval_metrics as E
from miles_fsdp.rl import filters as F

TRAIN = torch.tensor([[math.log(0.5), math.log(0.9), 0.0]])
ROLLOUT = torch.tensor([[math.log(0.25), math.log(1.0), 3.0]])  # rho = [2, .9], last token padding
MASK = torch.tensor([[1.0, 1.0, 0.0]])


def test_mismatch_stats():
    s = C.mismatch_stats(TRAIN, ROLLOUT, MASK)
    assert s["logprob_abs_diff_max"] == pytest.approx(math.log(2))
    assert s["logprob_abs_diff_mean"] == pytest.approx((math.log(2) + abs(math.log(0.9))) / 2)
    assert s["kl_k1"] == pytest.approx(-(math.log(2) + math.log(0.9)) / 2)
    k3 = ((2 - 1 - math.log(2)) + (0.9 - 1 - math.log(0.9))) / 2
    assert s["kl_k3"] == pytest.approx(k3)


def test_identical_logprobs_give_unit_weights():
    w, stats = C.tis_weights(TRAIN, TRAIN, MASK, level="sequence")
    assert w.tolist() == [[1.0, 1.0, 0.0]] and stats["tis_truncated_frac"] == 0.0
    assert C.mismatch_stats(TRAIN, TRAIN, MASK)["logprob_abs_diff_max"] == 0.0


def test_tis_levels():
    w, stats = C.tis_weights(TRAIN, ROLLOUT, MASK, cap=1.5, level="token")
    torch.testing.assert_close(w, torch.tensor([[1.5, 0.9, 0.0]]))
    assert stats["tis_truncated_frac"] == 0.5
    w, _ = C.tis_weights(TRAIN, ROLLOUT, MASK, cap=1.5, level="sequence")  # 2 * .9 = 1.8 -> 1.5
    torch.testing.assert_close(w, torch.tensor([[1.5, 1.5, 0.0]]))
    w, _ = C.tis_weights(TRAIN, ROLLOUT, MASK, cap=1.5, level="geometric")  # sqrt(1.8)
    g = math.sqrt(1.8)
    torch.testing.assert_close(w, torch.tensor([[g, g, 0.0]]))


def test_tis_weights_carry_no_gradient():
    train = TRAIN.clone().requires_grad_()
    w, _ = C.tis_weights(train, ROLLOUT, MASK)
    assert not w.requires_grad


def test_mis_levels():
    keep, stats = C.mis_mask(TRAIN, ROLLOUT, MASK, lo=0.5, hi=1.5, level="token")
    assert keep.tolist() == [[0.0, 1.0, 0.0]] and stats["mis_dropped_frac"] == 0.5
    keep, _ = C.mis_mask(TRAIN, ROLLOUT, MASK, lo=0.5, hi=1.5, level="sequence")
    assert keep.tolist() == [[0.0, 0.0, 0.0]]
    keep, _ = C.mis_mask(TRAIN, ROLLOUT, MASK, lo=0.5, hi=1.5, level="geometric")
    assert keep.tolist() == [[1.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="0 <= lo < 1 < hi"):
        C.mis_mask(TRAIN, ROLLOUT, MASK, lo=1.2, hi=2.0)


def test_dynamic_sampling_filter():
    r = torch.tensor([1.0, 1, 0, 1, 0, 0, 1, 0])
    res = F.dynamic_sampling_filter(r, group_size=2, target_groups=4)
    assert res.keep_G.tolist() == [False, True, False, True]
    assert (res.num_kept, res.num_dropped, res.groups_needed) == (2, 2, 2)
    assert res.prompts_to_sample == 4  # keep rate 1/2
    assert F.expand_group_mask(res.keep_G, 2).tolist() == [False, False, True, True, False, False, True, True]
    full = F.dynamic_sampling_filter(r, group_size=2, target_groups=2)
    assert full.groups_needed == 0 and full.prompts_to_sample == 0
    none = F.dynamic_sampling_filter(torch.zeros(6), group_size=3, target_groups=2)
    assert none.num_kept == 0 and none.prompts_to_sample == 2


def test_overlong_penalty():
    lens = torch.tensor([5, 6, 8, 10, 12])
    pen = F.overlong_penalty(lens, max_len=10, buffer_len=4, factor=1.0)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    with pytest.raises(ValueError, match="buffer_len"):
        F.overlong_penalty(lens, max_len=10, buffer_len=0)


def test_pass_at_k_hand_values():
    assert E.pass_at_k_single(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert E.pass_at_k_single(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    assert E.pass_at_k_single(4, 0, 2) == 0.0
    assert E.pass_at_k_single(4, 3, 2) == 1.0
    assert E.pass_at_k_single(7, 3, 1) == pytest.approx(3 / 7)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        E.pass_at_k_single(4, 1, 5)


def test_pass_at_k_groups_and_mean_reward():
    correct = torch.tensor([1, 0, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    assert E.pass_at_1(correct, 4) == pytest.approx((0.25 + 0.5) / 2)
    assert E.pass_at_k(correct, 4, 2) == pytest.approx((0.5 + (1 - 1 / 6)) / 2)
    assert E.mean_reward(torch.tensor([1.0, 0.0, 0.5])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="empty"):
        E.mean_reward(torch.tensor([]))
