"""Policy losses, aggregation weights and KL estimators against hand-computed values."""

import math

import pytest
import torch

from miles_fsdp.rl import kl, objectives
from miles_fsdp.rl.objectives import AGGREGATIONS


def _logs(*xs):
    return torch.tensor([[math.log(x) for x in xs]])


def test_ppo_clip_higher_hand_values():
    old = torch.zeros(1, 4)
    logp = _logs(1.5, 0.5, 1.1, 0.7).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, stats = objectives.ppo_clip_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    # r=1.5,A=1 -> -1.28 (clipped); r=.5,A=1 -> -.5; r=1.1,A=-1 -> 1.1; r=.7,A=-1 -> .8 (clipped)
    torch.testing.assert_close(loss, torch.tensor([[-1.28, -0.5, 1.1, 0.8]]))
    assert stats["clip_frac"].item() == pytest.approx(0.5)
    assert stats["ratio_mean"].item() == pytest.approx(0.95)
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    loss.sum().backward()
    # d(-r A)/dlogp = -r A on unclipped tokens, 0 on clipped ones
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5, 1.1, 0.0]]))


def test_dual_clip_caps_negative_advantage():
    old = torch.zeros(1, 2)
    logp = _logs(5.0, 5.0)
    adv = torch.tensor([[-1.0, 1.0]])
    loss, stats = objectives.ppo_clip_loss(logp, old, adv, torch.ones(1, 2), dual_clip_c=3.0)
    # A<0: min(max(5, 1.2), 3) = 3; A>0: max(-5, -1.2) = -1.2
    torch.testing.assert_close(loss, torch.tensor([[3.0, -1.2]]))
    assert stats["clip_frac"].item() == 1.0
    with pytest.raises(ValueError, match="dual_clip_c must be > 1"):
        objectives.ppo_clip_loss(logp, old, adv, torch.ones(1, 2), dual_clip_c=0.5)


def test_padding_contributes_nothing():
    logp = torch.tensor([[0.1, 50.0]])
    loss, stats = objectives.ppo_clip_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[1.0, 0.0]]))
    assert loss[0, 1].item() == 0.0
    assert stats["ratio_max"].item() == pytest.approx(math.exp(0.1))


def test_gspo_sequence_ratio_hand_values():
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.1, 0.3, 0.0], [-0.2, 0.0, 7.0]])
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 0]])
    adv = torch.tensor([[1.0, 1, 0], [-1, -1, 0]])
    loss, stats = objectives.gspo_loss(logp, old, adv, mask, eps_low=0.1, eps_high=0.1)
    # s1 = e^.2 = 1.221 -> clipped to 1.1; s2 = e^-.1 = .905 (inside [.9, 1.1])
    s2 = math.exp(-0.1)
    torch.testing.assert_close(loss, torch.tensor([[-1.1, -1.1, 0.0], [s2, s2, 0.0]]))
    assert stats["clip_frac"].item() == pytest.approx(0.5)


def _normalised(loss_NL, mask_NL, aggregation, constant=5.0, budget=64):
    """sum(w * l) / denom as the trainer computes it: each row one packed sequence, the RL
    aggregation mapped to the trainer's LossNorm (the one normalisation implementation)."""
    from miles_fsdp.rl.config import loss_norm_of
    from miles_fsdp.train.loss import assign_weights
    from miles_fsdp.train.packing import TrainSeq, pack, unpack

    L = mask_NL.shape[1]
    seqs = [TrainSeq([1] * (L + 1), [0] + row.int().tolist(), {"l": [0.0] + loss_NL[i].tolist()})
            for i, row in enumerate(mask_NL)]
    mbs = pack(seqs, budget)
    denom = assign_weights(mbs, *loss_norm_of(aggregation, constant))
    return sum((mb.weight_T * mb.fields["l"]).sum() for mb in mbs) / denom, mbs


def test_aggregations_hand_values():
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    loss = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0, 0, 0], [0, 0, 0, 0]])
    assert _normalised(loss, mask, "token-mean")[0].item() == pytest.approx(10 / 4)
    assert _normalised(loss, mask, "seq-mean-token-mean")[0].item() == pytest.approx((6 / 3 + 4) / 2)
    assert _normalised(loss, mask, "seq-mean-token-sum")[0].item() == pytest.approx((6 + 4) / 2)
    assert _normalised(loss, mask, "constant", constant=4)[0].item() == pytest.approx(10 / (2 * 4))


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_micro_batches_sum_to_full_batch(mode):
    torch.manual_seed(0)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1.0
    loss_NL = torch.randn(6, 5) * mask
    full, mbs = _normalised(loss_NL, mask, mode, budget=64)
    split, mbs_small = _normalised(loss_NL, mask, mode, budget=12)  # two sequences per micro-batch
    assert len(mbs) == 1 and len(mbs_small) == 3
    torch.testing.assert_close(split, full)


def test_token_loss_entropy_bonus_and_kl():
    pg = torch.tensor([[1.0, 2.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    out = objectives.token_loss(pg, mask, entropy_NL=torch.tensor([[0.5, 1.0, 1.0]]), entropy_coef=0.1,
                            kl_NL=torch.tensor([[0.2, 0.4, 1.0]]), kl_coef=0.5)
    torch.testing.assert_close(out, torch.tensor([[1.0 - 0.05 + 0.1, 2.0 - 0.1 + 0.2, 0.0]]))
    with pytest.raises(ValueError, match="entropy_coef is set"):
        objectives.token_loss(pg, mask, entropy_coef=0.1)


def test_kl_estimators_hand_values():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # log r = log(.25/.5) = -log 2
    assert kl.kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl.kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl.kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl.kl_estimate(logp, ref, "k4")


def test_kl_estimators_agree_in_expectation():
    # KL(p || q) for categorical p, q, exact vs the expectation of each unbiased estimator under p
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    exact = (p * (p / q).log()).sum()
    for kind in ("k1", "k3"):
        expect = (p * kl.kl_estimate(p.log(), q.log(), kind)).sum()
        torch.testing.assert_close(expect, exact)


def test_kl_reward_penalty_is_detached_and_masked():
    logp = torch.tensor([[math.log(0.5), 0.0]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), 0.0]])
    pen = kl.kl_reward_penalty(logp, ref, torch.tensor([[1.0, 0.0]]), coef=0.1)
    assert not pen.requires_grad
    torch.testing.assert_close(pen, torch.tensor([[-0.1 * math.log(2), 0.0]]))


def test_gspo_gradient_flows_through_sequence_mean():
    # unclipped: l_it = -s_i A_i on each of |y_i| tokens; with seq-mean-token-mean weights the
    # loss is -s_i A_i / K, so d/dlogp_it = -A_i s_i / |y_i| / K
    logp = torch.tensor([[0.02, -0.02, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv = torch.tensor([[2.0, 2.0, 0.0]])
    loss_NL, stats = objectives.gspo_loss(logp, torch.zeros(1, 3), adv, mask)
    assert stats["clip_frac"].item() == 0.0
    w_NL = mask / mask.sum(1, keepdim=True)  # LossNorm.seq_mean's weights; K = 1
    (loss_NL * w_NL).sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, -1.0, 0.0]]))


def test_bad_clip_range_is_named():
    with pytest.raises(ValueError, match="0 <= eps_low < 1"):
        objectives.ppo_clip_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), eps_low=1.5)
