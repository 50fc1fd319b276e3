"""tools/bench/sampler.py refuses a machine without a GPU and temperature 0, with a message naming the fix."""

import pytest

pytest.importorskip("triton")


def test_needs_a_gpu(bench_refusal, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "needs a CUDA device" in bench_refusal("sampler")


def test_temperature_zero_is_refused(bench_refusal, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "temperatures > 0" in bench_refusal("sampler", "--temps", "1.0", "0")
