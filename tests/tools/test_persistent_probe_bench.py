"""tools/bench/persistent_probe.py refuses a machine without a GPU with a message naming the fix (its kernels
are checked under the interpreter in tests/kernels: check_persistent_probe)."""

import pytest

pytest.importorskip("triton")


def test_needs_a_gpu(bench_refusal, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "needs a CUDA device" in bench_refusal("persistent_probe")
