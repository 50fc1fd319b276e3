"""miles_kernels._triton.launch: which calls reuse a compiled kernel, and what its launcher gets.

Runs on CPU: a real `triton.jit` function whose `run` (Triton's bind-compile-launch path)
is replaced by a recorder that hands back a fake compiled kernel, and a fake driver. The
launch itself is GPU-tested (tests/gpu/test_kernels_gpu.py: fast and Triton's path agree).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from miles_kernels._triton import launch  # noqa: E402


@triton.jit
def _demo_kernel(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr = 7):
    pass


class _Compiled:
    function, packed_metadata = "fn-handle", "packed"

    def __init__(self):
        self.launches = []

    def run(self, *a):
        self.launches.append(a)


@pytest.fixture
def kernel(monkeypatch):
    if not isinstance(_demo_kernel, triton.runtime.jit.JITFunction):
        pytest.skip("TRITON_INTERPRET=1: kernels are interpreted, no launcher to skip to")
    monkeypatch.setattr(launch, "ENABLED", True)
    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    monkeypatch.setattr(launch, "_current_stream", lambda device: 1234)
    fk = launch.fast_launch(_demo_kernel)
    fk.slow = []

    def run(*args, grid, warmup, **kw):  # Triton's path: record, compile a new fake kernel
        fk.slow.append((grid, args, kw))
        return _Compiled()

    monkeypatch.setattr(_demo_kernel, "run", run)
    yield fk


def test_repeat_call_goes_to_the_launcher_with_triton_argument_order(kernel):
    x, y = torch.zeros(64), torch.zeros(64)
    first = kernel[(4,)](x, y, 64, 0.5, BLOCK=32)
    assert len(kernel.slow) == 1 and not first.launches
    again = kernel[(5, 2)](x, y, 64, 0.5, BLOCK=32)
    assert again is first and len(kernel.slow) == 1
    (call,) = first.launches
    assert call[:7] == (5, 2, 1, 1234, "fn-handle", "packed", None)
    # every parameter in declaration order, the constexprs (and FLAG's default) included
    assert call[9:] == (x, y, 64, 0.5, 32, 7)


def test_the_key_is_at_least_as_fine_as_tritons(kernel):
    buf = torch.zeros(80)
    x, y = buf[:64], torch.zeros(64)
    kernel[(1,)](x, y, 64, 0.5, BLOCK=32)
    kernel[(1,)](buf[1:65], y, 64, 0.5, BLOCK=32)  # 4-byte offset: not 16-byte aligned
    kernel[(1,)](x.double(), y, 64, 0.5, BLOCK=32)  # dtype
    kernel[(1,)](x, y, 1, 0.5, BLOCK=32)  # n == 1 is a constant to Triton
    kernel[(1,)](x, y, 40, 0.5, BLOCK=32)  # not a multiple of 16
    kernel[(1,)](x, y, 1 << 40, 0.5, BLOCK=32)  # int64
    kernel[(1,)](x, y, 64, 0.5, BLOCK=64)  # constexpr value
    kernel[(1,)](x, y, 64, 0.5, BLOCK=32, FLAG=3)
    kernel[(1,)](x, y, 64, 0.5, BLOCK=32, num_warps=8)  # launch option
    assert len(kernel.slow) == 9
    kernel[(1,)](x, y, 48, 0.25, BLOCK=32)  # another multiple of 16, another float: same kernel
    kernel[(1,)](buf[4:68], y, 64, 0.5, BLOCK=32)  # 16-byte offset: still aligned
    assert len(kernel.slow) == 9


def test_tritons_path_serves_what_is_not_keyed(kernel, monkeypatch):
    x, y = torch.zeros(64), torch.zeros(64)
    for _ in range(2):
        kernel[lambda meta: (1,)](x, y, 64, 0.5, BLOCK=32)  # callable grid
        kernel[(1,)](x, y, [64], 0.5, BLOCK=32)  # a type launch.arg_key does not know
    assert len(kernel.slow) == 4 and not kernel.kernels
    monkeypatch.setattr(launch, "ENABLED", False)  # MILES_FAST_LAUNCH=0
    kernel[(1,)](x, y, 64, 0.5, BLOCK=32)
    kernel[(1,)](x, y, 64, 0.5, BLOCK=32)
    assert len(kernel.slow) == 6


def test_active_launch_hooks_take_tritons_path(kernel, monkeypatch):
    x, y = torch.zeros(64), torch.zeros(64)
    kernel[(1,)](x, y, 64, 0.5, BLOCK=32)
    monkeypatch.setattr(launch, "_hooks_active", lambda: True)
    kernel[(1,)](x, y, 64, 0.5, BLOCK=32)
    assert len(kernel.slow) == 2


def test_interpreted_functions_are_left_alone():
    fn = object()
    assert launch.fast_launch(fn) is fn
