"""HF checkpoint I/O: round trips, shards, the fused expert layout, and errors by name."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from models_helpers import hf_logits, load_ours, packed_logits, rel_err
from miles_fsdp.models import CheckpointError, ModelArgs, Transformer, load_hf, save_hf

SEQS = [torch.tensor([3, 1, 4, 1, 5, 9, 2, 6]), torch.tensor([2, 7, 1, 8])]


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2"])
def test_round_trip_sharded_and_transformers_loads_it(ckpt, tmp_path, arch):
    src = ckpt(arch)
    first = load_ours(src)
    out = save_hf(first, tmp_path / "out", max_shard_bytes=64 * 1024)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    # on-disk names and layout are exactly what transformers wrote
    with torch.no_grad():
        src_keys = set(load_file(src / "model.safetensors"))
    assert set(index["weight_map"]) == src_keys
    for side in ("generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / side).is_file(), side

    second = load_ours(out)
    _same_state(first, second)
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert rel_err(packed_logits(second, SEQS), hf_logits(hf, SEQS)) <= 1e-4


def test_single_file_save_in_bf16(ckpt, tmp_path):
    model = load_ours(ckpt("llama"))
    out = save_hf(model.state_dict(), tmp_path / "bf16", args=model.args, dtype=torch.bfloat16)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    back = load_ours(out, dtype=torch.bfloat16)
    want = model.state_dict()
    for k, v in back.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, want[k].to(torch.bfloat16)), k


def test_fused_expert_layout_loads(ckpt, tmp_path):
    # transformers 5 keeps experts fused in memory; save_original_format=False writes them so
    src = ckpt("qwen3_moe")
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    hf.save_pretrained(tmp_path, save_original_format=False)
    assert any(k.endswith("experts.gate_up_proj") for k in load_file(tmp_path / "model.safetensors"))
    _same_state(load_ours(src), load_ours(tmp_path))


def _rewrite(src, dst, edit) -> None:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")


def test_missing_unexpected_and_misshaped_named_in_one_error(ckpt, tmp_path):
    src = ckpt("qwen3_moe")

    def edit(t):
        del t["model.layers.1.self_attn.k_norm.weight"]
        del t["model.layers.0.mlp.experts.5.up_proj.weight"]
        t["model.layers.0.mlp.gate.weight"] = torch.zeros(7, 64)
        t["model.layers.0.mlp.shared_expert.weight"] = torch.zeros(2)

    _rewrite(src, tmp_path / "bad", edit)
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf(tmp_path / "bad"))
    with pytest.raises(CheckpointError) as err:
        load_hf(model, tmp_path / "bad")
    msg = str(err.value)
    assert "missing tensors (2)" in msg
    assert "model.layers.1.self_attn.k_norm.weight" in msg
    assert "model.layers.0.mlp.experts.5.up_proj.weight" in msg
    assert "unexpected tensors (1)" in msg and "model.layers.0.mlp.shared_expert.weight" in msg
    assert "model.layers.0.mlp.gate.weight: checkpoint (7, 64), model expects (8, 64)" in msg


def test_no_checkpoint_and_broken_index(tmp_path, ckpt):
    args_dir = ckpt("qwen3")
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf(args_dir))
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_hf(model, tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        load_hf(model, tmp_path)


def test_truncated_safetensors_is_named(tmp_path, ckpt):
    import shutil

    src = ckpt("qwen3")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])  # an interrupted copy
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf(bad))
    with pytest.raises(CheckpointError, match=r"bad/model.safetensors: not a readable safetensors file.*truncated"):
        load_hf(model, bad)


def test_save_rejects_foreign_state_dict(ckpt, tmp_path):
    model = load_ours(ckpt("qwen3"))
    sd = dict(model.state_dict())
    sd["extra.weight"] = torch.zeros(1)
    del sd["norm.weight"]
    with pytest.raises(CheckpointError, match=r"missing \['norm.weight'\], unexpected \['extra.weight'\]"):
        save_hf(sd, tmp_path, args=model.args)


def test_custom_copy_fn_sees_full_shape_slices(ckpt):
    # the hook FSDP uses: called with (param, full-shape slice, index into the full param)
    calls = []

    def copy_fn(param, src, index):
        calls.append((tuple(param.shape), tuple(src.shape), index))
        param.data[index].copy_(src)

    path = ckpt("qwen3_moe")
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf(path))
    load_hf(model, path, copy_fn=copy_fn)
    assert ((8, 32, 64), (32, 64), (5,)) in calls
    _same_state(model, load_ours(path))
