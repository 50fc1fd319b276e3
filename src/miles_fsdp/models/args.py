"""ModelArgs: the architecture as our model code needs it, read from an HF config.json.

Supported: Qwen3ForCausalLM, Qwen3MoeForCausalLM, Qwen2ForCausalLM, LlamaForCausalLM, and
MiMoForCausalLM (a Qwen2 trunk with MiMo's MTP draft). `num_nextn_predict_layers` (any
architecture) is the number of MTP draft modules, `n_mtp` (models/mtp.py).
Anything we cannot run exactly (sliding window, other activations, partial rotary, ...)
is refused with an error naming the config field, never silently approximated.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from miles_fsdp.errors import UserError

ARCHITECTURES = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "MiMoForCausalLM": "qwen2",
}
# Architectures whose checkpoints store the draft in their own layout (state_dict_adapter.py)
MTP_LAYOUT_OF_ARCH = {"MiMoForCausalLM": "mimo"}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class ConfigError(UserError, ValueError):
    """A config.json we cannot run; the message names the file, the field and the fix."""


@dataclass(frozen=True)
class RopeArgs:
    """RoPE parameters; see rope.py for how each type turns into inv_freq."""

    type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelArgs:
    arch: str  # "qwen3" | "qwen3_moe" | "qwen2" | "llama"
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    ffn_dim: int
    norm_eps: float
    max_position_embeddings: int
    rope: RopeArgs = RopeArgs()
    tie_embeddings: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    qkv_bias: bool = False  # Qwen2 always, Qwen3/Llama with attention_bias
    o_bias: bool = False  # Qwen3/Llama with attention_bias
    # MoE (Qwen3-MoE); n_experts == 0 means dense
    n_experts: int = 0
    n_experts_per_tok: int = 0
    moe_ffn_dim: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # MTP draft (models/mtp.py): n_mtp modules after the trunk, 0 = no draft. mtp_layout names
    # the family's own on-disk layout ("mimo"), "" = ours (state_dict_adapter.draft_layout).
    n_mtp: int = 0
    mtp_layout: str = ""
    # the source config.json and checkpoint dir; save_hf writes the config back and copies
    # generation_config.json and the tokenizer files from the dir
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    source_dir: str | None = field(default=None, compare=False)

    def is_moe_layer(self, layer_id: int) -> bool:
        # Same rule as transformers' Qwen3MoeDecoderLayer.
        return (
            self.n_experts > 0
            and layer_id not in self.mlp_only_layers
            and (layer_id + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_hf(cls, source: str | Path | dict) -> "ModelArgs":
        """Read a checkpoint dir, a config.json path, or an already-parsed config dict."""
        if isinstance(source, dict):
            return _from_dict(dict(source), "<config dict>")
        path = Path(source)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: not found; pass a HF checkpoint directory containing config.json")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        args = _from_dict(cfg, str(path))
        return dataclasses.replace(args, source_dir=str(path.parent))


def _from_dict(cfg: dict, where: str) -> ModelArgs:
    def need(key: str):
        if cfg.get(key) is None:
            raise ConfigError(f"{where}: missing required field '{key}'")
        return cfg[key]

    def refuse(key: str, bad: bool, why: str) -> None:
        if bad:
            raise ConfigError(f"{where}: field '{key}' = {cfg.get(key)!r} is not supported ({why})")

    archs = cfg.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ConfigError(
            f"{where}: field 'architectures' = {archs!r} is not supported; "
            f"expected one of {sorted(ARCHITECTURES)}"
        )
    arch = ARCHITECTURES[archs[0]]
    refuse("hidden_act", cfg.get("hidden_act", "silu") != "silu", "only 'silu' is implemented")
    refuse("use_sliding_window", bool(cfg.get("use_sliding_window", False)), "sliding-window attention")
    refuse("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0) != 1.0, "RoPE covers the full head_dim")
    refuse("mlp_bias", bool(cfg.get("mlp_bias", False)), "MLP projections have no bias here")
    layer_types = cfg.get("layer_types") or []
    refuse("layer_types", any(t != "full_attention" for t in layer_types), "only full attention")

    dim, n_heads = need("hidden_size"), need("num_attention_heads")
    head_dim = cfg.get("head_dim") or dim // n_heads
    attention_bias = bool(cfg.get("attention_bias", False))
    args = dict(
        arch=arch,
        dim=dim,
        n_layers=need("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        vocab_size=need("vocab_size"),
        ffn_dim=need("intermediate_size"),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=need("max_position_embeddings"),
        rope=_rope_from_dict(cfg, where),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qk_norm=arch in ("qwen3", "qwen3_moe"),
        qkv_bias=arch == "qwen2" or attention_bias,
        o_bias=arch != "qwen2" and attention_bias,
        n_mtp=int(cfg.get("num_nextn_predict_layers") or cfg.get("num_mtp_layers") or 0),
        mtp_layout=MTP_LAYOUT_OF_ARCH.get(archs[0], ""),
        hf_config=cfg,
    )
    refuse("num_nextn_predict_layers", args["n_mtp"] < 0, "must be >= 0")
    if args["n_heads"] % args["n_kv_heads"]:
        raise ConfigError(
            f"{where}: num_attention_heads={n_heads} is not a multiple of num_key_value_heads={args['n_kv_heads']}"
        )
    if arch == "qwen3_moe":
        args.update(
            # transformers 5 writes num_local_experts (its attribute_map alias of num_experts)
            n_experts=cfg.get("num_experts") or need("num_local_experts"),
            n_experts_per_tok=need("num_experts_per_tok"),
            moe_ffn_dim=need("moe_intermediate_size"),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            decoder_sparse_step=int(cfg.get("decoder_sparse_step", 1)),
            mlp_only_layers=tuple(cfg.get("mlp_only_layers") or ()),
        )
        refuse("decoder_sparse_step", args["decoder_sparse_step"] < 1, "must be >= 1")
        refuse(
            "num_experts_per_tok",
            not 0 < args["n_experts_per_tok"] <= args["n_experts"],
            f"must be in [1, num_experts={args['n_experts']}]",
        )
    return ModelArgs(**args)


def _rope_from_dict(cfg: dict, where: str) -> RopeArgs:
    # transformers 5 writes "rope_parameters" (theta inside); older configs write a top-level
    # "rope_theta" plus an optional "rope_scaling" dict keyed by "type" or "rope_type".
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{where}: field '{key}.rope_type' = {rope_type!r} is not supported; expected one of {ROPE_TYPES}")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    out: dict[str, Any] = dict(type=rope_type, theta=float(theta))
    if rope_type == "default":
        return RopeArgs(**out)
    if rope_type == "yarn" and params.get("factor") is None and params.get("original_max_position_embeddings"):
        params["factor"] = cfg["max_position_embeddings"] / params["original_max_position_embeddings"]
    if params.get("factor") is None:
        raise ConfigError(f"{where}: field '{key}.factor' is required for rope_type {rope_type!r}")
    out["factor"] = float(params["factor"])
    if rope_type in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = int(
            params.get("original_max_position_embeddings") or cfg["max_position_embeddings"]
        )
    if rope_type == "llama3":
        for k in ("low_freq_factor", "high_freq_factor"):
            if params.get(k) is None:
                raise ConfigError(f"{where}: field '{key}.{k}' is required for rope_type 'llama3'")
            out[k] = float(params[k])
    if rope_type == "yarn":
        # `or` matches transformers: a null beta falls back to the paper's default
        out["beta_fast"] = float(params.get("beta_fast") or 32)
        out["beta_slow"] = float(params.get("beta_slow") or 1)
        out["truncate"] = bool(params.get("truncate", True))
        for k in ("attention_factor", "mscale", "mscale_all_dim"):
            if params.get(k) is not None:
                out[k] = float(params[k])
    return RopeArgs(**out)
