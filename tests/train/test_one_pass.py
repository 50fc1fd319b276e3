"""OptimConfig.one_pass: the optimizer step as one pass over the backward's bf16 grads
(train/optim.py AdamW.step_with, miles_kernels/_triton/adamw.py) on one rank without FSDP.

On the CPU the kernel runs in Triton's interpreter (a child process with TRITON_INTERPRET=1):
its first step is torch's AdamW step within fp32 rounding (the CPU's AdamW is not the fused
CUDA kernel whose bits tests/gpu/test_optim_gpu.py compares), with and without
grad accumulation and the draft, writes the shadows when they are kept, and resumes from its
own state_dict. Here: the settings refused where the pass cannot run, the grad norm's bits,
and LocalParams' kept grads.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from miles_fsdp.models import ModelArgs, Transformer
from miles_fsdp.parallel import ParallelConfig
from miles_fsdp.train.draft import DraftConfig
from miles_fsdp.train.loss import LossNorm, sft_loss
from miles_fsdp.train.optim import OptimConfig, grad_norm
from miles_fsdp.train.packing import TrainSeq
from miles_fsdp.train.scoring import ScoringSpec
from miles_fsdp.train.trainer import Trainer, TrainerConfig

HF = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=256, hidden_size=64,
          intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
          max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
          num_nextn_predict_layers=1)


def _seqs() -> list[TrainSeq]:
    g = torch.Generator().manual_seed(1)
    return [TrainSeq(torch.randint(0, 256, (n,), generator=g).tolist(), [0] * 4 + [1] * (n - 4)) for n in (40, 33, 57)]


def _trainer(one_pass, dtype="bf16", units="none", budget=96, draft=True, weight_decay=0.01,
             draft_one_pass="same") -> Trainer:
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf(HF))
    model.init_weights(seed=0)
    cfg = TrainerConfig(optim=OptimConfig(lr=1e-2, weight_decay=weight_decay, one_pass=one_pass),
                        max_tokens_per_micro_batch=budget, parallel=ParallelConfig(fsdp_units=units, param_dtype=dtype))
    draft_cfg = DraftConfig(optim=OptimConfig(lr=1e-3, grad_clip=0.5,
                                              one_pass=one_pass if draft_one_pass == "same" else draft_one_pass))
    return Trainer(model, cfg, draft=draft_cfg if draft else None)


def test_refused_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for kw, word in (({}, "cpu"), (dict(dtype="fp32"), "fp32 compute"), (dict(units="model"), "units 'model'")):
        with pytest.raises(ValueError, match="one_pass") as e:
            _trainer(True, **kw)
        assert word in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="draft.optim.one_pass"):
        _trainer(None, draft_one_pass=True)
    assert not _trainer(None).one_pass and not _trainer(False).one_pass  # auto: off on the CPU
    assert not _trainer(None).draft_one_pass


def test_grad_norm_is_get_total_norm():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=g) * 10.0 ** (i % 5 - 2) for i, n in enumerate((7, 300, 1, 4096, 65))]
    assert torch.equal(grad_norm(grads), torch.nn.utils.get_total_norm(grads))
    bf16 = [x.bfloat16() for x in grads]
    torch.testing.assert_close(grad_norm(bf16), torch.nn.utils.get_total_norm([x.float() for x in bf16]))
    mixed = [x if i % 2 else x.bfloat16() for i, x in enumerate(grads)]
    torch.testing.assert_close(grad_norm(mixed), torch.nn.utils.get_total_norm([x.float() for x in mixed]))


@pytest.mark.parametrize("backwards", [1, 2])
def test_flush_keeps_the_backward_grads(backwards):
    """flush_grads(keep=...) hands the kept masters' grads back as accumulated (bf16 after one
    backward, fp32 after two) with the values the plain flush gives their .grad; the others'
    .grad as always; the shadows are offered to the optimizer only while kept."""
    seqs = _seqs()
    plain, kept = _trainer(False), _trainer(False)
    budget = 200 if backwards == 1 else 96
    plain.cfg.max_tokens_per_micro_batch = kept.cfg.max_tokens_per_micro_batch = budget
    mbs = plain.pack(seqs)
    assert len(mbs) == backwards
    plain.backward(mbs, sft_loss)
    kept._accumulate(mbs, sft_loss, ScoringSpec(), LossNorm.token_mean, 1.0, False)
    got = kept.local.flush_grads(keep=kept.trunk_params)
    assert set(map(id, got)) == set(map(id, kept.trunk_params))
    for (name, p), q in zip(plain.model.named_parameters(), kept.model.parameters()):
        if name.startswith("mtp."):
            assert torch.equal(q.grad, p.grad), name  # the draft's grads: .grad as always
            continue
        assert q.grad is None and got[q].dtype == (torch.bfloat16 if backwards == 1 else torch.float32), name
        assert torch.equal(got[q].float(), p.grad), name
    assert kept.local.held_shadows(kept.trunk_params) is None  # freed after the step: not offered
    kept.local.keep_shadows = True
    shadows = kept.local.held_shadows(kept.trunk_params)
    assert shadows is not None and all(s.shape == m.shape and s.dtype == torch.bfloat16 for m, s in shadows.items())


def _train_steps(trainer: Trainer, steps: int = 3) -> list[dict]:
    out = []
    for _ in range(steps):
        m = trainer.train_step(trainer.pack(_seqs()), sft_loss)
        out.append({k: v for k, v in m.items() if not k.startswith(("perf/", "time/"))})
    return out


def _child() -> None:
    """Run under TRITON_INTERPRET=1 (the kernel on CPU tensors)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.set_num_threads(1)
    for budget in (200, 96):  # one backward a step (bf16 grads), two (fp32)
        base, one = _trainer(False, budget=budget), _trainer(True, budget=budget)
        assert one.one_pass and not base.one_pass and one.draft_one_pass and not base.draft_one_pass
        # the first step within fp32 rounding of torch's; later ones drift apart as bf16 training
        # does (a flipped shadow bit moves bf16 grads by an ulp, which AdamW's normalisation
        # scales up where grads are small): compared loosely
        for step, tol in ((0, 1e-5), (1, 1e-2), (2, 1e-2)):
            a, b = _train_steps(base, 1)[0], _train_steps(one, 1)[0]
            assert a.keys() == b.keys()
            for k in a:
                assert abs(a[k] - b[k]) <= tol * max(1.0, abs(a[k])), f"budget {budget} step {step}: {k} {a[k]} vs {b[k]}"
            if step == 0:
                for (name, p), q in zip(base.model.named_parameters(), one.model.parameters()):
                    torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=lambda m: f"budget {budget}: {name}: {m}")
        for p, q in zip(base.model.parameters(), one.model.parameters()):
            st_p, st_q = base.optimizer.state.get(p), one.optimizer.state.get(q)
            if st_p:  # the trunk's: torch's state layout (the draft has its own optimizer)
                assert st_q.keys() == st_p.keys() and float(st_q["step"]) == float(st_p["step"]) == 3.0
        assert all(q.grad is None for q in one.trunk_params)
    # the draft alone (train_draft_step): its one pass against torch's step
    base, one = _trainer(False, budget=96), _trainer(True, budget=96)
    a, b = base.train_draft_step(base.pack(_seqs())), one.train_draft_step(one.pack(_seqs()))
    assert abs(a["draft/loss"] - b["draft/loss"]) < 1e-6 and abs(a["draft/grad_norm"] - b["draft/grad_norm"]) < 1e-5
    for (name, p), q in zip(base.model.named_parameters(), one.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=lambda m: f"train_draft_step: {name}: {m}")
        assert name.startswith("mtp.") or torch.equal(p, q), f"{name}: the trunk moved in a draft step"
    # kept shadows: written by the pass with the new masters, no cast before the next forward
    one = _trainer(True, budget=96)
    one.local.keep_shadows = True
    _train_steps(one, 1)
    for i, (m, s) in enumerate(zip(one.local.masters, one.local.shadows)):
        if not any(m is p for p in one.trunk_params):
            continue
        near = (s == m.detach().bfloat16()) | (s == (m.detach().view(torch.int32) & -65536).view(torch.float32).bfloat16())
        assert bool(near.all()), "a shadow is not its new master in bf16"  # the interpreter truncates
        assert one.local._versions[i] == m._version, "the shadow would be cast again"
    # resume: a trainer loaded from the state_dicts continues with the same bits
    a = _trainer(True, budget=96, draft=False)
    _train_steps(a, 2)
    b = _trainer(True, budget=96, draft=False)
    b.model.load_state_dict(a.model.state_dict())
    b.optimizer.load_state_dict(copy.deepcopy(a.optimizer.state_dict()))  # state_dict() holds a's tensors
    b.scheduler.load_state_dict(a.scheduler.state_dict())
    assert _train_steps(a, 1) == _train_steps(b, 1)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


def test_one_pass_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    code = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_one_pass as t; t._child()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
