"""The MTP draft (models/mtp.py): invariance, the engine's paged path, transformers parity,
the three HF layouts, the fresh draft, and transformers still loading a trunk saved with one."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import miles_kernels as mk
from miles_fsdp.models import CheckpointError, load_model, packed_inputs, save_hf
from miles_fsdp.models.hf_io import SINGLE_FILE
from models_helpers import hf_logits, rel_err

V = 320  # tiny vocab


def _shifted_hidden(h_TD, cu):
    """H_{s-1} for entry s, 0 at each sequence's first position (the draft stream's input)."""
    prev_TD = torch.cat([h_TD.new_zeros(1, h_TD.shape[1]), h_TD[:-1]])
    prev_TD[cu[:-1].long()] = 0
    return prev_TD


def _draft_g(model, seqs):
    cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    pos_T, meta, slot_T = packed_inputs(cu)
    ids_T = torch.cat(seqs)
    h_TD = model(ids_T, pos_T, meta, slot_T)
    return model.draft_forward(_shifted_hidden(h_TD, cu), ids_T, pos_T, meta, slot_T), cu


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture
def drafted(ckpt):
    """A qwen3 model with a random (not fresh) 1-module draft."""
    model = load_model(ckpt("qwen3"), n_mtp=1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.mtp.named_parameters():
            p.copy_((1 + 0.1 * torch.randn(p.shape, generator=g)) if n.endswith("norm.weight")
                    else 0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@torch.no_grad()
def test_draft_row_alone_equals_row_in_a_batch(drafted):
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, V, (n,), generator=g) for n in (7, 37, 1, 20)]
    g_all, cu = _draft_g(drafted, seqs)
    for i, s in enumerate(seqs):
        alone, _ = _draft_g(drafted, [s])
        assert torch.equal(alone, g_all[cu[i]:cu[i + 1]])
    logits = drafted.draft_logits(g_all)
    assert torch.equal(drafted.draft_logits(g_all[5:9]), logits[5:9])


@torch.no_grad()
def test_draft_paged_decode_equals_packed_training_stream(drafted):
    # the engine's path: one draft KV layer in pages, entries fed one at a time (decode) after
    # a prefill chunk; every g equals the training stream's, bit for bit
    seq = torch.randint(0, V, (40,), generator=torch.Generator().manual_seed(1))
    want_TD, cu = _draft_g(drafted, [seq])
    pos_T, meta, slot_T = packed_inputs(cu)
    hid_TD = _shifted_hidden(drafted(seq, pos_T, meta, slot_T), cu)
    S, a = mk.ATTN_BLOCK, drafted.args
    k = torch.zeros(8, S, a.n_kv_heads, a.head_dim)
    cache = (k, torch.zeros_like(k))
    table = torch.tensor([[5, 2, 7, 0]], dtype=torch.int32)  # pages out of order

    def run(lo, hi):
        pos = torch.arange(lo, hi)
        slot = table[0, pos // S].long() * S + pos % S
        m = mk.AttnMeta(torch.tensor([0, hi - lo], dtype=torch.int32), torch.tensor([hi], dtype=torch.int32), table,
                        hi - lo)
        return drafted.draft_forward(hid_TD[lo:hi], seq[lo:hi], pos, m, slot, kv_cache=cache)

    got = [run(0, 23)] + [run(i, i + 1) for i in range(23, 40)]
    assert torch.equal(torch.cat(got), want_TD)


def _transformers_mtp_layer(model):
    """transformers' own MtpLayer (DeepSeek-V3 form) around a Qwen3 decoder layer, loaded
    from our draft through the DeepSeek-V3 names as transformers renames them."""
    from transformers import Qwen3Config
    from transformers.modeling_layers import MtpLayer
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding

    from miles_fsdp.models.state_dict_adapter import load_targets

    cfg = Qwen3Config(**{k: v for k, v in model.args.hf_config.items() if k not in ("architectures", "dtype")})
    cfg._attn_implementation = "eager"
    layer = MtpLayer(cfg, Qwen3DecoderLayer, Qwen3RMSNorm, 0).eval()
    ours = model.state_dict()
    n = model.args.n_layers
    sd = {}
    for hf, targets in load_targets(model.args).items():
        m = re.match(rf"model\.layers\.{n}\.(.*)$", hf)  # DeepSeek-V3 layout, module 0
        if m is None:
            continue
        name = m.group(1).replace("shared_head.norm.", "post_norm.")
        if not name.startswith(("enorm.", "hnorm.", "eh_proj.", "post_norm.")):
            name = "mtp_block." + name
        sd[name] = ours[targets[0].name]
    layer.load_state_dict(sd, strict=True)
    return layer, Qwen3RotaryEmbedding(cfg)


@torch.no_grad()
def test_draft_matches_transformers_mtp_layer(drafted):
    layer, rotary = _transformers_mtp_layer(drafted)
    seq = torch.randint(0, V, (30,), generator=torch.Generator().manual_seed(2))
    g_TD, cu = _draft_g(drafted, [seq])
    pos_T, meta, slot_T = packed_inputs(cu)
    hid_TD = _shifted_hidden(drafted(seq, pos_T, meta, slot_T), cu)
    emb = drafted.embed.weight[seq][None]
    pos = pos_T[None]
    causal = torch.full((30, 30), float("-inf")).triu(1)[None, None]
    want = layer(emb, hid_TD[None], rotary(emb, pos), causal, pos, None)[0]
    assert rel_err(drafted.mtp[0].norm(g_TD), want) <= 1e-4


def _keys(path):
    return set(load_file(str(path / SINGLE_FILE)))


@pytest.mark.parametrize("n_mtp, layout_key", [(1, "mtp.fc.weight"), (2, "model.layers.3.eh_proj.weight")])
def test_round_trip_writes_qwen3_next_for_one_module_deepseek_for_more(drafted, ckpt, tmp_path, n_mtp, layout_key):
    model = load_model(ckpt("qwen3"), n_mtp=n_mtp)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.mtp.parameters():
            p.add_(0.01 * torch.randn(p.shape))
    save_hf(model, tmp_path)
    keys = _keys(tmp_path)
    assert layout_key in keys
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == n_mtp
    if n_mtp == 1:
        assert {"mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight",
                "mtp.layers.0.self_attn.q_proj.weight", "mtp.layers.0.mlp.down_proj.weight"} <= keys
    else:
        assert {"model.layers.2.enorm.weight", "model.layers.3.hnorm.weight", "model.layers.3.shared_head.norm.weight",
                "model.layers.3.self_attn.k_norm.weight"} <= keys
    _same_state(load_model(tmp_path), model)


def test_every_layout_is_read(drafted, tmp_path):
    # the same draft, renamed into DeepSeek-V3's layout, loads to the same parameters
    save_hf(drafted, tmp_path / "q")
    sd = load_file(str(tmp_path / "q" / SINGLE_FILE))
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^mtp\.layers\.0\.", "model.layers.2.", k)
        k = {"mtp.pre_fc_norm_embedding.weight": "model.layers.2.enorm.weight",
             "mtp.pre_fc_norm_hidden.weight": "model.layers.2.hnorm.weight", "mtp.fc.weight": "model.layers.2.eh_proj.weight",
             "mtp.norm.weight": "model.layers.2.shared_head.norm.weight"}.get(k, k)
        out[k] = v
    out["model.layers.2.embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()  # DeepSeek's copies: ignored
    out["model.layers.2.shared_head.head.weight"] = sd["lm_head.weight"].clone()
    (tmp_path / "d").mkdir()
    save_file(out, str(tmp_path / "d" / SINGLE_FILE))
    (tmp_path / "d" / "config.json").write_text((tmp_path / "q" / "config.json").read_text())
    _same_state(load_model(tmp_path / "d"), drafted)
    # Qwen3-Next shares fc and norms across modules: each module reads a copy of them
    two = {**sd, **{k.replace("mtp.layers.0.", "mtp.layers.1."): v + 1 for k, v in sd.items() if k.startswith("mtp.layers.0.")}}
    save_file(two, str(tmp_path / "q" / SINGLE_FILE))
    model = load_model(tmp_path / "q", n_mtp=2)
    for m in model.mtp:
        assert torch.equal(m.eh_proj.weight, sd["mtp.fc.weight"]) and torch.equal(m.norm.weight, sd["mtp.norm.weight"])
    assert torch.equal(model.mtp[1].block.attn.wq.weight, sd["mtp.layers.0.self_attn.q_proj.weight"] + 1)
    with pytest.raises(CheckpointError, match=r"(?s)missing tensors.*model\.layers\.4\.input_layernorm"):
        load_model(tmp_path / "q", n_mtp=3)  # module 2's block is not there: named, not invented


def test_mimo_checkpoint_layout(ckpt, tmp_path):
    # transformers has no MiMo class: a Qwen2 checkpoint written by transformers, its config
    # made MiMo's, and a draft added by hand in MiMo's layout (hidden first in input_proj)
    src = ckpt("qwen2")
    sd = load_file(str(src / SINGLE_FILE))
    g = torch.Generator().manual_seed(5)
    draft = {}
    for k, v in sd.items():
        if k.startswith("model.layers.1."):
            draft[k.replace("model.layers.1.", "model.mtp_layers.0.")] = torch.randn(v.shape, generator=g)
    for name in ("token_layernorm", "hidden_layernorm", "final_layernorm"):
        draft[f"model.mtp_layers.0.{name}.weight"] = torch.randn(64, generator=g)
    draft["model.mtp_layers.0.input_proj.weight"] = torch.randn(64, 128, generator=g)
    (tmp_path / "mimo").mkdir()
    save_file({**sd, **draft}, str(tmp_path / "mimo" / SINGLE_FILE))
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(architectures=["MiMoForCausalLM"], model_type="mimo", num_nextn_predict_layers=1)
    (tmp_path / "mimo" / "config.json").write_text(json.dumps(cfg))
    model = load_model(tmp_path / "mimo")
    assert model.args.n_mtp == 1 and model.args.arch == "qwen2"
    m = model.mtp[0]
    w = draft["model.mtp_layers.0.input_proj.weight"]
    assert torch.equal(m.eh_proj.weight, torch.cat([w[:, 64:], w[:, :64]], dim=1))  # ours: [emb | hidden]
    assert torch.equal(m.enorm.weight, draft["model.mtp_layers.0.token_layernorm.weight"])
    assert torch.equal(m.hnorm.weight, draft["model.mtp_layers.0.hidden_layernorm.weight"])
    assert torch.equal(m.norm.weight, draft["model.mtp_layers.0.final_layernorm.weight"])
    assert torch.equal(m.block.attn.wq.bias, draft["model.mtp_layers.0.self_attn.q_proj.bias"])
    save_hf(model, tmp_path / "out")  # written back in MiMo's layout, the same bytes
    back = load_file(str(tmp_path / "out" / SINGLE_FILE))
    assert back.keys() == {**sd, **draft}.keys()
    assert all(torch.equal(back[k], v) for k, v in {**sd, **draft}.items())


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_fresh_draft_copies_the_last_layer(ckpt, tmp_path, arch):
    trunk = load_model(ckpt(arch))
    model = load_model(ckpt(arch), n_mtp=2)
    _same_state(model.layers, trunk.layers)
    for m in model.mtp:
        _same_state(m.block, trunk.layers[-1])
        assert torch.equal(m.norm.weight, trunk.norm.weight)
        assert torch.equal(m.enorm.weight, torch.ones(64)) and torch.equal(m.hnorm.weight, torch.ones(64))
        assert torch.equal(m.eh_proj.weight, torch.cat([torch.zeros(64, 64), torch.eye(64)], dim=1))
    assert hasattr(model.mtp[0].block, "moe") == (arch == "qwen3_moe")
    save_hf(model, tmp_path)
    _same_state(load_model(tmp_path), model)  # saved with it: config.json says 2 modules


@torch.no_grad()
def test_transformers_loads_the_trunk_of_a_checkpoint_with_a_draft(drafted, ckpt, tmp_path):
    save_hf(drafted, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(ckpt("qwen3"), dtype=torch.float32).eval()
    seqs = [torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(4)) for n in (9, 21)]
    assert torch.equal(hf_logits(hf, seqs), hf_logits(ref, seqs))


def test_n_mtp_zero_drops_a_draft_and_a_partial_draft_is_refused(drafted, tmp_path):
    save_hf(drafted, tmp_path / "d")
    trunk = load_model(tmp_path / "d", n_mtp=0)
    assert len(trunk.mtp) == 0
    save_hf(trunk, tmp_path / "t")
    assert "num_nextn_predict_layers" not in json.loads((tmp_path / "t" / "config.json").read_text())
    assert not any(k.startswith("mtp.") for k in _keys(tmp_path / "t"))
    sd = load_file(str(tmp_path / "d" / SINGLE_FILE))
    del sd["mtp.fc.weight"]
    save_file(sd, str(tmp_path / "d" / SINGLE_FILE))
    with pytest.raises(CheckpointError, match=r"(?s)1 MTP draft module.*missing tensors \(1\):\s+mtp\.fc\.weight"):
        load_model(tmp_path / "d")
