"""Where stream-K (miles_kernels/_triton/streamk.py, MILES_STREAM_K) takes a launch on a 132-SM Hopper with the
shipped tile tables (docs/kernel_tuning.md, sixty-first session), and its workspace. Runs on CPU: nothing is
compiled or launched (the kernels' bits: the interpreter's check_streamk and tests/gpu/test_streamk_gpu.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from miles_kernels._triton import matmul, streamk  # noqa: E402

CUDA = torch.device("cuda")


@pytest.fixture
def on_132(monkeypatch):
    monkeypatch.setattr(matmul, "_num_programs", lambda device: 132)
    monkeypatch.setattr(streamk, "STREAM_K", True)
    matmul._TILE_CACHE.clear()
    yield
    matmul._TILE_CACHE.clear()


def _takes(m: int, n: int, k: int = 4096, halve: bool = False) -> bool:
    """Whether linear (or swiglu, halve: its tile is linear's for 2F with half the width a weight) at M m x N n
    takes stream-K: a TMA pick whose persistent grid has a short last wave."""
    t = matmul.linear_tile(m, torch.bfloat16, 2 * n if halve else n, CUDA)
    block_n = t.block_n // 2 if halve else t.block_n
    tiles = -(-m // t.block_m) * -(-n // block_n)
    return t.tma and streamk.takes(tiles, min(132, tiles), k)


def test_the_rule(monkeypatch):
    monkeypatch.setattr(streamk, "STREAM_K", True)
    assert [streamk.takes(t, 132, 64) for t in (131, 132, 133, 263, 264, 265, 791, 792)] == \
        [False, False, True, True, False, True, True, False]  # whole waves and 6+ waves keep the plain launch
    assert not streamk.takes(133, 132, 0)  # no K-steps to split
    monkeypatch.setattr(streamk, "STREAM_K", False)
    assert not streamk.takes(133, 132, 64)


@pytest.mark.parametrize("m,n,halve,want", [
    (384, 6144, False, True),     # 8B q|k|v-sized N by linear: 144 tiles of 128x128 (1.09 waves)
    (512, 6144, False, True),     # 192 tiles (1.45)
    (256, 6144, False, False),    # 96 tiles of 128x128: less than a wave
    (640, 4096, False, True),     # 320 tiles of 128x64 (2.4)
    (1024, 4096, False, False),   # 128 tiles of 128x256: one wave
    (1536, 6144, False, True),    # 576 tiles of 128x128 (4.4)
    (512, 24576, False, True),    # 8B gate|up: 768 tiles (5.8)
    (256, 151936, False, False),  # the lm_head: 18 waves
    (64, 4096, False, False),     # decode b64: pointer tiles
    (256, 3072, True, False),     # 0.6B swiglu: 96 tiles
    (300, 3072, True, True),      # 144 tiles (1.09)
    (128, 12288, True, True),     # 8B swiglu at b128: 192 tiles of 128x64 a weight (1.45)
    (512, 12288, True, True),     # 768 tiles (5.8)
])
def test_where_it_lands(on_132, m, n, halve, want):
    assert _takes(m, n, halve=halve) is want


def test_workspace_made_once_per_device_and_grid():
    cpu = torch.device("cpu")
    ws = streamk.workspace(cpu, 4, 16 * 16)
    assert ws is streamk.workspace(cpu, 4, 128 * 128)  # one slot a program at the largest tile, kept
    slots, flags = ws
    assert slots.numel() == 4 * streamk.SLOT and slots.dtype == torch.float32
    assert flags.tolist() == [0] * 4 and flags.dtype == torch.int32
    assert streamk.workspace(cpu, 5, 16)[1].numel() == 5  # another grid: its own
    with pytest.raises(ValueError, match="larger than the workspace"):
        streamk.workspace(cpu, 4, streamk.SLOT + 1)
