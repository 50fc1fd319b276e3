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


@triton.jit
def _gdc_demo_kernel(x_ptr, n, BLOCK: tl.constexpr, USE_GDC: tl.constexpr = False):
    pass


def _recorded(fn, monkeypatch):
    """fast_launch(fn) on a fake driver; Triton's path records its calls in .slow."""
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        pytest.skip("TRITON_INTERPRET=1: kernels are interpreted, no launcher to skip to")
    monkeypatch.setattr(launch, "ENABLED", True)
    monkeypatch.setattr(launch, "PDL", True)
    monkeypatch.setattr(launch, "_PDL_DEVICES", {0: False})  # device 0: no PDL unless a test says so
    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    monkeypatch.setattr(launch, "_current_stream", lambda device: 1234)
    fk = launch.fast_launch(fn)
    fk.slow = []

    def run(*args, grid, warmup, **kw):  # Triton's path: record, compile a new fake kernel
        fk.slow.append((grid, args, kw))
        return _Compiled()

    monkeypatch.setattr(fn, "run", run)
    return fk


@pytest.fixture
def kernel(monkeypatch):
    yield _recorded(_demo_kernel, monkeypatch)


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


def test_pdl_kernels_launch_with_use_gdc_where_the_device_has_pdl(monkeypatch):
    fk = _recorded(_gdc_demo_kernel, monkeypatch)
    x = torch.zeros(64)
    fk[(1,)](x, 64, BLOCK=32)  # device without PDL: the kernel's default, no launch option
    assert fk.slow[-1][2] == {"BLOCK": 32}
    monkeypatch.setattr(launch, "_PDL_DEVICES", {0: True})
    first = fk[(1,)](x, 64, BLOCK=32)
    assert fk.slow[-1][2] == {"BLOCK": 32, "USE_GDC": True, "launch_pdl": True} and len(fk.slow) == 2
    fk[(1,)](x, 64, BLOCK=32)  # the repeat goes to the PDL kernel's launcher with USE_GDC bound
    assert len(fk.slow) == 2 and first.launches[-1][9:] == (x, 64, 32, True)
    monkeypatch.setattr(launch, "PDL", False)  # MILES_PDL=0
    fk[(1,)](x, 64, BLOCK=32)
    assert len(fk.slow) == 2 and fk.slow[0][2] == {"BLOCK": 32}
    demo = _recorded(_demo_kernel, monkeypatch)  # no USE_GDC parameter: never gets the option
    monkeypatch.setattr(launch, "_PDL_DEVICES", {0: True})
    demo[(1,)](x, x, 64, 0.5, BLOCK=32)
    assert demo.slow[-1][2] == {"BLOCK": 32}


def _kernels():
    """(name, Python function) of every kernel the package and the engine launch."""
    import importlib
    import inspect
    import pkgutil

    import miles_kernels._triton as kt

    mods = [importlib.import_module(f"miles_kernels._triton.{m.name}") for m in pkgutil.iter_modules(kt.__path__)]
    mods.append(importlib.import_module("miles_fsdp.engine.sampler"))
    for mod in mods:
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and hasattr(obj, "fn"):
                fn = obj
                while hasattr(fn, "fn"):  # FastKernel -> JITFunction (or the interpreter's) -> function
                    fn = fn.fn
                if inspect.isfunction(fn):
                    yield f"{mod.__name__}.{name}", fn


def test_every_kernel_waits_for_the_previous_kernel_before_touching_memory():
    """PDL is only safe if a kernel launched early waits (gdc_enter) before its first load or
    store: USE_GDC in every kernel, handed to gdc_enter or a helper before any memory access."""
    import inspect
    import re

    found = list(_kernels())
    assert len(found) >= 30
    for name, fn in found:
        assert "USE_GDC" in inspect.signature(fn).parameters, name
        body = inspect.getsource(fn).split('):\n', 1)[1]
        first_use = re.search(r"\bUSE_GDC\)", body)
        first_access = re.search(r"tl\.(load|store|atomic_\w+)\(|_desc\.(load|store)\(", body)
        assert first_use, f"{name}: USE_GDC is never used"
        assert first_access is None or first_use.start() < first_access.start(), f"{name}: memory before gdc_enter"
