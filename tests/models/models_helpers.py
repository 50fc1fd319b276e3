"""Helpers shared by tests/models (a unique module name: every test dir has a conftest)."""

import torch

from miles_fsdp.models import Transformer, load_model, packed_inputs


def load_ours(path, dtype=torch.float32) -> Transformer:
    return load_model(path, dtype).eval()


def packed_logits(model: Transformer, seqs: list[torch.Tensor]) -> torch.Tensor:
    cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    pos_T, meta, slot_T = packed_inputs(cu)
    return model.logits(model(torch.cat(seqs), pos_T, meta, slot_T))


def hf_logits(hf_model, seqs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([hf_model(s[None]).logits[0] for s in seqs])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()
