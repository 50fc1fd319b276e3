"""tools/bench/sampler.py refuses a machine without a GPU and temperature 0, with a message naming the fix."""

import sys

import pytest

pytest.importorskip("triton")


def _main(bench_script, monkeypatch, *args):
    mod = bench_script("sampler")
    monkeypatch.setattr(sys, "argv", ["sampler.py", "--out", "x.json", *args])
    with pytest.raises(SystemExit) as e:
        mod.main()
    return str(e.value)


def test_needs_a_gpu(bench_script, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "needs a CUDA device" in _main(bench_script, monkeypatch)


def test_temperature_zero_is_refused(bench_script, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "temperatures > 0" in _main(bench_script, monkeypatch, "--temps", "1.0", "0")
