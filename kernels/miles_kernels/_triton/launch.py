"""Launch compiled Triton kernels without Triton's per-call binding work.

`kernel[grid](*args, **kw)` spends much of a small op's host time in Triton's
`JITFunction.run`: binding the arguments, building the specialization key, parsing options
(~40% of an op's host time, tools/bench/launch_cost.py --cprofile). `@fast_launch` above
`@triton.jit` keeps each compiled kernel under a key of everything Triton specializes on:
per tensor its dtype and 16-byte alignment, per int whether it is 1, a multiple of 16 and
its width, per TMA descriptor its dtype and block shape, and the constexpr and launch
options by value. A key's first call goes through Triton (compile or Triton's cache) and
keeps the kernel it returns; later calls hand the arguments straight to that kernel's
launcher, in the order and form `JITFunction.run` uses (Triton >= 3.3). The key is at
least as fine as Triton's, so a call never runs a kernel compiled for other arguments.

Triton's own path serves whenever the fast one cannot: the interpreter (TRITON_INTERPRET=1:
the decorator returns the function as it is), a callable grid, an argument of a type not
keyed here, and active launch hooks (profilers read their metadata); and everywhere with
MILES_FAST_LAUNCH=0 in the environment (or `launch.ENABLED = False`), should a Triton
release change how its launcher is called.

A kernel with a `USE_GDC` constexpr gets USE_GDC=True and launch_pdl=True while `PDL` is on, on a
GPU with programmatic dependent launch (compute capability 9.0+): gdc.py. A call that passes
USE_GDC=False keeps it, and no launch_pdl (the TMA linears with `PDL_TMA` off); one that passes
USE_GDC=True gets False where PDL is off or the device has none. The row-wise callers pass
USE_GDC=gdc_rows(x, rows): PDL at decode batches up to PDL_MAX_ROWS only (past it, the 8B decode step
lost 2-4% with it); the norms pass PDL_NORM_MAX_ROWS (256: they gained up to 1.1% at b128-256). A limit by
waves (PDL only where a launch's programs fit one wave, counted on the compiled kernel) was timed against it
in the fifty-third run and dropped: 0.6B b128-256 1.1-2.0% faster, 8B b64-128 1.2-2.7% slower.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton

try:  # Triton >= 3.4
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older Triton: Triton's own path only
    _knobs = None
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = ()

_I32 = 1 << 31
ENABLED = os.environ.get("MILES_FAST_LAUNCH", "1") != "0"


def _switch(name: str, default: str, what: str) -> bool:
    value = os.environ.get(name, default)
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: set 1 ({what} on) or 0 (off)")
    return value == "1"


ALL_ROWS = 1 << 62  # a row limit of "all": PDL at every launch size


def _rows_limit(name: str, default: str) -> int:
    value = os.environ.get(name, default)
    if value == "all":
        return ALL_ROWS
    if not value.isdigit():
        raise ValueError(f"{name}={value!r}: give a row count, a whole number >= 0 (0: no PDL for these kernels), "
                         "or all (PDL at every size)")
    return int(value)


# Programmatic dependent launch with late triggers for the kernels that take USE_GDC (gdc.py): on by default
# (H100, forty-ninth run: the 0.6B b64 decode step 1.017x, the engine's warm rows 1.00-1.04x); MILES_PDL=0 turns it off.
PDL = _switch("MILES_PDL", "1", "programmatic dependent launch")
# The persistent TMA linears (linear, linears, swiglu at M past the pointer tiles) with PDL too: on by default (H100,
# fifty-first run, step_peer b256 ctx 256 by turns: 0.6B 1.012x, 8B 0.998x); MILES_PDL_TMA=0 or with_tiles
# --pdl-tma off turns it off.
# Their callers pass USE_GDC=PDL_TMA, and an explicit USE_GDC=False is never overridden.
PDL_TMA = _switch("MILES_PDL_TMA", "1", "PDL for the TMA linears")
# The other kernels that take USE_GDC (the pointer linears, the norms, decode attention) get PDL only at launches
# over at most PDL_MAX_ROWS rows (tokens; sequences for decode attention). H100, fifty-second run, step_peer ctx 256
# by turns, the decode step with this limit at 64 against PDL at every size: b64 level, b128 0.983x (0.6B) / 1.039x
# (8B), b256 1.003x / 1.021x; against PDL off: b64 1.018x / 1.003x (fifty-third run: b64 1.019x / 1.001x, b128
# 0.997x / 0.995x, b256 0.998x / 1.000x). MILES_PDL_MAX_ROWS=N moves it.
PDL_MAX_ROWS = _rows_limit("MILES_PDL_MAX_ROWS", "64")
# rms_norm and add_rms_norm take PDL up to 256 rows (the decode batches timed; the trainer's and the prefill's
# thousands of rows stay without): H100, fifty-fourth run, step_peer ctx 256 by turns (tools/bench/pdl_sites.py),
# the norms with PDL against the 64-row limit: 0.6B b128 1.006x, b256 1.011x, 8B b128 1.008x, b256 1.000x.
# Fifty-fifth run (H100): every GPU test and the 36 at-scale points pass with it; engine rows 1.000-1.007x.
# MILES_PDL_NORM_MAX_ROWS=N (or all) moves it.
PDL_NORM_MAX_ROWS = _rows_limit("MILES_PDL_NORM_MAX_ROWS", "256")
_PDL_KW = {"USE_GDC": True, "launch_pdl": True}
_PDL_DEVICES: dict[int, bool] = {}


class _Unkeyed(Exception):
    """An argument this launcher does not key: Triton's path serves the call."""


def arg_key(a):
    """What Triton specializes on for one non-constexpr argument (or finer)."""
    t = type(a)
    if t is int:  # Triton: 1 is a constant, a multiple of 16 gets a hint; i32, i64 or u64
        if -_I32 <= a < _I32:
            return "1" if a == 1 else a & 15 == 0  # "1", not 1: True == 1 as a key
        return "i64", a & 15 == 0, a >= 1 << 63
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() & 15 == 0
    if t is float:
        return "f"
    if t is bool or a is None:
        return t, a
    if isinstance(a, TensorDescriptor):
        return ("desc", a.base.dtype, a.base.data_ptr() & 15 == 0, tuple(a.block_shape), tuple(a.strides[-1:]),
                getattr(a, "padding", None))
    raise _Unkeyed(t.__name__)


def _current_device():
    return triton.runtime.driver.active.get_current_device()


def _current_stream(device):
    return triton.runtime.driver.active.get_current_stream(device)


def pdl_on(device: int) -> bool:
    """Whether kernels that take USE_GDC launch with PDL on this device (module docstring)."""
    if not PDL:
        return False
    on = _PDL_DEVICES.get(device)
    if on is None:
        on = _PDL_DEVICES[device] = torch.cuda.get_device_capability(device)[0] >= 9
    return on


def gdc_rows(x: torch.Tensor, rows: int, limit: int | None = None) -> bool:
    """USE_GDC for a launch on x's device over `rows` rows: on CUDA where rows <= limit (PDL_MAX_ROWS if None;
    FastKernel still needs PDL on and a device with it)."""
    return x.is_cuda and rows <= (PDL_MAX_ROWS if limit is None else limit)


def _hooks_active() -> bool:
    hook = _knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


class FastKernel:
    """A `triton.jit` kernel whose repeat launches skip Triton's binding (module docstring)."""

    def __init__(self, fn):
        self.fn = fn
        self.names = [p.name for p in fn.params]
        self.constexpr = {p.name for p in fn.params if p.is_constexpr}
        self.const_pos = {i for i, p in enumerate(fn.params) if p.is_constexpr}
        self.first_const = min(self.const_pos, default=len(self.names))
        self.keyed = frozenset(self.names) - self.constexpr  # keywords keyed like positions; others by value
        self.gdc = "USE_GDC" in self.constexpr
        sig = inspect.signature(fn.fn).parameters
        self.defaults = {n: sig[n].default for n in self.names if sig[n].default is not inspect.Parameter.empty}
        self.kernels: dict = {}

    def __getattr__(self, name):  # warmup, cache, src, ...: the Triton kernel's
        return getattr(self.fn, name)

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launch(grid, args, kw)

    def key(self, args: tuple, kw: dict):
        pos = tuple(map(arg_key, args))
        if len(args) > self.first_const:  # constexprs passed by position: by value
            pos = tuple(("c", args[i]) if i in self.const_pos else k for i, k in enumerate(pos))
        if self.keyed.isdisjoint(kw):  # constexprs and launch options (num_warps, ...): by value
            return pos, tuple(kw.items())
        return pos, tuple((k, arg_key(v) if k in self.keyed else v) for k, v in kw.items())

    def bound(self, args: tuple, kw: dict) -> list:
        """Every parameter's value in declaration order (constexprs included), as Triton binds them."""
        out = list(args)
        for name in self.names[len(args):]:
            out.append(kw[name] if name in kw else self.defaults[name])
        return out

    def launch(self, grid, args: tuple, kw: dict):
        device = _current_device()
        if self.gdc:
            if kw.get("USE_GDC", True) and pdl_on(device):  # a caller's USE_GDC=False stays off
                kw = {**kw, **_PDL_KW}
            elif kw.get("USE_GDC"):  # asked for while PDL is off, or on a device without it
                kw = {**kw, "USE_GDC": False}
        if not ENABLED or _knobs is None or callable(grid) or _hooks_active():
            return self.fn.run(*args, grid=grid, warmup=False, **kw)
        try:
            key = (device, self.key(args, kw))
        except _Unkeyed:
            return self.fn.run(*args, grid=grid, warmup=False, **kw)
        kernel = self.kernels.get(key)
        if kernel is None:
            kernel = self.fn.run(*args, grid=grid, warmup=False, **kw)
            if hasattr(kernel, "result"):  # Triton's async compile mode hands back a future
                kernel = kernel.result()
            if kernel is not None and hasattr(kernel, "packed_metadata"):
                self.kernels[key] = kernel
            return kernel
        stream = _current_stream(device)
        n = len(grid)
        kernel.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream, kernel.function,
                   kernel.packed_metadata, None, _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook,
                   *self.bound(args, kw))
        return kernel


def fast_launch(fn):
    """Decorator above `@triton.jit`: the kernel launched by FastKernel; unchanged under the
    interpreter (or any object that is not a compiled-kernel JITFunction)."""
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        return fn
    return FastKernel(fn)
