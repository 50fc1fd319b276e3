"""Tiny random HF checkpoints for tests (no network, seconds on CPU).

`build_tiny_checkpoint(dir, arch)` writes what `from_pretrained` expects: config.json,
model.safetensors (written by transformers itself, so the on-disk layout is the real one),
generation_config.json and a byte-level tokenizer with a Qwen-style chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ARCHS = ("qwen3", "qwen3_moe", "qwen2", "llama")

# Byte-level vocab: ids 0..255 are bytes, then the specials below. vocab_size leaves room.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_VOCAB = 320

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_COMMON = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=256,  # <|endoftext|>
    eos_token_id=258,  # <|im_end|>
)

_ARCH_DEFAULTS = {
    "qwen3": dict(head_dim=16),
    "qwen3_moe": dict(
        head_dim=16,
        num_hidden_layers=3,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    "qwen2": dict(),  # head_dim = hidden / heads = 16; q/k/v carry a bias
    "llama": dict(head_dim=16),
}


def _hf_classes(arch: str):
    import transformers as tf

    table = {
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
    }
    if arch not in table:
        raise ValueError(f"build_tiny_checkpoint: unknown arch {arch!r}; expected one of {ARCHS}")
    return table[arch]


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    # HF init leaves norms at 1 and biases at 0, which would hide bugs in those paths.
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if p.ndim == 1 and name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _byte_to_unicode() -> list[str]:
    # GPT-2 byte-level alphabet, indexed by byte value, so token id == byte value.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def write_tiny_tokenizer(path: str | Path) -> Path:
    """Write a byte-level BPE tokenizer (256 bytes + specials) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={ch: b for b, ch in enumerate(_byte_to_unicode())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})  # ids 256, 257, 258
    fast.eos_token = "<|im_end|>"
    fast.pad_token = "<|endoftext|>"
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return Path(path)


def build_tiny_checkpoint(
    path: str | Path, arch: str = "qwen3", seed: int = 0, tokenizer: bool = True, **overrides
) -> Path:
    """Write a random tiny HF checkpoint of `arch` into `path` and return `path`.

    `overrides` go straight into the HF config (e.g. `tie_word_embeddings=True`,
    `rope_scaling={...}`, `mlp_only_layers=[1]`, `num_hidden_layers=4`).
    """
    config_cls, model_cls = _hf_classes(arch)
    kwargs = {**_COMMON, **_ARCH_DEFAULTS[arch], **overrides}
    if arch == "qwen2":
        kwargs.setdefault("use_sliding_window", False)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    _randomize(model, seed)
    if config.tie_word_embeddings:
        model.tie_weights()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    gen_cfg = path / "generation_config.json"
    if not gen_cfg.exists():
        gen_cfg.write_text(json.dumps({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}))
    if tokenizer:
        write_tiny_tokenizer(path)
    return path
