"""Explicit HF name <-> module name table.

Our names (left) are the parameters of `Transformer`; HF names (right) are the Hub layout
that transformers writes with save_pretrained. MoE experts are stacked 3-D params
`moe.w_gate/w_up [E, F, D]`, `moe.w_down [E, D, F]`; on disk they are one tensor per
expert (`mlp.experts.{e}.gate_proj.weight`). The fused transformers-5 runtime layout
(`mlp.experts.gate_up_proj [E, 2F, D]`, `mlp.experts.down_proj [E, D, F]`) is also read.

The MTP draft (`mtp.{m}.*`, models/mtp.py) has three on-disk layouts, all read (whichever the
checkpoint holds); `draft_layout(args)` is the one written:

    ours (module m)     qwen3_next                   mimo                                deepseek_v3 (L = n_layers + m)
    enorm               mtp.pre_fc_norm_embedding    model.mtp_layers.{m}.token_layernorm   model.layers.{L}.enorm
    hnorm               mtp.pre_fc_norm_hidden       model.mtp_layers.{m}.hidden_layernorm  model.layers.{L}.hnorm
    eh_proj [emb|hid]   mtp.fc                       model.mtp_layers.{m}.input_proj [hid|emb]  model.layers.{L}.eh_proj
    norm                mtp.norm                     model.mtp_layers.{m}.final_layernorm   model.layers.{L}.shared_head.norm
    block.<layer>       mtp.layers.{m}.<layer>       model.mtp_layers.{m}.<layer>           model.layers.{L}.<layer>

(<layer> = a decoder layer's own names, e.g. self_attn.q_proj.weight.) Qwen3-Next shares one
fc/norm set across its modules, so reading gives each module a copy and it is written for
one module only: MiMo checkpoints keep MiMo's layout, others get Qwen3-Next's for one module
and DeepSeek-V3's for more. MiMo's input_proj takes [hidden, emb]: its halves are swapped on
the way in and out. DeepSeek-V3's per-module copies of the embedding and lm_head
(`embed_tokens`, `shared_head.head`) are ignored: the draft shares the trunk's.
Neither Qwen3-Next's trunk nor DeepSeek-V3's (MLA) runs here; their draft layouts serve
trunks we run (GLM-4.5 style checkpoints use DeepSeek-V3's on standard attention).
A checkpoint without draft tensors loaded into a model with n_mtp > 0 gets a fresh draft
(`load_targets(args, fresh_draft=True)`: each module's block from the last decoder layer, its
`norm` from the final norm; hf_io writes the constants of mtp.fresh_draft_constants).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

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

MTP_LAYOUTS = ("qwen3_next", "mimo", "deepseek_v3")
_MTP_EXTRA = {  # layout -> [(ours under mtp.{m}., HF name)]; {m} module, {L} = n_layers + m
    "qwen3_next": [("enorm.weight", "mtp.pre_fc_norm_embedding.weight"), ("hnorm.weight", "mtp.pre_fc_norm_hidden.weight"),
                   ("eh_proj.weight", "mtp.fc.weight"), ("norm.weight", "mtp.norm.weight")],
    "mimo": [("enorm.weight", "model.mtp_layers.{m}.token_layernorm.weight"),
             ("hnorm.weight", "model.mtp_layers.{m}.hidden_layernorm.weight"),
             ("eh_proj.weight", "model.mtp_layers.{m}.input_proj.weight"),
             ("norm.weight", "model.mtp_layers.{m}.final_layernorm.weight")],
    "deepseek_v3": [("enorm.weight", "model.layers.{L}.enorm.weight"), ("hnorm.weight", "model.layers.{L}.hnorm.weight"),
                    ("eh_proj.weight", "model.layers.{L}.eh_proj.weight"),
                    ("norm.weight", "model.layers.{L}.shared_head.norm.weight")],
}
_MTP_BLOCK = {"qwen3_next": "mtp.layers.{m}.", "mimo": "model.mtp_layers.{m}.", "deepseek_v3": "model.layers.{L}."}
_DRAFT_NAME = re.compile(r"^(mtp\.|model\.mtp_layers\.)|^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Target:
    """Where one HF tensor goes: `param[dst_index] = hf_tensor[src_index]` (after swapping the
    two halves of its last dim when `swap_halves`: MiMo's input_proj).

    `covers` lists the canonical (written) HF names this tensor provides, for the
    missing-tensor check."""

    name: str
    dst_index: tuple = ()
    src_index: tuple = ()
    covers: tuple[str, ...] = ()
    swap_halves: bool = False


def swap_halves(t):
    """[..., 2D] -> the two D halves of the last dim exchanged (its own inverse)."""
    a, b = t.chunk(2, dim=-1)
    return torch.cat([b, a], dim=-1)


def draft_layout(args: ModelArgs) -> str:
    """The layout save_hf writes the draft in (see the module docstring)."""
    if args.mtp_layout:
        return args.mtp_layout
    return "qwen3_next" if args.n_mtp <= 1 else "deepseek_v3"


def _layer_rows(args: ModelArgs, layer_id: int) -> list[tuple[str, str, int | None]]:
    """(ours, HF, expert index or None) of one decoder layer, names relative to the layer."""
    rows = list(_ATTN)
    rows += _QKV_BIAS if args.qkv_bias else []
    rows += _O_BIAS if args.o_bias else []
    rows += _QK_NORM if args.qk_norm else []
    rows += _MOE_ROUTER if args.is_moe_layer(layer_id) else _DENSE_MLP
    out: list[tuple[str, str, int | None]] = [(ours, hf, None) for ours, hf in rows]
    if args.is_moe_layer(layer_id):
        for e in range(args.n_experts):
            out += [(ours, hf.format(e=e), e) for ours, hf in _MOE_EXPERTS]
    return out


def _disk_rows(args: ModelArgs, layer_id: int):
    """(HF, ours, dst_index, src_index, covers as (ours, expert)) of one decoder layer as found
    on disk: the Hub rows and transformers' fused experts, names relative to the layer."""
    rows = [(hf, ours, () if e is None else (e,), (), ((ours, e),)) for ours, hf, e in _layer_rows(args, layer_id)]
    if args.is_moe_layer(layer_id):
        F, all_e = args.moe_ffn_dim, range(args.n_experts)
        # transformers' fused gate_up is [E, 2F, D] with gate rows first (chunk(2) order)
        rows += [
            ("mlp.experts.gate_up_proj", "moe.w_gate", (), (slice(None), slice(0, F)),
             tuple(("moe.w_gate", e) for e in all_e)),
            ("mlp.experts.gate_up_proj", "moe.w_up", (), (slice(None), slice(F, 2 * F)),
             tuple(("moe.w_up", e) for e in all_e)),
            ("mlp.experts.down_proj", "moe.w_down", (), (), tuple(("moe.w_down", e) for e in all_e)),
        ]
    return rows


def _mtp_names(args: ModelArgs, layout: str, m: int) -> tuple[list[tuple[str, str]], str]:
    """(extras as (ours, HF), block HF prefix) of draft module m in `layout`."""
    fill = dict(m=m, L=args.n_layers + m)
    return [(ours, hf.format(**fill)) for ours, hf in _MTP_EXTRA[layout]], _MTP_BLOCK[layout].format(**fill)


def hf_table(args: ModelArgs) -> dict[str, tuple[str, int | None]]:
    """Canonical (written) HF name -> (our param name, expert index or None), in HF file order."""
    table: dict[str, tuple[str, int | None]] = {}
    for ours, hf in _TOP:
        table[hf] = (ours, None)
    if not args.tie_embeddings:
        table["lm_head.weight"] = ("lm_head.weight", None)
    for i in range(args.n_layers):
        for ours, hf, e in _layer_rows(args, i):
            table[f"model.layers.{i}.{hf}"] = (f"layers.{i}.{ours}", e)
    for m in range(args.n_mtp):
        extras, block = _mtp_names(args, draft_layout(args), m)
        for ours, hf in extras:
            table[hf] = (f"mtp.{m}.{ours}", None)
        for ours, hf, e in _layer_rows(args, args.n_layers - 1):
            table[block + hf] = (f"mtp.{m}.block.{ours}", e)
    return table


def load_targets(args: ModelArgs, fresh_draft: bool = False) -> dict[str, list[Target]]:
    """HF name as found on disk -> targets, for every layout we read (Hub and fused experts;
    the three draft layouts). fresh_draft: the checkpoint has no draft, so the last decoder
    layer and the final norm also fill each draft module's block and norm."""
    canon = {v: hf for hf, v in hf_table(args).items()}
    out: dict[str, list[Target]] = {}

    def add(hf: str, ours: str, dst: tuple, src: tuple, covers, swap: bool = False) -> None:
        out.setdefault(hf, []).append(Target(ours, dst, src, tuple(canon[c] for c in covers), swap))

    def add_layer(hf_prefix: str, our_prefix: str, layer_id: int) -> None:
        for hf, ours, dst, src, covers in _disk_rows(args, layer_id):
            add(hf_prefix + hf, our_prefix + ours, dst, src, [(our_prefix + o, e) for o, e in covers])

    for hf, (ours, e) in hf_table(args).items():
        if not ours.startswith(("layers.", "mtp.")):
            add(hf, ours, (), (), [(ours, e)])
    for i in range(args.n_layers):
        add_layer(f"model.layers.{i}.", f"layers.{i}.", i)
    last = args.n_layers - 1  # a draft block is the same kind of layer as the last
    for m in range(args.n_mtp):
        for layout in MTP_LAYOUTS:
            extras, block = _mtp_names(args, layout, m)
            for ours, hf in extras:
                swap = layout == "mimo" and ours == "eh_proj.weight"
                add(hf, f"mtp.{m}.{ours}", (), (), [(f"mtp.{m}.{ours}", None)], swap)
            add_layer(block, f"mtp.{m}.block.", last)
        if fresh_draft:
            add_layer(f"model.layers.{last}.", f"mtp.{m}.block.", last)
            add("model.norm.weight", f"mtp.{m}.norm.weight", (), (), [(f"mtp.{m}.norm.weight", None)])
    return out


def is_draft_name(args: ModelArgs, hf_name: str) -> bool:
    """An HF name of a draft tensor, in any of the layouts."""
    m = _DRAFT_NAME.match(hf_name)
    return bool(m) and (m.group(2) is None or int(m.group(2)) >= args.n_layers)


def is_ignored(args: ModelArgs, hf_name: str) -> bool:
    # Tied checkpoints sometimes still store lm_head; transformers ignores it too. A model
    # without a draft ignores a checkpoint's draft (as transformers does).
    if _IGNORED.match(hf_name) or (args.tie_embeddings and hf_name == "lm_head.weight"):
        return True
    if not is_draft_name(args, hf_name):
        return False
    return args.n_mtp == 0 or hf_name.endswith((".embed_tokens.weight", ".shared_head.head.weight"))


def swaps_halves(args: ModelArgs, hf_name: str) -> bool:
    """The canonical HF tensor is stored with its last dim's halves swapped (MiMo's input_proj)."""
    return draft_layout(args) == "mimo" and hf_name.startswith("model.mtp_layers.") and \
        hf_name.endswith(".input_proj.weight")


def ours_to_hf(args: ModelArgs) -> dict[str, list[str]]:
    """Our param name -> HF names: one name, or one per expert (index = expert id)."""
    out: dict[str, list[str]] = {}
    for hf, (ours, e) in hf_table(args).items():
        out.setdefault(ours, []).append(hf)
    return out
