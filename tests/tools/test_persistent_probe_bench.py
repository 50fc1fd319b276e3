"""tools/bench/persistent_probe.py refuses a machine without a GPU with a message naming the fix (its kernels
are checked under the interpreter in tests/kernels: check_persistent_probe)."""

import sys

import pytest

pytest.importorskip("triton")


def test_needs_a_gpu(bench_script, monkeypatch):
    import torch

    mod = bench_script("persistent_probe")
    monkeypatch.setattr(sys, "argv", ["persistent_probe.py", "--out", "x.json"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        mod.main()
    assert "needs a CUDA device" in str(e.value)
