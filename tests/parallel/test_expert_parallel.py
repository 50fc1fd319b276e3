"""Expert parallelism moves rows, it does not change arithmetic.

2 gloo ranks with expert_parallel=2 (4 of the 8 experts each, tokens by all_to_all) against
1 rank without EP, on a tiny random Qwen3-MoE:
- forward hidden states, logits and log-probs of every micro-batch: bitwise equal;
- gradients of one global batch (every param, expert weights included): fp32 tolerance;
- 2 optimizer steps: losses and weights within fp32 tolerance;
- the same with activation checkpointing (the all_to_all is recomputed in backward).
"""

import pytest
import torch

from parallel_helpers import (SEQ_LEN, W_ATOL, assert_close, forward_outputs, full_grads, full_weights, global_batch, load_ranks,
                    make_trainer, pg_loss, run_workers)

from miles_fsdp.models import load_model
from miles_fsdp.models.testing import build_tiny_checkpoint
from miles_fsdp.parallel import ParallelConfig, apply_ep, build_mesh, init_distributed


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("moe"), "qwen3_moe", tokenizer=False)


@pytest.fixture(scope="module")
def one_rank(ckpt):
    """Per-rank forward outputs (rank r's sequences and packing, computed without EP), and
    the full-batch gradients, losses and weights of the same training."""
    ref = {}
    batch = global_batch()
    for rank, budget in ((0, 2 * SEQ_LEN), (1, SEQ_LEN)):
        t = make_trainer(load_model(ckpt), budget)
        ref[("outputs", rank)] = forward_outputs(t, t.pack(batch[rank::2]))
    t = make_trainer(load_model(ckpt), 2 * SEQ_LEN)
    mbs = t.pack(batch)
    t.backward(mbs, pg_loss)
    ref["grads"] = full_grads(t)
    t.optimizer.zero_grad(set_to_none=True)
    ref["losses"] = [t.train_step(mbs, pg_loss)["train/loss"] for _ in range(2)]
    ref["weights"] = full_weights(t)
    return ref


@pytest.mark.parametrize("ac", [False, True], ids=["plain", "ac"])
def test_ep2_matches_one_rank(ckpt, one_rank, tmp_path, ac):
    run_workers("ep_worker.py", ckpt, tmp_path, 2, *(["ac"] if ac else []))
    ranks = load_ranks(tmp_path)
    for rank, res in enumerate(ranks):
        assert res["local_expert_shape"] == (4, 32, 64), "each rank must hold 4 of the 8 experts"
        ref = one_rank[("outputs", rank)]
        assert len(res["outputs"]) == len(ref)
        for i, (got, want) in enumerate(zip(res["outputs"], ref)):
            for key in ("hidden", "logits", "logp"):
                assert torch.equal(got[key], want[key]), f"rank {rank} micro-batch {i}: {key} differs with EP"
    grads = ranks[0]["grads"]
    assert any(".moe.w_gate" in k for k in grads)
    assert_close(one_rank["grads"], grads, "grads EP=2 vs 1 rank")
    assert_close(ranks[0]["grads"], ranks[1]["grads"], "grads rank 0 vs rank 1", rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["losses"], one_rank["losses"], rtol=1e-5, atol=1e-6)
    errors = ranks[0]["errors"]
    assert "expert_parallel=2 does not divide num_experts=3" in errors[0]
    assert "no MoE layers; set expert_parallel=1" in errors[1]
    assert_close(one_rank["weights"], ranks[0]["weights"], "weights after 2 steps", rtol=1e-4, atol=W_ATOL)


def test_bad_expert_parallel_config(ckpt):
    with pytest.raises(ValueError, match="ParallelConfig.expert_parallel=0"):
        ParallelConfig(expert_parallel=0)
    with pytest.raises(ValueError, match="cpu_offload"):
        ParallelConfig(expert_parallel=2, cpu_offload=True)
    # 1 rank: expert_parallel must equal the shard degree (1)
    with pytest.raises(ValueError, match=r"expert_parallel=2 must be 1 or the shard degree"):
        make_trainer(load_model(ckpt), expert_parallel=2)
    # (num_experts not divisible by EP, and EP on a dense model: checked on 2 ranks by the worker)
    model, mesh = load_model(ckpt), build_mesh(init_distributed())
    apply_ep(model, mesh)
    with pytest.raises(ValueError, match="apply_ep: w_gate is already distributed"):
        apply_ep(model, mesh)
