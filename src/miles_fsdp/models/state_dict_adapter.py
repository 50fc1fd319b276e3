"""Explicit HF name <-> module name table.

Our names (left) are the parameters of `Transformer`; HF names (right) are the Hub layout
that transformers writes with save_pretrained. MoE experts are stacked 3-D params
`moe.w_gate/w_up [E, F, D]`, `moe.w_down [E, D, F]`; on disk they are one tensor per
expert (`mlp.experts.{e}.gate_proj.weight`). The fused transformers-5 runtime layout
(`mlp.experts.gate_up_proj [E, 2F, D]`, `mlp.experts.down_proj [E, D, F]`) is also read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from miles_fsdp.models.args import ModelArgs

_TOP = [
    ("embed.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
]
_ATTN = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn.wq.weight", "self_attn.q_proj.weight"),
    ("attn.wk.weight", "self_attn.k_proj.weight"),
    ("attn.wv.weight", "self_attn.v_proj.weight"),
    ("attn.wo.weight", "self_attn.o_proj.weight"),
    ("mlp_norm.weight", "post_attention_layernorm.weight"),
]
_QKV_BIAS = [
    ("attn.wq.bias", "self_attn.q_proj.bias"),
    ("attn.wk.bias", "self_attn.k_proj.bias"),
    ("attn.wv.bias", "self_attn.v_proj.bias"),
]
_O_BIAS = [("attn.wo.bias", "self_attn.o_proj.bias")]
_QK_NORM = [
    ("attn.q_norm.weight", "self_attn.q_norm.weight"),
    ("attn.k_norm.weight", "self_attn.k_norm.weight"),
]
_DENSE_MLP = [
    ("mlp.w_gate.weight", "mlp.gate_proj.weight"),
    ("mlp.w_up.weight", "mlp.up_proj.weight"),
    ("mlp.w_down.weight", "mlp.down_proj.weight"),
]
_MOE_ROUTER = [("moe.router.weight", "mlp.gate.weight")]
_MOE_EXPERTS = [  # per expert e
    ("moe.w_gate", "mlp.experts.{e}.gate_proj.weight"),
    ("moe.w_up", "mlp.experts.{e}.up_proj.weight"),
    ("moe.w_down", "mlp.experts.{e}.down_proj.weight"),
]
# HF keys that carry no parameter (old checkpoints store RoPE buffers)
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Target:
    """Where one HF tensor goes: `param[dst_index] = hf_tensor[src_index]`.

    `covers` lists the canonical (Hub) HF names this tensor provides, for the
    missing-tensor check."""

    name: str
    dst_index: tuple = ()
    src_index: tuple = ()
    covers: tuple[str, ...] = ()


def hf_table(args: ModelArgs) -> dict[str, tuple[str, int | None]]:
    """Canonical HF name -> (our param name, expert index or None), in HF file order."""
    table: dict[str, tuple[str, int | None]] = {}
    for ours, hf in _TOP:
        table[hf] = (ours, None)
    if not args.tie_embeddings:
        table["lm_head.weight"] = ("lm_head.weight", None)
    for i in range(args.n_layers):
        rows = list(_ATTN)
        rows += _QKV_BIAS if args.qkv_bias else []
        rows += _O_BIAS if args.o_bias else []
        rows += _QK_NORM if args.qk_norm else []
        rows += _MOE_ROUTER if args.is_moe_layer(i) else _DENSE_MLP
        for ours, hf in rows:
            table[f"model.layers.{i}.{hf}"] = (f"layers.{i}.{ours}", None)
        if args.is_moe_layer(i):
            for e in range(args.n_experts):
                for ours, hf in _MOE_EXPERTS:
                    table[f"model.layers.{i}.{hf.format(e=e)}"] = (f"layers.{i}.{ours}", e)
    return table


def load_targets(args: ModelArgs) -> dict[str, list[Target]]:
    """HF name as found on disk -> targets, for every layout we read (Hub and fused)."""
    out: dict[str, list[Target]] = {}
    for hf, (ours, e) in hf_table(args).items():
        out[hf] = [Target(ours, (e,) if e is not None else (), (), (hf,))]
    F, all_e = args.moe_ffn_dim, range(args.n_experts)
    for i in range(args.n_layers):
        if not args.is_moe_layer(i):
            continue
        p = f"model.layers.{i}.mlp.experts"
        gate = tuple(f"{p}.{e}.gate_proj.weight" for e in all_e)
        up = tuple(f"{p}.{e}.up_proj.weight" for e in all_e)
        down = tuple(f"{p}.{e}.down_proj.weight" for e in all_e)
        # transformers' fused gate_up is [E, 2F, D] with gate rows first (chunk(2) order)
        out[f"{p}.gate_up_proj"] = [
            Target(f"layers.{i}.moe.w_gate", (), (slice(None), slice(0, F)), gate),
            Target(f"layers.{i}.moe.w_up", (), (slice(None), slice(F, 2 * F)), up),
        ]
        out[f"{p}.down_proj"] = [Target(f"layers.{i}.moe.w_down", (), (), down)]
    return out


def is_ignored(args: ModelArgs, hf_name: str) -> bool:
    # Tied checkpoints sometimes still store lm_head; transformers ignores it too.
    return bool(_IGNORED.match(hf_name)) or (args.tie_embeddings and hf_name == "lm_head.weight")


def ours_to_hf(args: ModelArgs) -> dict[str, list[str]]:
    """Our param name -> HF names: one name, or one per expert (index = expert id)."""
    out: dict[str, list[str]] = {}
    for hf, (ours, e) in hf_table(args).items():
        out.setdefault(ours, []).append(hf)
    return out
