"""Programmatic dependent launch (PDL) with a late trigger, for the decode step's kernels.

A b64 decode step is ~200 small kernels, each ~2.5-3 us over its own work: launch, prologue and
the first loads' latency. Launched with `launch_pdl=True`, a kernel may start once every program
of the kernel before it has called `gdc_release` (or exited); its `gdc_wait` then blocks until that
kernel has finished and its writes are visible. A kernel here that takes `USE_GDC` waits before
it touches memory another kernel writes, so the bits are the same with PDL on or off.

Where the trigger goes matters (forty-seventh run, tools/bench/linear_chain_probe.py): released at a
kernel's start, every kernel lets the next launch at once and their waiting programs pile up on the
SMs (1.3x slower at M 64); the tenth run's trigger at the start measured level. So each kernel here
releases late: once its main loop's loads are issued (the linears after their K walk, decode attention
after its KV walk, the norms after their row loads). Before the wait a linear asks L2 for its first
K steps of weights (`prefetch_rows`): weights are never written by the kernel before, and a prefetch
loads nothing into registers, so it cannot hand back stale data; it only shortens the first loads
after the wait. Sized to the first stages, it stays in L2 (the tenth run's whole-slice prefetch was
evicted before use at 8B).

The persistent TMA linears wait before their tile loop and release after each program's last K walk
(`release_after_last`); their callers pass USE_GDC=launch.PDL_TMA (on by default since the fifty-first run: H100,
the decode step at 0.6B b256 1.012x, 8B b256 0.998x; MILES_PDL_TMA=0 turns it off).

`launch.FastKernel` passes USE_GDC=True and launch_pdl=True to kernels with a USE_GDC parameter
while `launch.PDL` is on (the default: the forty-ninth run, H100, timed the 0.6B b64 decode step 1.017x
and the engine's warm quick rows 1.00-1.04x with it; MILES_PDL=0 in the environment or
`tools/bench/with_tiles.py --pdl off` turn it off) on GPUs with PDL (compute capability 9.0+). Their callers
pass USE_GDC=launch.gdc_rows(x, rows): PDL at launches over at most launch.PDL_MAX_ROWS rows (64; the
fifty-second run, H100: at b128-256 the 8B decode step lost 2-4% with it); rms_norm and add_rms_norm up to 256
rows (launch.PDL_NORM_MAX_ROWS; the fifty-fourth run, H100: the step at b128-256 1.000-1.011x). On the CPU
(the interpreter) USE_GDC stays False.
"""

import triton
import triton.language as tl


@triton.jit
def gdc_wait(USE_GDC: tl.constexpr):
    """Wait for the kernel before this one to finish (its writes visible): before any dependent access."""
    if USE_GDC:
        tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def gdc_release(USE_GDC: tl.constexpr):
    """Let the next kernel launch (it still waits for this one in its gdc_wait): late in a kernel."""
    if USE_GDC:
        tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def release_after_last(tile, n_tiles, NUM_PROGRAMS: tl.constexpr, USE_GDC: tl.constexpr):
    """In a persistent kernel's tile loop (program p: tiles p, p + NUM_PROGRAMS, ... < n_tiles):
    gdc_release once this program's last tile is past its K walk."""
    if USE_GDC:
        if tile + NUM_PROGRAMS >= n_tiles:
            gdc_release(USE_GDC)


@triton.jit
def prefetch_rows(ptr, rows, n_rows, stride, K, COLS: tl.constexpr, USE_GDC: tl.constexpr):
    """With USE_GDC, ask L2 for columns [0, min(COLS, K)) of the given rows of a row-major 16-bit
    matrix: one `prefetch.global.L2` a 128-byte line (64 elements). A hint: nothing is loaded."""
    if USE_GDC:
        LINES: tl.constexpr = COLS // 64
        base = ptr + tl.minimum(rows, n_rows - 1).to(tl.int64)[:, None] * stride
        lines = base + tl.minimum(tl.arange(0, LINES) * 64, K - 1)[None, :]
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [lines], dtype=tl.int32,
                                  is_pure=False, pack=1)
