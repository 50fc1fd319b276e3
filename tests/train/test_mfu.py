"""MFU counts a MoE's active parameters: top_k of n_experts experts per token."""

import torch

from miles_fsdp.models import ModelArgs, Transformer
from miles_fsdp.train.trainer import _flop_params

BASE = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=320, hidden_size=64,
            intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
# 3 of 12 experts of 32 = one 96-wide MLP: the dense model's active parameters plus the router's
MOE = {**BASE, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": 12,
       "num_experts_per_tok": 3, "moe_intermediate_size": 32, "norm_topk_prob": True, "decoder_sparse_step": 1,
       "mlp_only_layers": []}


def _model(hf):
    with torch.device("meta"):
        return Transformer(ModelArgs.from_hf(hf))


def test_moe_flop_params_count_active_experts():
    dense, moe = _model(BASE), _model(MOE)
    embed = sum(p.numel() for p in dense.embed.parameters())
    n_dense = sum(p.numel() for p in dense.parameters()) - embed
    assert _flop_params(dense) == n_dense
    router = 2 * 12 * 64  # two layers' routers
    assert _flop_params(moe) == n_dense + router
    assert sum(p.numel() for p in moe.parameters()) - embed - router == n_dense + 2 * 3 * 9 * 64 * 32  # 9 idle experts
