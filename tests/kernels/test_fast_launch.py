"""miles_kernels._triton.launch: which calls reuse a compiled kernel, and what its launcher gets.

Runs on CPU: a real `triton.jit` function whose `run` (Triton's bind-compile-launch path)
is replaced by a recorder that hands back a fake compiled kernel, and a fake driver. The
launch itself is GPU-tested (tests/gpu/test_kernels_gpu.py: fast and Triton's path agree).
"""

from __future__ import annotations

from types import SimpleNamespace

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


@triton.jit
def _gdc_demo_kernel(x_ptr, n, BLOCK: tl.constexpr, USE_GDC: tl.constexpr = False):
    pass


def test_kernels_with_use_gdc_launch_with_pdl_only_while_it_is_on(kernel, monkeypatch):
    """launch.PDL on and a device with PDL: a kernel with a USE_GDC parameter gets USE_GDC=True and
    launch_pdl=True (its own compiled kernel, repeats included); off, or no PDL on the device, or
    no USE_GDC parameter: neither."""
    fk = launch.fast_launch(_gdc_demo_kernel)
    fk.slow = []
    monkeypatch.setattr(_gdc_demo_kernel, "run", lambda *a, grid, warmup, **kw: fk.slow.append((grid, a, kw))
                        or _Compiled())
    x = torch.zeros(64)
    monkeypatch.setattr(launch, "PDL", False)
    fk[(1,)](x, 64, BLOCK=32)
    assert fk.slow[-1][2] == {"BLOCK": 32}
    monkeypatch.setattr(launch, "PDL", True)
    monkeypatch.setattr(launch, "_PDL_DEVICES", {0: False})  # a device without PDL
    fk[(1,)](x, 64, BLOCK=32)
    assert len(fk.slow) == 1
    monkeypatch.setattr(launch, "_PDL_DEVICES", {0: True})
    first = fk[(1,)](x, 64, BLOCK=32)
    assert len(fk.slow) == 2 and fk.slow[-1][2] == {"BLOCK": 32, "USE_GDC": True, "launch_pdl": True}
    fk[(1,)](x, 64, BLOCK=32)  # the repeat: the PDL kernel's launcher, USE_GDC bound True
    assert len(fk.slow) == 2 and first.launches[-1][-4:] == (x, 64, 32, True)
    fk[(1,)](x, 64, BLOCK=32, USE_GDC=False)  # a caller's explicit False (the TMA linears, PDL_TMA off) stays
    assert len(fk.slow) == 3 and fk.slow[-1][2] == {"BLOCK": 32, "USE_GDC": False}
    monkeypatch.setattr(launch, "PDL", False)
    fk[(1,)](x, 64, BLOCK=32, USE_GDC=True)  # a caller's True while PDL is off: the kernel without PDL
    assert len(fk.slow) == 3 and fk.slow[-1][2] == {"BLOCK": 32, "USE_GDC": False}  # that launcher, reused
    kernel[(1,)](x, x, 64, 0.5, BLOCK=32)  # no USE_GDC parameter: never the option
    assert kernel.slow[-1][2] == {"BLOCK": 32}


def _jit_source(obj):
    """(source, module globals) of a @triton.jit function, under FastKernel or the interpreter too."""
    import inspect

    fn = obj
    while hasattr(fn, "fn"):
        fn = fn.fn
    return inspect.getsource(fn), fn.__globals__


def _waits_first(obj, name: str) -> tuple[bool, bool]:
    """(waits before any memory access, releases after its wait) for a kernel or a helper it hands USE_GDC."""
    import re

    src, glb = _jit_source(obj)
    body = src.split("):\n", 1)[1]
    access = re.search(r"tl\.(load|store|atomic_\w+)\(|_desc\.(load|store)\(", body)
    wait = re.search(r"\bgdc_wait\(USE_GDC\)", body)
    handed = re.search(r"\b(\w+)\((?:[^()]|\([^()]*\))*\bUSE_GDC\b", body)  # the first call given USE_GDC
    if wait is None and handed is not None and handed.group(1) not in ("gdc_wait", "gdc_release", "prefetch_rows"):
        first_access_ok = access is None or handed.start() < access.start()
        inner_wait, inner_release = _waits_first(glb[handed.group(1)], name)
        return first_access_ok and inner_wait, inner_release
    assert wait is not None, f"{name}: takes USE_GDC but never waits (gdc_wait)"
    return access is None or wait.start() < access.start(), _releases(body[wait.end():], glb)


def _releases(code: str, glb: dict) -> bool:
    """Whether code releases the next kernel: gdc_release(USE_GDC), release_after_last(..., USE_GDC), or a
    helper handed USE_GDC that does."""
    import re

    if re.search(r"\bgdc_release\(USE_GDC\)|\brelease_after_last\(", code):
        return True
    for call in re.finditer(r"\b(\w+)\((?:[^()]|\([^()]*\))*\bUSE_GDC\b", code):
        if call.group(1) not in ("gdc_wait", "prefetch_rows") and call.group(1) in glb:
            src, inner = _jit_source(glb[call.group(1)])
            if _releases(src.split("):\n", 1)[1], inner):
                return True
    return False


def test_every_pdl_kernel_waits_before_its_first_memory_access():
    """PDL is safe only if a kernel launched early waits for the kernel before it (gdc_wait) before
    its first load or store (L2 prefetches of weights excepted: they load nothing), and releases the
    next one (gdc_release) after the wait. Checked in the source of every kernel with USE_GDC."""
    import importlib
    import inspect
    import pkgutil

    import miles_kernels._triton as kt

    found = {}
    for m in pkgutil.iter_modules(kt.__path__):
        mod = importlib.import_module(f"miles_kernels._triton.{m.name}")
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and hasattr(obj, "fn") and "USE_GDC" in _jit_source(obj)[0].split(":\n")[0]:
                found[f"{m.name}.{name}"] = obj
    want = {"matmul._linear_kernel", "fused_linears._linears_kernel", "fused_linears._swiglu_kernel",
            "elementwise._rms_norm_kernel", "elementwise._add_rms_norm_kernel", "elementwise._qk_norm_rope_kernel",
            "decode_attention.decode_kernel", "decode_attention.decode_pairs_kernel",
            "matmul._linear_tma_kernel", "fused_linears._linears_tma_kernel", "fused_linears._swiglu_tma_kernel"}
    assert want <= set(found), f"the decode step's kernels without USE_GDC: {sorted(want - set(found))}"
    for name, obj in found.items():
        waits, releases = _waits_first(obj, name)
        assert waits, f"{name}: loads or stores before gdc_wait"
        assert releases, f"{name}: never releases the next kernel (gdc_release after the wait)"
    assert "def gdc_wait" in inspect.getsource(importlib.import_module("miles_kernels._triton.gdc"))


@pytest.mark.parametrize("name,shipped", [("MILES_PDL", "True"), ("MILES_PDL_TMA", "True")])
def test_pdl_environment_values_are_honoured_or_refused(name, shipped):
    """MILES_PDL (PDL, on as shipped) and MILES_PDL_TMA (the TMA linears' PDL, on as shipped): 1 on,
    0 off, unset the shipped value, anything else refused with the variable named."""
    import os
    import subprocess
    import sys

    attr = {"MILES_PDL": "PDL", "MILES_PDL_TMA": "PDL_TMA"}[name]
    code = f"from miles_kernels._triton import launch; print(launch.{attr})"
    unset = {k: v for k, v in os.environ.items() if k != name}
    for env, want in (({**unset, name: "1"}, "True"), ({**unset, name: "0"}, "False"), (unset, shipped)):
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.stdout.strip() == want, (env.get(name), out.stderr)
    bad = subprocess.run([sys.executable, "-c", code], env={**os.environ, name: "yes"}, capture_output=True, text=True)
    assert bad.returncode != 0 and f"{name}='yes'" in bad.stderr and "set 1" in bad.stderr


def test_row_wise_kernels_take_pdl_up_to_the_row_limit(monkeypatch):
    """gdc_rows: USE_GDC on a CUDA tensor at rows <= PDL_MAX_ROWS, never past it or on the CPU."""
    cuda, cpu = SimpleNamespace(is_cuda=True), torch.zeros(1)
    monkeypatch.setattr(launch, "PDL_MAX_ROWS", 64)
    assert launch.gdc_rows(cuda, 1) and launch.gdc_rows(cuda, 64)
    assert not launch.gdc_rows(cuda, 65) and not launch.gdc_rows(cpu, 1)
    monkeypatch.setattr(launch, "PDL_MAX_ROWS", 0)
    assert not launch.gdc_rows(cuda, 1)
    assert launch.gdc_rows(cuda, 256, 256) and not launch.gdc_rows(cuda, 257, 256)  # a site's own limit
    assert not launch.gdc_rows(cpu, 1, launch.ALL_ROWS)
    assert launch.PDL_NORM_MAX_ROWS == 256  # the norms' shipped limit (MILES_PDL_NORM_MAX_ROWS unset in tests)


@pytest.mark.parametrize("value", ["-1", "64k", ""])
def test_a_bad_pdl_row_limit_is_refused_by_name(value, monkeypatch):
    monkeypatch.setenv("MILES_PDL_MAX_ROWS", value)
    with pytest.raises(ValueError, match="MILES_PDL_MAX_ROWS"):
        launch._rows_limit("MILES_PDL_MAX_ROWS", "64")
    monkeypatch.setenv("MILES_PDL_MAX_ROWS", "128")
    assert launch._rows_limit("MILES_PDL_MAX_ROWS", "64") == 128
    monkeypatch.setenv("MILES_PDL_MAX_ROWS", "all")
    assert launch._rows_limit("MILES_PDL_MAX_ROWS", "64") == launch.ALL_ROWS
