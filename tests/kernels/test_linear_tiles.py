"""Which tile linear picks on a 132-SM Hopper (H100 / H200) at the 0.6B / 8B shapes the sweeps timed
(docs/kernel_tuning.md): the fill rule at M <= SMALL_M, the fill and wave rule up to FILL_MAX_M, the M
bucket above. Runs on CPU: nothing is compiled or launched; every tile gives the same bits (tests/gpu)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from miles_kernels._triton import matmul  # noqa: E402

CUDA = torch.device("cuda")


@pytest.fixture
def sms_132(monkeypatch):
    monkeypatch.setattr(matmul, "_num_programs", lambda device: 132)
    matmul._TILE_CACHE.clear()
    yield
    matmul._TILE_CACHE.clear()


def _pick(m: int, n: int) -> tuple:
    t = matmul.linear_tile(m, torch.bfloat16, n, CUDA)
    return t.block_m, t.block_n, t.num_stages, t.tma


@pytest.mark.parametrize("m,n,want", [
    (1024, 1024, (128, 64, 5, True)),    # 0.6B o / down: 128 tiles (128x128 makes 64)
    (1024, 4096, (128, 256, 3, True)),   # 128 tiles, one wave
    (1024, 6144, (128, 128, 5, True)),   # 128x256 would make 1.45 waves
    (1024, 12288, (128, 256, 3, True)),  # 384 tiles = 2.9 waves
    (2048, 1024, (128, 128, 5, True)),
    (2048, 4096, (128, 256, 3, True)),
    (2048, 12288, (128, 256, 3, True)),
])
def test_mid_m_picks(sms_132, m, n, want):
    assert _pick(m, n) == want


def test_small_m_and_large_m_picks(sms_132):
    assert _pick(64, 1024)[:2] == (64, 16)   # decode: the narrowest that streams the weight
    assert _pick(256, 4096) == (128, 64, 5, True)  # the 128-row tiles at 5 stages by TMA (thirty-fifth run)
    assert _pick(256, 6144) == (128, 128, 5, True)
    assert _pick(512, 12288) == (128, 128, 5, True)  # no wave rule at M <= SMALL_M
    assert _pick(4096, 1024) == (128, 256, 3, True)  # the M bucket past FILL_MAX_M


def test_fill_max_m_at_small_m_gives_the_bucket_above(sms_132, monkeypatch):
    monkeypatch.setattr(matmul, "FILL_MAX_M", matmul.SMALL_M)
    assert _pick(1024, 1024) == (128, 128, 5, True)  # the M bucket's one tile, as before the mid rule


def test_every_mid_tile_is_listed_for_the_bit_checks():
    tiles = matmul.all_linear_tiles(torch.bfloat16)
    assert all(t in tiles for t in matmul.MID_M_TILES[torch.bfloat16])
