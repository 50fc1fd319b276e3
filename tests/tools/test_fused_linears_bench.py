"""tools/bench/fused_linears.py refuses rows the fused kernels do not take, and a machine without a GPU,
with a message naming the fix."""

import sys

import pytest

pytest.importorskip("triton")


def _main(bench_script, monkeypatch, *args):
    mod = bench_script("fused_linears")
    monkeypatch.setattr(sys, "argv", ["fused_linears.py", "--out", "x.json", *args])
    with pytest.raises(SystemExit) as e:
        mod.main()
    return str(e.value)


def test_rows_past_small_m_are_refused(bench_script, monkeypatch):
    assert "1 <= M <= 512" in _main(bench_script, monkeypatch, "--m", "256", "600")


def test_needs_a_gpu(bench_script, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "needs a CUDA device" in _main(bench_script, monkeypatch, "--m", "256")
