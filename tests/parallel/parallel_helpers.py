"""Shared by the tests/parallel tests and their torchrun workers.

Workers are launched with `run_workers`: 2 gloo processes on CPU (tests/torchrun.py: a free
port per launch, a hard timeout, each rank's own log in a failure), and each rank writes
`out_dir/rank<r>.pt`, read back by `load_ranks`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from miles_fsdp.models import packed_inputs
from miles_fsdp.models.testing import TINY_VOCAB
from miles_fsdp.train.optim import OptimConfig
from miles_fsdp.train.packing import TrainSeq
from miles_fsdp.train.trainer import Trainer, TrainerConfig, pad_micro_batches
from miles_fsdp.parallel import ParallelConfig

HERE = Path(__file__).parent
SEQ_LEN = 8
# Weights after AdamW steps: Adam normalises each update (~lr = 1e-2 per step), so fp32
# reduction-order noise in a near-zero gradient can move a weight by a small fraction of lr.
W_ATOL = 1e-4


def global_batch(n: int = 8, vocab: int = TINY_VOCAB, seed: int = 0) -> list[TrainSeq]:
    """n sequences with different prompt lengths and a per-token advantage (as tests/train)."""
    g = torch.Generator().manual_seed(seed)
    return [
        TrainSeq(tokens=torch.randint(0, vocab, (SEQ_LEN,), generator=g).tolist(),
                 loss_mask=[0] * (1 + i % 4) + [1] * (SEQ_LEN - 1 - i % 4),
                 fields={"adv": torch.randn(SEQ_LEN, generator=g).tolist()})
        for i in range(n)
    ]


def pg_loss(logp_T, ent_T, mb):
    loss_sum = -(logp_T * mb.fields["adv"] * mb.weight_T).sum()
    return loss_sum, {}


def make_trainer(model, budget: int = 2 * SEQ_LEN, lr: float = 1e-2, **parallel) -> Trainer:
    cfg = TrainerConfig(optim=OptimConfig(lr=lr, weight_decay=0.1, warmup_steps=1), max_tokens_per_micro_batch=budget,
                        parallel=ParallelConfig(param_dtype="fp32", **parallel))
    return Trainer(model, cfg)


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _name(n: str) -> str:
    return n.replace("_checkpoint_wrapped_module.", "")  # AC wrappers: compare plain names


def full_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {_name(n): full(p.grad) for n, p in trainer.model.named_parameters() if p.grad is not None}


def full_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {_name(n): full(p) for n, p in trainer.model.named_parameters()}


@torch.no_grad()
def forward_outputs(trainer: Trainer, mbs) -> list[dict[str, torch.Tensor]]:
    """hidden_TD, logits_TV and logp_T of each micro-batch (collective: padded with dummy
    micro-batches like the trainer, so every rank runs the same number of forwards)."""
    trainer.model.eval()
    out = []
    logps = trainer.forward_logprobs(mbs)
    for mb in pad_micro_batches(mbs, trainer.group):
        _, meta, slot_T = packed_inputs(mb.cu_seqlens)
        hidden = trainer.model(mb.ids_T, mb.pos_T, meta, slot_T)
        if not mb.dummy:
            out.append({"hidden": hidden, "logits": trainer.model.logits(hidden)})
    for o, logp in zip(out, logps):
        o["logp"] = logp
    return out


def run_workers(script: str, *args, nproc: int = 2, timeout: int = 120) -> None:
    from torchrun import torchrun  # tests/, on the test process's path (workers import this module too)

    torchrun([HERE / script, *args], nproc=nproc, timeout=timeout)


def load_ranks(out_dir: Path, nproc: int = 2) -> list[dict]:
    return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(nproc)]


def assert_close(a: dict, b: dict, what: str, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(set(a) ^ set(b))}"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{what}: {k}: {m}")


def step_batch(step: int):
    return global_batch(seed=100 + step)  # a different global batch each step, fixed by the step index


def full_state(trainer: Trainer) -> dict:
    """Full weights, AdamW moments and schedule position, by parameter name."""
    optim = {}
    for n, p in trainer.model.named_parameters():
        st = trainer.optimizer.state.get(p, {})
        optim[_name(n)] = {k: full(v) for k, v in st.items() if torch.is_tensor(v)}
    return {"weights": full_weights(trainer), "optim": optim, "step": trainer.step,
            "lr": trainer.scheduler.get_last_lr()[0]}


def train_run(trainer: Trainer, rank: int, world: int, steps: int, save_at: int = 0, save_dir=None) -> dict:
    """Grads of the first batch (then cleared), then train to `steps`, saving a checkpoint
    when trainer.step == save_at. Rank r takes sequences r::world of each batch."""
    from miles_fsdp.train.checkpoint import save_checkpoint

    out = {"start": trainer.step}
    mbs = trainer.pack(step_batch(trainer.step)[rank::world])
    trainer.backward(mbs, pg_loss)
    out["grads"] = full_grads(trainer)
    trainer.optimizer.zero_grad(set_to_none=True)
    out["losses"] = []
    while trainer.step < steps:
        mbs = trainer.pack(step_batch(trainer.step)[rank::world])
        out["losses"].append(trainer.train_step(mbs, pg_loss)["train/loss"])
        if save_dir is not None and trainer.step == save_at:
            save_checkpoint(trainer, save_dir, extra={"data_step": trainer.step})
            out["saved"] = full_state(trainer)
    out["final"] = full_state(trainer)
    return out
