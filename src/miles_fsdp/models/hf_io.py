"""Stream HF safetensors checkpoints into a meta-built Transformer, and write them back.

`load_model(dir)` is the one way to get a Transformer from an HF directory: built on the
meta device (no memory, no init), then filled by `load_hf`. A model with a draft (n_mtp > 0)
reads it in any layout state_dict_adapter.py knows; a checkpoint without one gives a fresh
draft (its last decoder layer and final norm; mtp.py), and save_hf writes the draft with
`num_nextn_predict_layers` in config.json.

Loading reads one tensor at a time (`safe_open`), so host memory peaks at about one
tensor above the model. Every write goes through `copy_fn(param, src, index)`, which
writes the full-shape slice `src` into `param[index]`; FSDP code passes its own function
that keeps only the local shard of a DTensor parameter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from miles_fsdp.errors import UserError
from miles_fsdp.models.args import ModelArgs
from miles_fsdp.models.mtp import fresh_draft_constants
from miles_fsdp.models.state_dict_adapter import (hf_table, is_draft_name, is_ignored, load_targets, ours_to_hf,
                                                  swap_halves, swaps_halves)
from miles_fsdp.models.transformer import Transformer

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Copied next to a saved checkpoint so it stays usable with from_pretrained and our tokenizer.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)

CopyFn = Callable[[torch.nn.Parameter, torch.Tensor, tuple], None]


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not match the model; the message lists every bad tensor."""


@contextlib.contextmanager
def open_safetensors(file: Path):
    """safe_open(file), with a corrupt or truncated file reported as a CheckpointError naming it."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); it is truncated or corrupt "
                              "(an interrupted download or write?): copy or export it again") from None


def copy_into(param: torch.nn.Parameter, src: torch.Tensor, index: tuple) -> None:
    param.data[index].copy_(src)


def checkpoint_files(path: str | Path) -> dict[str, list[str]]:
    """File name -> HF tensor names, for a single-file or an index-sharded checkpoint."""
    path = Path(path)
    if (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{path / INDEX_FILE}: unreadable index ({e!r}); expected a 'weight_map' object")
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)
        for file in files:
            if not (path / file).is_file():
                raise CheckpointError(f"{path / INDEX_FILE}: lists shard {file!r}, which is missing in {path}")
        return files
    if (path / SINGLE_FILE).is_file():
        with open_safetensors(path / SINGLE_FILE) as f:
            return {SINGLE_FILE: list(f.keys())}
    found = sorted(p.name for p in path.iterdir()) if path.is_dir() else "directory does not exist"
    raise CheckpointError(
        f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (found: {found}); only safetensors checkpoints are read"
    )


@torch.no_grad()
def load_hf(
    model: torch.nn.Module,
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    copy_fn: CopyFn = copy_into,
) -> torch.nn.Module:
    """Load an HF checkpoint dir into `model` (built on meta or already materialised).

    dtype: parameter dtype after loading (None keeps the model's). Meta parameters are
    materialised on `device` first. Missing, unexpected and mis-shaped tensors are all
    reported by name in one CheckpointError after the pass.
    """
    args: ModelArgs = model.args
    path = Path(path)
    if dtype is not None:
        model.to(dtype)
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device=device)
    params = dict(model.named_parameters())
    files = checkpoint_files(path)
    fresh_draft = args.n_mtp > 0 and not any(is_draft_name(args, n) for names in files.values() for n in names)
    targets = load_targets(args, fresh_draft)
    expected = set(hf_table(args))
    covered: set[str] = set()
    unexpected: list[str] = []
    misshaped: list[str] = []
    for file, names in files.items():
        with open_safetensors(path / file) as f:
            for hf_name in names:
                if hf_name not in targets:
                    if not is_ignored(args, hf_name):
                        unexpected.append(hf_name)
                    continue
                src = f.get_tensor(hf_name)
                for t in targets[hf_name]:
                    param = params[t.name]
                    part = swap_halves(src[t.src_index]) if t.swap_halves else src[t.src_index]
                    want = tuple(param.shape[len(t.dst_index):])
                    if tuple(part.shape) != want:
                        misshaped.append(f"{hf_name}: checkpoint {tuple(part.shape)}, model expects {want}")
                        covered.update(t.covers)  # reported as mis-shaped, not also as missing
                        continue
                    copy_fn(param, part.to(param.dtype), t.dst_index)
                    covered.update(t.covers)
                del src
    if fresh_draft:
        covered.update(_fresh_draft(model, copy_fn))
        logger.info("%s has no draft weights: %d fresh MTP module(s) from its last decoder layer", path, args.n_mtp)
    missing = sorted(expected - covered)
    if missing or unexpected or misshaped:
        raise CheckpointError(_report(path, args, missing, unexpected, misshaped))
    return model


def _fresh_draft(model: Transformer, copy_fn: CopyFn) -> set[str]:
    """Write the constant parameters of a fresh draft (mtp.fresh_draft_constants); returns the
    canonical HF names they provide. The block and norm came from the trunk's tensors."""
    names = {ours: hf for hf, (ours, _) in hf_table(model.args).items()}
    params = dict(model.named_parameters())
    done = set()
    for m in range(model.args.n_mtp):
        for ours, value in fresh_draft_constants(model.args.dim).items():
            param = params[f"mtp.{m}.{ours}"]
            copy_fn(param, value.to(param.dtype), ())
            done.add(names[f"mtp.{m}.{ours}"])
    return done


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               args: ModelArgs | None = None, n_mtp: int | None = None) -> Transformer:
    """The Transformer of `args` (default: path/config.json) with the weights at `path`, in
    `dtype` on `device`; a checkpoint that does not fit the architecture raises CheckpointError.

    n_mtp: draft modules, overriding config.json's `num_nextn_predict_layers` (None keeps it;
    0 drops a checkpoint's draft; N on a checkpoint without one builds a fresh draft)."""
    args = args or ModelArgs.from_hf(path)
    if n_mtp is not None:
        if n_mtp < 0:
            raise ValueError(f"load_model: n_mtp={n_mtp} must be >= 0 (0 = no draft)")
        args = dataclasses.replace(args, n_mtp=n_mtp)
    with torch.device("meta"):
        model = Transformer(args)
    return load_hf(model, path, dtype=dtype, device=device)


def _report(path: Path, args: ModelArgs, missing: list, unexpected: list, misshaped: list) -> str:
    def block(title: str, items: list) -> str:
        more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
        return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(items[:20]) + more

    draft = f", {args.n_mtp} MTP draft module(s)" if args.n_mtp else ""
    msg = f"{path}: checkpoint does not match the model ({args.arch}, {args.n_layers} layers{draft})"
    if missing:
        msg += block("missing tensors", missing)
    if unexpected:
        msg += block("unexpected tensors", unexpected)
    if misshaped:
        msg += block("wrong shapes", misshaped)
    return msg + "\n  Check that config.json belongs to these weights."


def config_json(args: ModelArgs) -> dict:
    """The config.json to write beside weights of `args`: the source config, with the draft's
    size as `num_nextn_predict_layers` (absent without a draft: the key every reader knows)."""
    config = dict(args.hf_config)
    config.pop("num_mtp_layers", None)
    if args.n_mtp:
        config["num_nextn_predict_layers"] = args.n_mtp
    else:
        config.pop("num_nextn_predict_layers", None)
    return config


def _full(t: torch.Tensor) -> torch.Tensor:
    # DTensor (FSDP) state dicts: gather without importing torch.distributed here.
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def save_hf(
    state_dict_or_model: dict[str, torch.Tensor] | torch.nn.Module,
    path: str | Path,
    args: ModelArgs | None = None,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write our state dict as an HF checkpoint transformers can `from_pretrained`.

    One `model.safetensors` if it fits in `max_shard_bytes`, else
    `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`. Experts are
    written per expert (Hub layout); the draft in `draft_layout(args)`. config.json comes from `args.hf_config`; generation
    config and tokenizer files are copied from `args.source_dir` when present.
    """
    if isinstance(state_dict_or_model, torch.nn.Module):
        args = args or state_dict_or_model.args
        state_dict = state_dict_or_model.state_dict()
    else:
        state_dict = state_dict_or_model
    if args is None:
        raise ValueError("save_hf: pass `args` (ModelArgs) when saving a plain state dict")
    if not args.hf_config:
        raise ValueError("save_hf: args.hf_config is empty; build ModelArgs with ModelArgs.from_hf so config.json can be written")
    table = ours_to_hf(args)
    missing, extra = sorted(set(table) - set(state_dict)), sorted(set(state_dict) - set(table))
    if missing or extra:
        raise CheckpointError(f"save_hf: state dict does not match {args.arch}: missing {missing}, unexpected {extra}")

    # Plan shards from shapes alone, then materialise one shard at a time.
    shards: list[list[tuple[str, str, int | None]]] = [[]]
    size = total = 0
    for name, hf_names in table.items():
        t = state_dict[name]
        n_bytes = t.numel() * (dtype or t.dtype).itemsize // len(hf_names)
        for e, hf in enumerate(hf_names):
            if size + n_bytes > max_shard_bytes and shards[-1]:
                shards.append([])
                size = 0
            shards[-1].append((hf, name, e if ".mlp.experts." in hf else None))
            size += n_bytes
            total += n_bytes

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for stale in [*path.glob("model*.safetensors"), path / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    n = len(shards)
    weight_map = {}
    gathered: tuple[str | None, torch.Tensor | None] = (None, None)
    for i, shard in enumerate(shards):
        file = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for hf, name, e in shard:
            if gathered[0] != name:  # experts of one param are consecutive: gather it once
                gathered = (name, _full(state_dict[name]))
            t = gathered[1][e] if e is not None else gathered[1]
            t = swap_halves(t) if swaps_halves(args, hf) else t
            tensors[hf] = t.detach().to(device="cpu", dtype=dtype or t.dtype).clone().contiguous()
            weight_map[hf] = file
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))

    saved_dtype = dtype or next(iter(state_dict.values())).dtype
    config = config_json(args)
    config["dtype"] = str(saved_dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if args.source_dir and Path(args.source_dir).resolve() != path.resolve():
        for side in SIDE_FILES:
            if (Path(args.source_dir) / side).is_file():
                shutil.copy2(Path(args.source_dir) / side, path / side)
    return path
