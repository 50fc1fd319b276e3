"""ops' dispatch: which implementation serves a call (mode, device), and the autograd wrappers that
run an invariant forward with a backward by recompute through _ref or by a closed-form rule (_grads)."""

from __future__ import annotations

import torch

from . import _cpu, _ref
from ._mode import get_mode


def _fast() -> bool:
    return get_mode() == "fast"


def _backend(x: torch.Tensor):
    if x.is_cuda:
        try:
            from . import _triton
        except ImportError as e:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "miles_kernels: invariant mode on CUDA needs Triton (pip install triton); "
                "or run in fast mode (miles_kernels.set_mode('fast')), accepting a "
                f"train/rollout mismatch. Import error: {e}") from e
        return _triton
    return _cpu


_FAST_CUDA = []  # [module]: fast mode's row-wise kernels on CUDA, looked up once


def _fast_kernels(x: torch.Tensor):
    """Fast mode's row-wise ops and logprobs: the Triton kernels for CUDA tensors when Triton
    imports (fast mode needs no Triton otherwise), else _ref's torch ops."""
    if not x.is_cuda:
        return _ref
    if not _FAST_CUDA:
        try:
            from . import _triton
        except ImportError:  # pragma: no cover - depends on the install
            _triton = _ref
        _FAST_CUDA.append(_triton)
    return _FAST_CUDA[0]


def _needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in xs)


class _Recompute(torch.autograd.Function):
    """Forward from the invariant implementation, backward through the _ref autograd graph."""

    @staticmethod
    def forward(ctx, ref_fn, inv_fn, n_tensors, *args):
        ctx.ref_fn, ctx.n = ref_fn, n_tensors
        ctx.extra = args[n_tensors:]
        ctx.save_for_backward(*args[:n_tensors])
        with torch.no_grad():
            return inv_fn(*args)

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, None, *_grads_through(ctx.ref_fn, ctx.saved_tensors, ctx.extra, grads),
                *[None] * len(ctx.extra))


def _grads_through(ref_fn, tensors, extra, grads):
    """Input grads of ref_fn(*tensors, *extra) for the output grads, by autograd on detached copies."""
    inputs = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
    with torch.enable_grad():
        out = ref_fn(*inputs, *extra)
    outs = out if isinstance(out, tuple) else (out,)
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
    wanted = [t for t in inputs if t.requires_grad]
    got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                   allow_unused=True)) if pairs else iter([None] * len(wanted))
    return [next(got) if t.requires_grad else None for t in inputs]


class _Rule(torch.autograd.Function):
    """Forward from the invariant implementation, backward from a closed-form rule (_grads)."""

    @staticmethod
    def forward(ctx, rule, inv_fn, n_tensors, *args):
        ctx.rule, ctx.n, ctx.extra = rule, n_tensors, args[n_tensors:]
        ctx.save_for_backward(*args[:n_tensors])
        with torch.no_grad():
            return inv_fn(*args)

    @staticmethod
    def backward(ctx, *gs):  # one grad per output; a rule of several outputs gets them as a tuple
        g = gs[0] if len(gs) == 1 else gs
        grads = ctx.rule(ctx.saved_tensors, ctx.extra, g, ctx.needs_input_grad[3: 3 + ctx.n])
        return (None, None, None, *grads, *[None] * len(ctx.extra))


def _with_rule(rule, inv_fn, tensors, extra=()):
    if _needs_grad(*tensors):
        return _Rule.apply(rule, inv_fn, len(tensors), *tensors, *extra)
    with torch.no_grad():
        return inv_fn(*tensors, *extra)


def _invariant(ref_fn, inv_fn, tensors, extra=()):
    if _needs_grad(*tensors):
        return _Recompute.apply(ref_fn, inv_fn, len(tensors), *tensors, *extra)
    with torch.no_grad():
        return inv_fn(*tensors, *extra)
