"""Stream-K for the persistent TMA linears (`linear`, `swiglu`) with linear's bits; off by default.

A persistent launch of T tiles on P programs with T > P and T % P != 0 runs cdiv(T, P) tiles on some programs
and fewer on the rest: at 1.45 waves the longest program walks two tiles' K-steps where the mean is 1.45. Here
the T x KI tile K-steps (KI = cdiv(K, BLOCK_K)) are split evenly over the P programs, so a program's range may
end inside a tile (that tile's head: K-steps [0, kb)) and the next program's start there (its tail). The tail
program resumes the head's fp32 accumulator from a workspace slot instead of summing two partial products, so
each output element adds its K products in the order a whole tile does: linear's bits. Each program computes
its head first (it depends on nothing), then its whole tiles, then its tail, whose head the program before
finished first thing; the hand-off is a flag (release / acquire) that the consumer sets back to 0 for the next
launch or graph replay. T >= P keeps every range at least a tile long, so a tile passes through two programs at
most.

The workspace (one fp32 tile a program) and the flags are kept per device: stream-K launches on one device must
run on one stream at a time (the engine's and the trainer's do). They are made outside CUDA graph captures; a
capture that finds none runs the plain launch, which gives the same bits.

MILES_STREAM_K=1 in the environment (or `STREAM_K = True`) turns it on where the plain grid makes between one
and MAX_WAVES waves with a short last one. Not yet timed on a GPU: tools/bench/streamk_probe.py times the kernel
alone, `tools/gpu_checks.sh streamkstep` the decode step with it on and off.
"""

import torch
import triton
import triton.language as tl

from miles_kernels._triton.launch import _switch

STREAM_K = _switch("MILES_STREAM_K", "0", "stream-K for the persistent TMA linears")
MAX_WAVES = 6  # above, the last wave's share of the time is small (the probe's shapes reach 5.8 waves)
SLOT = 128 * 256  # the largest TMA tile (matmul's tables): one fp32 slot a program
_WORKSPACE: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def takes(n_tiles: int, n_programs: int, k: int) -> bool:
    """Whether a launch of n_tiles tiles (of K = k) on a persistent grid of n_programs takes stream-K."""
    return STREAM_K and k > 0 and n_programs <= n_tiles < MAX_WAVES * n_programs and n_tiles % n_programs != 0


def workspace(device: torch.device, n_programs: int, slot_elems: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(slots fp32 [n_programs * SLOT], flags int32 [n_programs], zero) for this device and grid; None
    inside a CUDA graph capture that finds none (made there, they would belong to the graph's pool and stay
    unzeroed until a replay). Made once at the largest tile and never freed: captured graphs keep the address."""
    if slot_elems > SLOT:
        raise ValueError(f"miles_kernels stream-K: a {slot_elems}-element tile is larger than the workspace's "
                         f"{SLOT}; raise streamk.SLOT")
    index = device.index if device.index is not None else torch.cuda.current_device() if device.type == "cuda" else 0
    key = (device.type, index, n_programs)
    ws = _WORKSPACE.get(key)
    if ws is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        ws = _WORKSPACE[key] = (torch.empty(n_programs * SLOT, dtype=torch.float32, device=device),
                                torch.zeros(n_programs, dtype=torch.int32, device=device))
    return ws


@triton.jit
def split(pid, n_tiles, n_ki, NUM_PROGRAMS: tl.constexpr):
    """Program pid's K-step range [lo, hi) of n_tiles x n_ki, as (head tile, kb, first whole tile, end of the
    whole tiles, tail tile, ka): the head is K-steps [0, kb) of its tile (kb 0: none), the tail [ka, n_ki) of
    its tile (ka 0: none)."""
    work = n_tiles * n_ki
    lo = pid * work // NUM_PROGRAMS
    hi = (pid + 1) * work // NUM_PROGRAMS
    return hi // n_ki, hi % n_ki, tl.cdiv(lo, n_ki), hi // n_ki, lo // n_ki, lo % n_ki


@triton.jit
def k_range(x_desc, w_desc, off_m, off_n, k_lo, k_hi, acc, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc + x @ w^T over K-steps [k_lo, k_hi) of the tile at (off_m, off_n), in order (matmul._tma_k_walk's
    steps: from k_lo = 0 to cdiv(K, BLOCK_K) the same dots)."""
    for ki in range(k_lo, k_hi):
        acc = tl.dot(x_desc.load([off_m, ki * BLOCK_K]), w_desc.load([off_n, ki * BLOCK_K]).T, acc,
                     input_precision=PRECISION)
    return acc


@triton.jit
def slots(ws_ptr, part, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pointers of part `part` (a [BLOCK_M, BLOCK_N] accumulator) of program 0's slot; made once at the kernel's
    start (made at each use instead, ptxas serialized the 128x128 tile's wgmmas: C7515, tools/bench/sm90_regs.py)."""
    return ws_ptr + part * BLOCK_M * BLOCK_N + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]


@triton.jit
def park(acc, slot, SLOT: tl.constexpr):
    """This program's head accumulator (one part of it: `slot` from slots) into its slot; `publish` after the
    last part."""
    tl.store(slot + tl.program_id(0) * SLOT, acc)


@triton.jit
def publish(flag_ptr):
    """The slot's stores done by every thread, then this program's flag set with release semantics."""
    tl.debug_barrier()
    tl.atomic_xchg(flag_ptr + tl.program_id(0), 1, sem="release", scope="gpu")


@triton.jit
def await_head(flag_ptr):
    """Wait (acquire) until the program before this one has published its head."""
    flag = flag_ptr + tl.program_id(0) - 1
    seen = tl.atomic_add(flag, 0, sem="acquire", scope="gpu")
    while seen == 0:
        seen = tl.atomic_add(flag, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def resume(slot, SLOT: tl.constexpr):
    """One part of the previous program's head accumulator (after await_head), read from L2."""
    return tl.load(slot + (tl.program_id(0) - 1) * SLOT, cache_modifier=".cg")


@triton.jit
def clear(flag_ptr):
    """The previous program's flag back to 0 (after its slot is read): ready for the next launch."""
    tl.atomic_xchg(flag_ptr + tl.program_id(0) - 1, 0, sem="relaxed", scope="gpu")
