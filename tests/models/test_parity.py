"""Our Transformer == transformers' model (fp32 logits, max relative error <= 1e-4)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from models_helpers import hf_logits, load_ours, packed_logits, rel_err

CASES = {
    "qwen3": ("qwen3", {}),
    "qwen3_tied_yarn": ("qwen3", dict(tie_word_embeddings=True, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen3_moe_sparse_step": ("qwen3_moe", dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3])),
    "qwen3_moe_unnormed": ("qwen3_moe", dict(norm_topk_prob=False, num_experts_per_tok=3)),
    "qwen2_qkv_bias_linear_rope": ("qwen2", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama_llama3_rope_bias": ("llama", dict(attention_bias=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
}


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_logits_match_transformers(ckpt, case):
    arch, overrides = CASES[case]
    path = ckpt(arch, **overrides)
    ours = load_ours(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    # several packed sequences, one longer than two attention blocks and past the
    # rope-scaling original length
    seqs = [torch.randint(0, 320, (n,), generator=g) for n in (5, 40, 1, 17)]
    got, want = packed_logits(ours, seqs), hf_logits(hf, seqs)
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-4


def test_structure_follows_config(ckpt):
    model = load_ours(ckpt("qwen3_moe", num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3]))
    assert [hasattr(b, "moe") for b in model.layers] == [False, True, False, False]
    assert model.layers[1].moe.w_gate.shape == (8, 32, 64) and model.layers[1].moe.w_down.shape == (8, 64, 32)
    tied = load_ours(ckpt("qwen3", tie_word_embeddings=True, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}))
    assert tied.lm_head is None and "lm_head.weight" not in dict(tied.named_parameters())
    a = tied.args
    assert (a.n_layers, a.n_kv_heads, a.head_dim, a.vocab_size, a.max_position_embeddings) == (2, 2, 16, 320, 256)


def test_training_forward_backward_reaches_every_param(ckpt):
    model = load_ours(ckpt("qwen3_moe", num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3])).train()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 320, (n,), generator=g) for n in (9, 23)]
    packed_logits(model, seqs).float().square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # experts that no token picked legitimately get zero gradient
    assert all(".moe.w_" in n for n in no_grad), no_grad


@torch.no_grad()
def test_init_weights_is_seeded_and_meta_safe(ckpt):
    from miles_fsdp.models import ModelArgs, Transformer

    args = ModelArgs.from_hf(ckpt("qwen2"))
    models = []
    for _ in range(2):
        with torch.device("meta"):
            models.append(Transformer(args))
        models[-1].init_weights(seed=3)
    sd0, sd1 = models[0].state_dict(), models[1].state_dict()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert torch.equal(sd0["layers.0.attn_norm.weight"], torch.ones(64))
    assert torch.equal(sd0["layers.0.attn.wq.bias"], torch.zeros(64))
    seqs = [torch.arange(7)]
    assert torch.isfinite(packed_logits(models[0], seqs)).all()


@torch.no_grad()
def test_bf16_forward_tracks_fp32(ckpt):
    path = ckpt("qwen3_moe")
    seqs = [torch.arange(3, 30), torch.tensor([1, 2, 3])]
    want = packed_logits(load_ours(path), seqs)
    got = packed_logits(load_ours(path, dtype=torch.bfloat16), seqs)
    assert got.dtype == torch.bfloat16
    assert rel_err(got.float(), want) < 0.05
