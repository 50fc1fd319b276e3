"""tools/bench/filter.py refuses a malformed --launch and a machine without a GPU, with a message naming the fix."""

import pytest

pytest.importorskip("triton")


@pytest.mark.parametrize("launch", ["8", "8:x", "12:4", "8:0", "8:4:3", "8:4:1:0", "8:4:1:2:5", "8:4:2:1:1",
                                    "8:4:1:1:1:1"])
def test_bad_launch_is_refused(bench_refusal, launch):
    msg = bench_refusal("filter", "--launch", launch)
    assert "--launch" in msg and "WARPS:UNROLL" in msg or "power of two" in msg, msg


def test_needs_a_gpu(bench_refusal, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for launch in ("8:4:8", "8:4", "16:4:1:1:1", "32:4:1:2:0"):  # defaults for the fields not given
        assert "needs a CUDA device" in bench_refusal("filter", "--launch", launch), launch
