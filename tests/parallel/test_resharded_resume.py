"""A DCP checkpoint written by N ranks resumes on M ranks and continues like a straight run.

    2 ranks (EP=2) --save@2--> 1 rank resumes --> steps 3-4
    1 rank --save@2--> 2 ranks (FSDP, or EP=2) resume --> steps 3-4

Exact where it is exact: the state right after loading (full weights, AdamW moments, step,
LR) is bitwise the state that was saved, whatever the world size or expert sharding.
Continuing: losses and weights match the straight run of the saving world size and the
1-rank straight run within fp32 tolerance (different world sizes reduce in different orders).
"""

import pytest
import torch

from parallel_helpers import W_ATOL, assert_close, full_state, load_ranks, make_trainer, run_workers, train_run

from miles_fsdp.models import load_model
from miles_fsdp.models.testing import build_tiny_checkpoint
from miles_fsdp.train.checkpoint import load_checkpoint, step_dir

SAVE_AT, STEPS = 2, 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("moe"), "qwen3_moe", tokenizer=False)


@pytest.fixture(scope="module")
def straight(ckpt, tmp_path_factory):
    """1 rank, STEPS steps, saving at SAVE_AT (the checkpoint the 1 -> 2 tests resume)."""
    save_dir = tmp_path_factory.mktemp("ckpt1")
    return train_run(make_trainer(load_model(ckpt)), 0, 1, STEPS, SAVE_AT, save_dir), save_dir


def _assert_state_equal(a: dict, b: dict, what: str) -> None:
    assert (a["step"], a["lr"]) == (b["step"], b["lr"]), what
    assert_close(a["weights"], b["weights"], f"{what} weights", rtol=0, atol=0)
    assert a["optim"].keys() == b["optim"].keys()
    for name in a["optim"]:
        assert_close(a["optim"][name], b["optim"][name], f"{what} optim {name}", rtol=0, atol=0)


def _assert_continues(losses, final, ref_losses, ref_final, what):
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} losses: {m}")
    assert_close(ref_final["weights"], final["weights"], f"{what} weights", rtol=1e-4, atol=W_ATOL)


def test_two_ranks_to_one(ckpt, straight, tmp_path):
    save_dir = tmp_path / "ckpt2"
    run_workers("train_worker.py", ckpt, tmp_path, "--ep", 2, "--steps", STEPS, "--save-at", SAVE_AT,
                "--save-dir", save_dir)
    two = load_ranks(tmp_path)[0]  # 2-rank straight run, saved at SAVE_AT

    resumed = make_trainer(load_model(ckpt))  # 1 rank, no EP
    assert load_checkpoint(resumed, step_dir(save_dir, SAVE_AT)) == {"data_step": SAVE_AT}
    _assert_state_equal(two["saved"], full_state(resumed), "2 ranks (EP=2) -> 1 rank: loaded state")
    cont = train_run(resumed, 0, 1, STEPS)
    _assert_continues(cont["losses"], cont["final"], two["losses"][SAVE_AT:], two["final"], "vs 2-rank straight")
    ref, _ = straight
    _assert_continues(cont["losses"], cont["final"], ref["losses"][SAVE_AT:], ref["final"], "vs 1-rank straight")


@pytest.mark.parametrize("ep", [1, 2], ids=["fsdp", "ep2"])
def test_one_rank_to_two(ckpt, straight, tmp_path, ep):
    ref, save_dir = straight
    run_workers("train_worker.py", ckpt, tmp_path, "--ep", ep, "--steps", STEPS, "--resume",
                step_dir(save_dir, SAVE_AT))
    for r, res in enumerate(load_ranks(tmp_path)):
        assert res["extra"] == {"data_step": SAVE_AT} and res["start"] == SAVE_AT
        _assert_state_equal(ref["saved"], res["loaded"], f"1 rank -> 2 ranks (ep={ep}) rank {r}: loaded state")
        _assert_continues(res["losses"], res["final"], ref["losses"][SAVE_AT:], ref["final"], f"rank {r}")
