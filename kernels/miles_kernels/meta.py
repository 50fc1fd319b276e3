"""Attention metadata shared by the trainer (packed varlen) and the engine (paged).

Both paths write K/V into a paged cache first and then run the same attention kernel,
so a token's attention output does not depend on which path produced it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch


@dataclass
class AttnMeta:
    """Where each sequence's queries and KV live.

    cu_seqlens_q: int32 [B+1]  query offsets into the packed q (chunk of each sequence)
    kv_lens:      int32 [B]    KV tokens of each sequence, the new ones included; query i of
                               a chunk of length q sits at absolute position kv_len - q + i
    block_table:  int32 [B, max_pages]  page ids of each sequence, in position order
    max_q_len:    longest query chunk (host int, sizes kernel grids)
    host:         optional (cu_seqlens_q, kv_lens) as host int tuples, where the builder has
                  them: per-sequence code (the SDPA reference, so the trainer's attention
                  backward) then loops without a device-to-host copy, a sync per layer
    packed:       whole sequences packed for training (varlen_meta): each sequence's queries
                  are all its tokens, so kv_attention's backward reads the packed K/V, not pages

    Example: two sequences, a 3-token prefill and a decode step at position 7 (page size 16):
    cu_seqlens_q=[0, 3, 4], kv_lens=[3, 8], block_table=[[0], [1]], max_q_len=3.
    """

    cu_seqlens_q: torch.Tensor
    kv_lens: torch.Tensor
    block_table: torch.Tensor
    max_q_len: int
    host: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    packed: bool = False

    def host_lists(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(cu_seqlens_q, kv_lens) as host ints: `host` if set, else copied (a sync on CUDA)."""
        if self.host is not None:
            return self.host
        return tuple(self.cu_seqlens_q.tolist()), tuple(self.kv_lens.tolist())

    @property
    def num_seqs(self) -> int:
        return self.kv_lens.shape[0]

    def to(self, device) -> "AttnMeta":
        return AttnMeta(self.cu_seqlens_q.to(device), self.kv_lens.to(device),
                        self.block_table.to(device), self.max_q_len, self.host, self.packed)


def host_to_device(t: torch.Tensor, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor on `device` (as `dtype`): on CUDA copied from pinned memory without a host
    wait (a pageable or blocking copy waits for all the work queued before it); the caller must
    not write t's storage afterwards."""
    t = t if dtype is None else t.to(dtype)
    if t.device.type == "cpu" and torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def varlen_meta(cu_seqlens: torch.Tensor, page_size: int, device=None) -> tuple[AttnMeta, torch.Tensor, int]:
    """Metadata for packed training sequences: each sequence starts on a fresh page.

    cu_seqlens: int [B+1] offsets of the packed sequences (pass them on the CPU: no sync).
    Returns (meta, slot_mapping_T int64, num_pages) for a scratch cache of num_pages pages, on
    `device` (default: cu_seqlens' device); meta.host holds the offsets and lengths.
    """
    cu = cu_seqlens.to("cpu", torch.int64)
    lens = cu[1:] - cu[:-1]
    pages_per_seq = (lens + page_size - 1) // page_size
    num_pages = int(pages_per_seq.sum())
    max_pages = max(int(pages_per_seq.max()) if len(lens) else 0, 1)
    first_page = torch.cumsum(pages_per_seq, 0) - pages_per_seq
    block_table = first_page[:, None] + torch.arange(max_pages)[None, :]
    block_table = torch.where(torch.arange(max_pages)[None, :] < pages_per_seq[:, None], block_table, 0)
    seq_of_token = torch.repeat_interleave(torch.arange(len(lens)), lens)
    pos = torch.arange(int(cu[-1])) - cu[:-1][seq_of_token]
    slot = first_page[seq_of_token] * page_size + pos
    device = cu_seqlens.device if device is None else device
    meta = AttnMeta(
        cu_seqlens_q=host_to_device(cu, device, torch.int32),
        kv_lens=host_to_device(lens, device, torch.int32),
        block_table=host_to_device(block_table, device, torch.int32),
        max_q_len=int(lens.max()) if len(lens) else 0,
        host=(tuple(cu.tolist()), tuple(lens.tolist())),
        packed=True,
    )
    return meta, host_to_device(slot, device), num_pages


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Position of each packed token within its own sequence: int64 [T]."""
    cu = cu_seqlens.to(torch.int64)
    lens = cu[1:] - cu[:-1]
    seq_of_token = torch.repeat_interleave(torch.arange(len(lens), device=cu.device), lens)
    return torch.arange(int(cu[-1]), device=cu.device) - cu[:-1][seq_of_token]


def write_kv(k_cache_PSKD, v_cache_PSKD, k_TKD, v_TKD, slot_T) -> None:
    """Store new K/V at their slots (slot = page * page_size + offset), in place.

    Differentiable: when the cache is a scratch tensor built for training, autograd routes
    the attention's cache gradient back to k and v through this copy.
    """
    if _one_launch(k_cache_PSKD, v_cache_PSKD, k_TKD, v_TKD, slot_T):
        from miles_kernels._triton.kv_write import write_kv as write_kv_cuda

        return write_kv_cuda(k_cache_PSKD, v_cache_PSKD, k_TKD, v_TKD, slot_T)
    P, S, K, D = k_cache_PSKD.shape
    k_cache_PSKD.view(P * S, K, D).index_copy_(0, slot_T, k_TKD.to(k_cache_PSKD.dtype))
    v_cache_PSKD.view(P * S, K, D).index_copy_(0, slot_T, v_TKD.to(v_cache_PSKD.dtype))


def _one_launch(k_cache, v_cache, k, v, slot) -> bool:
    """CUDA, nothing to differentiate, layouts the kernel takes, and Triton importable."""
    if not (k.is_cuda and k_cache.is_contiguous() and v_cache.is_contiguous() and k.shape == v.shape
            and k.stride(-1) == 1 and v.stride(-1) == 1 and slot.dtype in (torch.int32, torch.int64)
            and slot.is_contiguous()):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (k_cache, v_cache, k, v)):
        return False
    return _HAS_TRITON


_HAS_TRITON = importlib.util.find_spec("triton") is not None
