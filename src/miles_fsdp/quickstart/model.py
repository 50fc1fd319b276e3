"""A tiny Qwen3 model initialised from scratch, saved as an HF checkpoint directory.

It goes through the paths real models use: an HF `Qwen3Config` -> `ModelArgs.from_hf` ->
`Transformer` built on meta -> seeded `init_weights` -> `save_hf`, next to the quickstart's
character tokenizer and a generation_config.json. The result loads with our `load_hf` and
with transformers' `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from miles_fsdp.models import ModelArgs, Transformer, save_hf
from miles_fsdp.quickstart.tokenizer import BOS, EOS, PAD, save_char_tokenizer, vocab


@dataclass
class TinyModelConfig:
    dim: int = 128
    """Hidden size."""
    n_layers: int = 2
    """Transformer blocks."""
    n_heads: int = 4
    """Query heads (head_dim = dim // n_heads)."""
    n_kv_heads: int = 2
    """Key/value heads (grouped-query attention, as in Qwen3)."""
    ffn_dim: int = 512
    """SwiGLU hidden size."""
    max_position_embeddings: int = 256
    """Longest prompt + response."""
    seed: int = 0
    """Seeds the initial weights."""

    def __post_init__(self):
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"TinyModelConfig: dim={self.dim} must be a multiple of n_heads={self.n_heads}, "
                f"and n_heads a multiple of n_kv_heads={self.n_kv_heads}"
            )


def vocab_size() -> int:
    # rounded up to a multiple of 32: spare rows are never produced by the tokenizer
    return -(-len(vocab()) // 32) * 32


def hf_config(cfg: TinyModelConfig) -> dict:
    """The config.json of the tiny model, as transformers writes it for Qwen3."""
    from transformers import Qwen3Config

    ids = vocab()
    config = Qwen3Config(
        vocab_size=vocab_size(),
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.dim // cfg.n_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
    )
    out = config.to_dict()
    out["architectures"] = ["Qwen3ForCausalLM"]
    return out


def build_model(cfg: TinyModelConfig) -> Transformer:
    """Our Transformer with seeded random weights (fp32, CPU)."""
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf(hf_config(cfg)))
    return model.init_weights(seed=cfg.seed, device="cpu")


def write_tiny_model(path: str | Path, cfg: TinyModelConfig) -> Path:
    """Write config.json, model.safetensors, generation_config.json and the tokenizer to `path`."""
    path = Path(path)
    model = build_model(cfg)
    save_hf(model, path)
    save_char_tokenizer(path)
    ids = vocab()
    gen = {"bos_token_id": ids[BOS], "eos_token_id": ids[EOS], "pad_token_id": ids[PAD]}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path


def num_params(cfg: TinyModelConfig) -> int:
    return sum(p.numel() for p in build_model(cfg).parameters())
