"""_fast_pick: fast mode's linears by whichever of cuBLAS and the invariant kernel timed faster,
one timing a key, none under capture, none for outputs past MAX_TIMED_BYTES or after an OOM. The
timings are faked here (CUDA events need a GPU: tests/gpu/test_kernels_gpu.py times for real)."""

import pytest
import torch

import miles_kernels as mk
from miles_kernels import _fast_pick as fp


@pytest.fixture
def timed(monkeypatch):
    """Fake timings: (vendor ms, mine ms) from `times`, each call logged in `calls`."""
    state = {"times": (1.0, 2.0), "calls": 0}

    def fake(vendor, mine):
        state["calls"] += 1
        vendor(), mine()
        if isinstance(state["times"], Exception):
            raise state["times"]
        return list(state["times"])

    monkeypatch.setattr(fp, "_times", fake)
    monkeypatch.setattr(fp, "_CHOICE", {})
    return state


def test_the_faster_is_kept_and_timed_once(timed):
    ran = []
    vendor, mine = (lambda: ran.append("vendor")), (lambda: ran.append("mine"))
    timed["times"] = (2.0, 1.5)
    assert fp.choose(("a",), 1 << 20, vendor, mine, capturing=False) is True
    timed["times"] = (1.0, 3.0)  # a second read never happens: the kept choice stands
    assert fp.choose(("a",), 1 << 20, vendor, mine, capturing=False) is True
    assert timed["calls"] == 1 and ran == ["vendor", "mine"]
    assert fp.choose(("b",), 1 << 20, vendor, mine, capturing=False) is False  # cuBLAS faster
    timed["times"] = (1.0, 1.0)
    assert fp.choose(("c",), 1 << 20, vendor, mine, capturing=False) is True  # a tie: the invariant kernel


def test_capture_times_nothing_and_keeps_nothing(timed):
    timed["times"] = (2.0, 1.0)
    assert fp.choose(("k",), 1 << 20, lambda: None, lambda: None, capturing=True) is False
    assert timed["calls"] == 0 and ("k",) not in fp._CHOICE
    assert fp.choose(("k",), 1 << 20, lambda: None, lambda: None, capturing=False) is True  # eager: timed then


def test_large_outputs_and_oom_keep_cublas(timed):
    timed["times"] = (2.0, 1.0)
    assert fp.choose(("big",), fp.MAX_TIMED_BYTES + 1, lambda: None, lambda: None, capturing=False) is False
    assert timed["calls"] == 0 and fp._CHOICE[("big",)] is False
    timed["times"] = torch.cuda.OutOfMemoryError("out of memory")
    assert fp.choose(("oom",), 1 << 20, lambda: None, lambda: None, capturing=False) is False
    assert fp._CHOICE[("oom",)] is False


def test_a_kernel_error_keeps_cublas_and_is_told(timed, caplog):
    timed["times"] = ValueError("no tile for this shape")
    with caplog.at_level("WARNING", logger="miles_kernels._fast_pick"):
        assert fp.choose(("bad",), 1 << 20, lambda: None, lambda: None, capturing=False) is False
    assert fp._CHOICE[("bad",)] is False
    assert "no tile for this shape" in caplog.text and "cuBLAS serves" in caplog.text


def test_keys_bucket_m_and_tell_ops_widths_and_bias_apart():
    x = lambda m: torch.zeros(m, 64)  # noqa: E731
    w1, w2, b = torch.zeros(128, 64), torch.zeros(32, 64), torch.zeros(128)
    assert fp.key("linear", x(300), (w1,), None) == fp.key("linear", x(512), (w1,), None)
    assert fp.key("linear", x(512), (w1,), None) != fp.key("linear", x(513), (w1,), None)
    assert fp.key("linear", x(1), (w1,), None)[1] == 1 and fp.key("linear", x(2), (w1,), None)[1] == 2
    base = fp.key("linears", x(64), (w1, w2), None)
    assert base != fp.key("linears", x(64), (w2, w1), None) != fp.key("linear", x(64), (w1, w2), None)
    assert base != fp.key("linears", x(64), (w1, w2), (b, b))


def test_cpu_fast_mode_is_cublas_and_times_nothing(timed):
    """On CPU fast mode stays torch's F.linear: nothing timed, nothing kept, values F.linear's."""
    g = torch.Generator().manual_seed(0)
    x, w, w2 = (torch.randn(s, generator=g) for s in ((5, 3, 16), (8, 16), (4, 16)))
    with mk.use_mode("fast"):
        y = mk.linear(x, w)
        ys = mk.linears(x, (w, w2))
    assert torch.equal(y, torch.nn.functional.linear(x, w)) and y.shape == (5, 3, 8)
    assert torch.equal(ys[1], torch.nn.functional.linear(x, w2))
    assert timed["calls"] == 0 and not fp._CHOICE
