"""Where the Gluon attention kernels (Hopper only, GPU-tested in tests/gpu) may run: the Triton
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
    from miles_kernels._triton import attention_bwd, paged_attention

    for gate in (paged_attention._gluon_attention, attention_bwd._gluon_bwd):
        gate.cache_clear()
    monkeypatch.setattr(gluon_attention, "TESTED_TRITON", ("0.0.",))
    try:
        assert paged_attention._gluon_attention() is None
        assert attention_bwd._gluon_bwd() is None
    finally:
        for gate in (paged_attention._gluon_attention, attention_bwd._gluon_bwd):
            gate.cache_clear()


def test_cpu_tensors_never_reach_gluon():
    q = torch.zeros(70, 4, 128, dtype=torch.bfloat16)
    k = torch.zeros(70, 2, 128, dtype=torch.bfloat16)
    assert not gluon_attention.supported(q, k, k, 64)
