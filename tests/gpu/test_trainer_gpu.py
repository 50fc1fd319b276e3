"""GPU: the trainer's forward + backward never waits on the device once per layer.

A device-to-host copy inside a layer (say a `.tolist()` of the attention metadata in the
backward) makes the host wait for the GPU there, so the host's launches stop overlapping the
GPU's work and every step pays both. Counted with torch's sync debug mode on a 2-layer and a
6-layer model: the number of syncs must not grow with depth.

Run on a CUDA machine:  pytest -q tests/gpu/test_trainer_gpu.py
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from miles_fsdp.models import ModelArgs, Transformer  # noqa: E402
from miles_fsdp.parallel import ParallelConfig  # noqa: E402
from miles_fsdp.train.loss import sft_loss  # noqa: E402
from miles_fsdp.train.optim import OptimConfig  # noqa: E402
from miles_fsdp.train.packing import TrainSeq  # noqa: E402
from miles_fsdp.train.scoring import ScoringSpec  # noqa: E402
from miles_fsdp.train.trainer import Trainer, TrainerConfig  # noqa: E402

HF = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=4096, hidden_size=128,
          intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
          max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True)


def syncs_per_backward(layers: int, mode: str) -> list[str]:
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf(dict(HF, num_hidden_layers=layers)))
    model.init_weights(seed=0)
    trainer = Trainer(model, TrainerConfig(optim=OptimConfig(lr=1e-5), max_tokens_per_micro_batch=1024,
                                           parallel=ParallelConfig(param_dtype="auto")))
    g = torch.Generator().manual_seed(0)
    seqs = [TrainSeq(torch.randint(0, 4096, (n,), generator=g).tolist(), [0] * 8 + [1] * (n - 8)) for n in (300, 200, 100)]
    spec = ScoringSpec(kernel_mode=mode)
    trainer.train_step(trainer.pack(seqs), sft_loss, spec)  # warm: Triton compiles, caches fill
    mbs = trainer.pack(seqs)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.backward(mbs, sft_loss, spec)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


def ours(sites: list[str]) -> list[str]:
    return [s for s in sites if "miles_fsdp" in s or "miles_kernels" in s]


@pytest.mark.parametrize("mode", ["invariant", "fast"])
def test_no_host_sync_per_layer(mode):
    shallow, deep = syncs_per_backward(2, mode), syncs_per_backward(6, mode)
    assert len(ours(deep)) == len(ours(shallow)), (
        f"{mode}: our syncs grow with depth: 2 layers {ours(shallow)}, 6 layers {ours(deep)} "
        f"(all syncs, torch's included: {len(shallow)} vs {len(deep)})")
