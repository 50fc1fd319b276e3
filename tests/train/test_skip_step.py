"""A train step whose grad norm is not finite is skipped, never applied: parameters, AdamW
moments and its step count stay as they were, and `train/skipped_step` says so. Both paths:
the host check (per-parameter AdamW, CPU) and fused AdamW's on-device skip (found_inf: what
the trainer does on CUDA, where it queues the step without waiting for the backward)."""

from __future__ import annotations

import pytest
import torch

from miles_fsdp.models import ModelArgs, Transformer
from miles_fsdp.train.loss import sft_loss
from miles_fsdp.train.optim import OptimConfig
from miles_fsdp.train.packing import TrainSeq
from miles_fsdp.train.trainer import Trainer, TrainerConfig

HF = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=128, hidden_size=32,
          intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
          max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True)


def nan_loss(logp_T, entropy_T, mb):
    loss_sum, stats = sft_loss(logp_T, entropy_T, mb)
    return loss_sum * float("nan"), stats


@pytest.mark.parametrize("fused", [False, True])
def test_non_finite_step_is_skipped(fused):
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf(HF))
    model.init_weights(seed=0)
    trainer = Trainer(model, TrainerConfig(optim=OptimConfig(lr=1e-2)))
    if fused:  # fused AdamW runs on CPU too: the CUDA path's found_inf skip, tested here
        for group in trainer.optimizer.param_groups:
            group["fused"], group["foreach"] = True, None
    seqs = [TrainSeq(list(range(3, 40)))]
    m = trainer.train_step(trainer.pack(seqs), sft_loss)  # one real step: moments exist
    assert m["train/skipped_step"] == 0.0
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in trainer.optimizer.state.items()}
    m = trainer.train_step(trainer.pack(seqs), nan_loss)
    assert m["train/skipped_step"] == 1.0 and m["train/grad_norm"] != m["train/grad_norm"]  # NaN
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, s in trainer.optimizer.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]), k
    assert getattr(trainer.optimizer, "found_inf", None) is None
    m = trainer.train_step(trainer.pack(seqs), sft_loss)  # the next finite step applies
    assert m["train/skipped_step"] == 0.0
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


@pytest.mark.parametrize("clip", [1e-3, 1e6])
def test_fused_step_clips_through_grad_scale(clip, monkeypatch):
    """Fused AdamW on plain tensors clips by dividing the grads as it reads them (grad_scale), not
    by a pass over them first: within float rounding of the clipped-then-stepped parameters, the
    same bits where the norm is under the limit (the scale is exactly 1); grads left unscaled."""
    def run(on_device: bool):
        with torch.device("meta"):
            model = Transformer(ModelArgs.from_hf(HF))
        model.init_weights(seed=0)
        trainer = Trainer(model, TrainerConfig(optim=OptimConfig(lr=1e-2, grad_clip=clip)))
        for group in trainer.optimizer.param_groups:
            group["fused"], group["foreach"] = True, None
        monkeypatch.setattr(trainer, "_skips_on_device", lambda: on_device)
        seqs = [TrainSeq(list(range(3, 40)))]
        norms = [trainer.train_step(trainer.pack(seqs), sft_loss)["train/grad_norm"] for _ in range(3)]
        assert getattr(trainer.optimizer, "grad_scale", None) is None
        return norms, {k: v.clone() for k, v in trainer.model.state_dict().items()}

    (n_dev, p_dev), (n_host, p_host) = run(True), run(False)
    assert n_dev[0] == n_host[0] and (clip > 1 or n_dev[0] > clip)  # clipping active at 1e-3
    for k, v in p_dev.items():
        if clip > 1:
            assert torch.equal(v, p_host[k]), k
        else:
            assert torch.allclose(v, p_host[k], rtol=1e-5, atol=1e-6), (k, (v - p_host[k]).abs().max())
