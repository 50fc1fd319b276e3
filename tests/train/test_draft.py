"""Training the MTP draft (train/draft.py): targets, gradient isolation, the policy update
unchanged bit for bit, frozen, the draft learning, exact resume."""

from pathlib import Path

import pytest
import torch

from draft_worker import draft_batch, draft_grads, draft_only_losses
from torchrun import torchrun

from miles_fsdp.models import load_model
from miles_fsdp.train.checkpoint import load_checkpoint, save_checkpoint
from miles_fsdp.train.draft import DraftConfig, DraftConfigError, draft_stream
from miles_fsdp.train.optim import OptimConfig
from miles_fsdp.train.packing import TrainSeq, pack
from miles_fsdp.train.trainer import Trainer, TrainerConfig, packed_hidden


def _rl_batch(seed: int = 0, vocab: int = 320) -> list[TrainSeq]:
    """RL-shaped sequences: a prompt, a response with a masked tool span, an advantage field
    (draft_worker.draft_batch is seed 0)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate((14, 23, 9, 31, 17, 26)):
        mask = [0] * (3 + i % 3) + [1] * (n - 3 - i % 3)
        if n > 20:
            mask[12:15] = [0, 0, 0]  # tool output inside the response
        out.append(TrainSeq(torch.randint(0, vocab, (n,), generator=g).tolist(), mask,
                            {"adv": torch.randn(n, generator=g).tolist()}))
    return out


def pg_loss(logp_T, ent_T, mb):
    """common.pg_loss on any device (these tests also run on a GPU)."""
    dev = logp_T.device
    loss_sum = -(logp_T * mb.fields["adv"].to(dev) * mb.weight_T.to(dev)).sum()
    return loss_sum, {"train/pg": loss_sum.detach()}


def _trainer(path, draft: DraftConfig | None, n_mtp: int = 2, budget: int = 64, **kw) -> Trainer:
    cfg = TrainerConfig(optim=OptimConfig(lr=1e-3, weight_decay=0.1, **kw), max_tokens_per_micro_batch=budget)
    return Trainer(load_model(path, n_mtp=n_mtp), cfg, draft=draft)


def _full(trainer) -> dict[str, torch.Tensor]:
    state = trainer.model.state_dict()
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in state.items()}


def test_draft_stream_shifts_within_sequences_and_counts_response_pairs():
    # seq A: 6 tokens, prompt 2; seq B: 5 tokens, token 3 is a tool token (mask 0)
    seqs = [TrainSeq([10, 11, 12, 13, 14, 15], [0, 0, 1, 1, 1, 1]), TrainSeq([20, 21, 22, 23, 24], [0, 1, 1, 0, 1])]
    mb = pack(seqs, 16)[0]
    ids, tgt, cnt = draft_stream(mb, 0)
    assert ids.tolist() == mb.ids_T.tolist() and tgt.tolist() == mb.targets_T.tolist()
    # entry s counts iff s >= 1 and x_s, x_{s+1} are both trained
    assert cnt.tolist() == [0, 0, 1, 1, 1, 0] + [0, 1, 0, 0, 0]
    ids, tgt, cnt = draft_stream(mb, 1)  # module 1: embeds x_{s+1}, predicts x_{s+2}
    assert ids.tolist() == [11, 12, 13, 14, 15, 0] + [21, 22, 23, 24, 0]
    assert tgt.tolist() == [12, 13, 14, 15, 0, 0] + [22, 23, 24, 0, 0]
    assert cnt.tolist() == [0, 1, 1, 1, 0, 0] + [0, 0, 0, 0, 0]


def test_draft_loss_reaches_no_trunk_parameter(ckpt):
    trainer = _trainer(ckpt, DraftConfig())
    mbs = trainer._pad(trainer.pack(_rl_batch()))
    trainer.draft.begin(mbs)
    trainer.model.train()
    with trainer.local.compute():
        for mb in mbs:
            hidden_TD, meta, slot_T = packed_hidden(trainer.model, mb, trainer.device)  # with grad
            trainer.draft.loss(trainer.model, hidden_TD, mb, meta, slot_T).backward()
            trainer.local.accumulate_grads()
    trainer.local.flush_grads()
    touched = set()
    for name, p in trainer.model.named_parameters():
        g = p.grad
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        if name.startswith("mtp."):
            touched.add(name) if g is not None and g.abs().sum() > 0 else None
        else:  # embedding and lm_head included
            assert g is None or not g.any(), name
    # a fresh draft's eh_proj is [0 | I]: enorm's output meets zero weights, so its gradient
    # is 0 until eh_proj's embedding half moves; every other draft parameter learns at once
    assert touched == {n for n, _ in trainer.model.named_parameters() if n.startswith("mtp.") and "enorm" not in n}


def test_policy_update_is_bitwise_the_same_with_the_draft_training(ckpt):
    on, off = _trainer(ckpt, DraftConfig()), _trainer(ckpt, None)
    for step in range(2):
        batch = _rl_batch(seed=step)
        m_on = on.train_step(on.pack(batch), pg_loss)
        m_off = off.train_step(off.pack(batch), pg_loss)
        for k in ("train/loss", "train/grad_norm", "train/pg"):
            assert m_on[k] == m_off[k], k
        assert m_on["draft/loss"] > 0 and "draft/loss" not in m_off
    w_on, w_off = _full(on), _full(off)
    for k in w_on:
        if not k.startswith("mtp."):
            assert torch.equal(w_on[k], w_off[k]), k
    assert any(not torch.equal(w_on[k], w_off[k]) for k in w_on if k.startswith("mtp."))


def test_frozen_draft_is_measured_and_kept(ckpt):
    trainer = _trainer(ckpt, DraftConfig(frozen=True))
    before = _full(trainer)
    metrics = trainer.train_step(trainer.pack(_rl_batch()), pg_loss)
    assert metrics["draft/loss"] > 0 and 0 <= metrics["draft/acc"] <= 1 and metrics["draft/lr"] == 0.0
    after = _full(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("mtp."))
    assert trainer.draft.optimizer is None


def test_enabled_without_a_draft_names_the_fix():
    with pytest.raises(DraftConfigError, match="--draft.n-mtp"):
        DraftConfig(enabled=True).trains(0, default=True)
    assert DraftConfig().trains(1, default=False) is False and DraftConfig().trains(1, default=True) is True
    with pytest.raises(DraftConfigError, match="loss-coef"):
        DraftConfig(loss_coef=0)


def _cyclic_batch(seed: int) -> list[TrainSeq]:
    # x_{s+1} is a function of x_s: a draft that reads its token input can learn it
    g = torch.Generator().manual_seed(seed)
    cycle = torch.randperm(320, generator=g)[:24].tolist()
    out = []
    for n in (20, 28, 24, 32):
        start = int(torch.randint(0, 24, (1,), generator=g))
        toks = [cycle[(start + i) % 24] for i in range(n)]
        out.append(TrainSeq(toks, [0] * 2 + [1] * (n - 2)))
    return out


def test_draft_accuracy_rises_while_it_trains_alone(ckpt):
    cfg = TrainerConfig(max_tokens_per_micro_batch=128)
    trainer = Trainer(load_model(ckpt, n_mtp=1), cfg, draft=DraftConfig(optim=OptimConfig(lr=3e-3)), train_trunk=False)
    trunk = {k: v for k, v in _full(trainer).items() if not k.startswith("mtp.")}
    hist = [trainer.train_draft_step(trainer.pack(_cyclic_batch(0))) for _ in range(30)]
    assert trainer.optimizer is None
    assert hist[0]["draft/acc"] < 0.2 and hist[-1]["draft/acc"] > 0.8, [round(h["draft/acc"], 2) for h in hist]
    assert hist[-1]["draft/loss"] < hist[0]["draft/loss"] / 2
    after = _full(trainer)
    assert all(torch.equal(v, after[k]) for k, v in trunk.items())


def test_resume_with_the_draft_is_exact(ckpt, tmp_path):
    kw = dict(warmup_steps=1, schedule="cosine", total_steps=4)
    draft = DraftConfig(optim=OptimConfig(lr=1e-3, warmup_steps=1, schedule="cosine", total_steps=4, weight_decay=0.1))

    def run(trainer, steps):
        return [trainer.train_step(trainer.pack(_rl_batch(seed=s)), pg_loss) for s in steps]

    straight = _trainer(ckpt, draft, **kw)
    want = run(straight, range(4))
    first = _trainer(ckpt, draft, **kw)
    got = run(first, range(2))
    path = save_checkpoint(first, tmp_path)
    resumed = _trainer(ckpt, draft, **kw)
    load_checkpoint(resumed, path)
    got += run(resumed, range(2, 4))
    assert [m["draft/loss"] for m in got] == [m["draft/loss"] for m in want]
    assert [m["train/loss"] for m in got] == [m["train/loss"] for m in want]
    w_a, w_b = _full(straight), _full(resumed)
    for k in w_a:
        assert torch.equal(w_a[k], w_b[k]), k


def test_two_ranks_match_one_rank(ckpt, tmp_path):
    want = draft_grads(str(ckpt), draft_batch(), 128)
    want["draft_only_losses"] = torch.tensor(draft_only_losses(str(ckpt), draft_batch(), 128))
    out = tmp_path / "grads.pt"
    torchrun([Path(__file__).parent / "draft_worker.py", ckpt, out], timeout=300)
    got = torch.load(out)
    assert got.keys() == want.keys()
    for k in want:  # the draft's loss is normalised over the global batch, like the policy's
        atol = 1e-5 * float(want[k].abs().max()) + 1e-7  # fp32 sums in another order; a fresh draft's grads are large
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=atol, msg=lambda m: f"{k}: {m}")
    assert any(want[k].abs().sum() > 0 for k in want if k.startswith("mtp."))
