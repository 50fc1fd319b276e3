"""Where the Gluon kernels (Hopper only) may run: the Triton releases tests/gpu ran them on
(gluon_attention.TESTED_TRITON); elsewhere the callers keep the Triton kernels (the same bits)."""

import functools
import importlib


@functools.cache
def gluon_module(name: str):
    """miles_kernels._triton.<name> (a module of Gluon kernels), or None where this Triton has no
    Gluon for Hopper or is not a release the Gluon kernels were tested with."""
    try:
        gate = importlib.import_module("miles_kernels._triton.gluon_attention")
        module = importlib.import_module(f"miles_kernels._triton.{name}")
    except ImportError:
        return None
    return module if gate.usable() else None
