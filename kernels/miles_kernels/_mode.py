"""Which implementation the ops use: "invariant" (default) or "fast".

A run picks its mode once (``set_mode``); ``use_mode`` scopes a change and restores the
previous mode on exit. Fast mode trades the bitwise train/rollout equality for vendor
kernels (cuBLAS, SDPA); the RL loop then logs the mismatch and applies a correction.
"""

from __future__ import annotations

import contextlib
import threading

MODES = ("invariant", "fast")
_state = threading.local()


def get_mode() -> str:
    return getattr(_state, "mode", "invariant")


def set_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"miles_kernels mode must be one of {MODES}, got {mode!r}")
    _state.mode = mode


@contextlib.contextmanager
def use_mode(mode: str):
    previous = get_mode()
    set_mode(mode)
    try:
        yield
    finally:
        set_mode(previous)
