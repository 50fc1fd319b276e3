"""ModelArgs from HF configs, and RoPE tables against transformers' own functions."""

import json

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from miles_fsdp.models.args import ConfigError, ModelArgs
from miles_fsdp.models.rope import rope_inv_freq


def _cfg(arch="Qwen3ForCausalLM", **kw):
    cfg = dict(
        architectures=[arch], hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=320, intermediate_size=96,
        max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
    )
    cfg.update(kw)
    return cfg


def test_qwen3_moe_fields_and_layer_rule():
    args = ModelArgs.from_hf(_cfg(
        "Qwen3MoeForCausalLM", num_hidden_layers=6, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[3],
    ))
    assert (args.arch, args.n_experts, args.n_experts_per_tok, args.moe_ffn_dim) == ("qwen3_moe", 8, 2, 32)
    assert args.qk_norm and not args.qkv_bias
    # transformers: MoE iff layer not in mlp_only_layers and (layer + 1) % step == 0
    assert [args.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]


def test_qwen2_bias_llama_attention_bias_and_from_dir(tmp_path):
    q2 = ModelArgs.from_hf(_cfg("Qwen2ForCausalLM", head_dim=None))
    assert q2.head_dim == 16 and q2.qkv_bias and not q2.o_bias and not q2.qk_norm
    ll = ModelArgs.from_hf(_cfg("LlamaForCausalLM", attention_bias=True, tie_word_embeddings=True))
    assert ll.qkv_bias and ll.o_bias and ll.tie_embeddings
    (tmp_path / "config.json").write_text(json.dumps(_cfg()))
    args = ModelArgs.from_hf(tmp_path)
    assert args.source_dir == str(tmp_path) and args.n_kv_heads == 2 and args.max_position_embeddings == 256


@pytest.mark.parametrize(
    "cfg, field",
    [
        (_cfg("MistralForCausalLM"), "architectures"),
        (_cfg(hidden_act="gelu"), "hidden_act"),
        (_cfg(use_sliding_window=True), "use_sliding_window"),
        (_cfg(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling.rope_type"),
        (_cfg(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling.low_freq_factor"),
        ({k: v for k, v in _cfg().items() if k != "vocab_size"}, "vocab_size"),
    ],
)
def test_unsupported_fields_are_named(cfg, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ModelArgs.from_hf(cfg)


def test_bad_json_names_file_and_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n"a": 1,\n}')
    with pytest.raises(ConfigError, match=r"config\.json: invalid JSON at line 3"):
        ModelArgs.from_hf(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        ModelArgs.from_hf(tmp_path / "nope")


ROPES = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 1.0,
     "mscale_all_dim": 0.5, "beta_fast": 16, "truncate": False},
]


@pytest.mark.parametrize("rope", ROPES, ids=lambda r: (r or {}).get("rope_type", "default"))
def test_rope_matches_transformers(rope):
    kw = dict(vocab_size=320, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=256, rope_theta=50000.0)
    if rope:
        kw["rope_scaling"] = dict(rope)
    hf = transformers.Qwen3Config(**kw)
    args = ModelArgs.from_hf({**json.loads(hf.to_json_string()), "architectures": ["Qwen3ForCausalLM"]})
    ours_F, our_scale = rope_inv_freq(args.rope, args.head_dim)
    rope_type = hf.rope_parameters["rope_type"]
    if rope_type == "default":
        theirs_F = transformers.models.qwen3.modeling_qwen3.Qwen3RotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        theirs_F = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu")
    assert torch.equal(ours_F, theirs_F[0])
    assert our_scale == pytest.approx(theirs_F[1], rel=1e-12)
    if rope_type == "yarn":
        assert our_scale != 1.0
