"""One global batch gives the same gradients however it is split into micro-batches
(gradient accumulation) and data-parallel ranks, for every loss normalisation."""

from pathlib import Path

import pytest
import torch

from common import NORM_CONSTANT, SEQ_LEN, full_grads, global_batch, make_trainer, pg_loss
from tiny_model import TinyLM
from torchrun import torchrun

NORMS = ("token_mean", "seq_mean", "constant")


def _grads(norm: str, budget: int) -> dict[str, torch.Tensor]:
    trainer = make_trainer(TinyLM(), budget)
    mbs = trainer.pack(global_batch())
    trainer.backward(mbs, pg_loss, norm=norm, norm_constant=NORM_CONSTANT)
    return full_grads(trainer), len(mbs)


def _assert_close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {k}: {m}")


@pytest.fixture(scope="module")
def one_rank() -> dict:
    out = {}
    for norm in NORMS:
        for n_mb, budget in ((1, 8 * SEQ_LEN), (2, 4 * SEQ_LEN), (8, SEQ_LEN)):
            grads, got = _grads(norm, budget)
            assert got == n_mb, f"budget {budget} packed {got} micro-batches, expected {n_mb}"
            out[(norm, n_mb)] = grads
    return out


@pytest.mark.parametrize("norm", NORMS)
def test_accumulation_splits_match(one_rank, norm):
    _assert_close(one_rank[(norm, 1)], one_rank[(norm, 2)], f"{norm} 1x8 vs 2x4")
    _assert_close(one_rank[(norm, 1)], one_rank[(norm, 8)], f"{norm} 1x8 vs 8x1")


def test_norms_differ(one_rank):
    # guards the test itself: the batch must tell the normalisations apart
    g = {n: one_rank[(n, 1)]["lm_head.weight"] for n in NORMS}
    assert not torch.allclose(g["token_mean"], g["seq_mean"])
    assert not torch.allclose(g["token_mean"], g["constant"])


def test_two_ranks_match_one_rank(one_rank, tmp_path):
    out = tmp_path / "dist.pt"
    here = Path(__file__).parent
    torchrun([here / "dist_worker.py", out], timeout=180)
    result = torch.load(out)
    for norm in NORMS:
        for split in ("1", "2", "4", "uneven"):
            _assert_close(one_rank[(norm, 1)], result[(norm, split)], f"{norm} 2 ranks split {split}")
    losses = result["losses"]
    assert losses[2] < losses[0], f"2-rank training did not reduce the loss: {losses}"
    # the metrics are the global batch's (summed over the ranks): one rank's steps on all of it
    trainer = make_trainer(TinyLM(), 2 * SEQ_LEN)
    one = [trainer.train_step(trainer.pack(global_batch()), pg_loss) for _ in range(3)]
    assert result["tokens"] == [m["train/tokens"] for m in one]
    torch.testing.assert_close(losses, [m["train/loss"] for m in one], rtol=1e-5, atol=1e-6)
