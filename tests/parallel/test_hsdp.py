"""HSDP (replicate x shard mesh) gives the gradients, losses and weights of plain FSDP and
of 1 rank with the same global batch (fp32 tolerance), on the tiny Qwen3-MoE:

    1 rank (in process)  ==  FSDP 2 ranks  ==  HSDP 2x1  ==  HSDP 2x2 (4 ranks)  ==  HSDP 2x2 + EP 2

The last one also covers EP on an HSDP mesh: experts sharded over "shard", their grads
summed over "replicate" by parallel/ep.py's hook.
"""

import pytest

from parallel_helpers import W_ATOL, assert_close, load_ranks, make_trainer, run_workers, train_run

from miles_fsdp.models import load_model
from miles_fsdp.models.testing import build_tiny_checkpoint

STEPS = 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("moe"), "qwen3_moe", tokenizer=False)


@pytest.fixture(scope="module")
def one_rank(ckpt):
    return train_run(make_trainer(load_model(ckpt)), 0, 1, STEPS)


CASES = {  # id: (nproc, replicate, ep, mesh dims)
    "fsdp2": (2, 1, 1, ("shard",)),
    "hsdp2x1": (2, 2, 1, ("replicate", "shard")),
    "hsdp2x2": (4, 2, 1, ("replicate", "shard")),
    "hsdp2x2_ep2": (4, 2, 2, ("replicate", "shard")),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_one_rank(ckpt, one_rank, tmp_path, case):
    nproc, replicate, ep, dims = CASES[case]
    run_workers("train_worker.py", ckpt, tmp_path, "--replicate", replicate, "--ep", ep, "--steps", STEPS,
                nproc=nproc)
    ranks = load_ranks(tmp_path, nproc)
    assert ranks[0]["mesh"] == dims
    for r, res in enumerate(ranks):
        assert_close(one_rank["grads"], res["grads"], f"{case} rank {r} grads")
        assert res["losses"] == ranks[0]["losses"], "every rank reports the same global loss"
        assert_close(one_rank["final"]["weights"], res["final"]["weights"], f"{case} rank {r} weights",
                     rtol=1e-4, atol=W_ATOL)
    for a, b in zip(one_rank["losses"], ranks[0]["losses"]):
        assert abs(a - b) <= 1e-5 * abs(a) + 1e-6, (case, one_rank["losses"], ranks[0]["losses"])
    assert ranks[0]["losses"][-1] != ranks[0]["losses"][0]
