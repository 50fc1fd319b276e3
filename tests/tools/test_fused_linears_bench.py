"""tools/bench/fused_linears.py refuses rows the fused kernels do not take, and a machine without a GPU,
with a message naming the fix."""

import pytest

pytest.importorskip("triton")


def test_rows_past_small_m_are_refused(bench_refusal):
    assert "1 <= M <= 512" in bench_refusal("fused_linears", "--m", "256", "600")


def test_needs_a_gpu(bench_refusal, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "needs a CUDA device" in bench_refusal("fused_linears", "--m", "256")
