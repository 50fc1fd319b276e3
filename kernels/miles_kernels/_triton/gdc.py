"""Programmatic dependent launch (PDL): a kernel starts while the one before it finishes.

A decode step is ~330 small kernels; each waits for the last to drain, then pays its own
launch, prologue and the first loads' latency. Launched with `launch_pdl=True`, a kernel
may start once every program of the previous kernel has called `gdc_launch_dependents`;
`gdc_wait` then blocks until that kernel has finished and its writes are visible. So every
kernel here that takes `USE_GDC` calls `gdc_enter` before it touches memory another kernel
writes or reads: the results are the same bits with PDL on or off, only the gaps shrink.
Before the wait a kernel may only issue L2 prefetches (`prefetch_lines`): hints that load
nothing into registers and write nothing, and L2 is where every SM's loads and stores meet,
so a prefetch never hands back stale data; addresses a prefetch needs read before the wait
(a block table) are volatile loads, never merged with the real loads after it.

`launch.FastKernel` passes USE_GDC=True and launch_pdl=True to such kernels on GPUs that
have PDL (compute capability 9.0+) when the Triton build has the gdc intrinsics, unless
MILES_PDL=0 is set; under the interpreter the branch is never taken.
"""

import triton
import triton.language as tl


@triton.jit
def gdc_enter(USE_GDC: tl.constexpr):
    """Let the next kernel launch, then wait for the previous one: first in a kernel."""
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def prefetch_lines(ptrs):
    """Ask L2 for the line holding each address of a tensor of pointers (a hint)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def prefetch_rows(ptr, rows, n_rows, stride, K):
    """Ask L2 for columns [0, K) of the given rows of a row-major matrix: one prefetch per 64
    elements (a 128-byte line of 16-bit data)."""
    LINES: tl.constexpr = 16
    base = ptr + tl.minimum(rows, n_rows - 1).to(tl.int64)[:, None] * stride
    for k0 in range(0, K, LINES * 64):
        prefetch_lines(base + tl.minimum(k0 + tl.arange(0, LINES) * 64, K - 1)[None, :])
