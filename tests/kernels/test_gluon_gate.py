"""Where the Gluon kernels (attention, grouped_linear; Hopper only, GPU-tested in tests/gpu) may run: the Triton
releases they were tested with, and never for CPU tensors. Runs on CPU: nothing is compiled."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
gluon_attention = pytest.importorskip("miles_kernels._triton.gluon_attention",
                                      reason="this Triton has no Gluon for Hopper")


def test_tested_triton_releases_only():
    assert gluon_attention.usable("3.6.0")
    assert gluon_attention.usable("3.6.1")
    for version in ("3.5.1", "3.7.0", "3.9.0", "4.0.0"):
        assert not gluon_attention.usable(version), version


def test_dispatch_follows_the_gate(monkeypatch):
    from miles_kernels._triton.gluon_gate import gluon_module

    gluon_module.cache_clear()
    monkeypatch.setattr(gluon_attention, "TESTED_TRITON", ("0.0.",))
    try:
        for name in ("gluon_attention", "gluon_attention_bwd", "gluon_grouped"):  # every caller's module
            assert gluon_module(name) is None, name
    finally:
        gluon_module.cache_clear()


def test_cpu_tensors_never_reach_gluon():
    q = torch.zeros(70, 4, 128, dtype=torch.bfloat16)
    k = torch.zeros(70, 2, 128, dtype=torch.bfloat16)
    assert not gluon_attention.supported(q, k, k, 64)
    from miles_kernels._triton import gluon_grouped

    x, w = torch.zeros(300, 128, dtype=torch.bfloat16), torch.zeros(4, 256, 128, dtype=torch.bfloat16)
    assert not gluon_grouped.supported(x, w, 128, 256, 64)
    from miles_kernels._triton import gluon_attention_bwd

    assert not gluon_attention_bwd.supported(q, k, k, q)


def test_gluon_tiles_are_the_tables_full_gpu_tiles():
    """The Gluon backward kernels replace the Triton ones only at the tables' full-GPU tiles (the
    same values there): a table edit that moves off them would silently drop the Gluon kernels."""
    from miles_kernels._triton import attention_bwd as AB
    from miles_kernels._triton import gluon_attention_bwd as GB

    for dtype in (torch.bfloat16, torch.float16):
        assert AB.DKDV_TILES[dtype][0].block_m == GB.BLOCK_M, dtype
