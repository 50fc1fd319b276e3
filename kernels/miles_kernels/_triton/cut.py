"""The filter's cuts of fp32 rows, batch-invariant: per row the smallest value top-p / top-k keeps.

top-p: cut[row] = the smallest v with sum_{x_i > v} exp(x_i - max) < top_p * sum_i exp(x_i - max):
a token is kept iff the mass strictly above it is below top_p (ties kept). top-k (COUNT): the
smallest v with fewer than k values above it, the k-th largest value (torch.topk's, ties
counted), its counts exact in fp32 whatever their order. A search over the floats' order, three
cut points a pass (16 passes narrow 2**32 keys to one), no sort. P(v) (`above v < target`) is
monotone in v and the answer is the key where it turns true, so any bracket (lo, hi] with P(lo)
false and P(hi) true finds the same key: top-p starts from a bound near the max and stops when one
key is left (11-13 passes where the max is well above the bound's ~15 under it; the split launch's
passes are 16 launches, those after the last key's found ending at once). A snapping launch also
pulls each pass's bracket in to the tokens nearest its cut points (_snap): the same key, fewer passes.

Every sum is summed alike, fixed by the row alone: each of the CHUNK = 2**LOG lanes adds its
tokens' terms (token v0 + lane of each chunk) chunk after chunk, then one fixed tree sums the
lanes (_tree_sum: adjacent pairs, level by level). The masses above v fall as v rises
(non-negative terms dropped from a fixed-order sum), so the search finds one key whatever its
bracket. Nothing in a launch changes a bit: chunks a loop step (UNROLL), loads ahead (STAGES),
num_warps, or how many programs share a row (SPLIT: program s holds lanes [s L, (s + 1) L), one
subtree of the tree; its passes are launches, the row's state between them in small buffers).
CUT_LAUNCH picks the launch by the row count. Nor does ASM (a token's step in PTX on NVIDIA GPUs).
"""

import os

import torch
import triton
import triton.language as tl

from miles_kernels._triton.launch import fast_launch

CHUNK = 4096  # lanes of a row: a lane adds the tokens lane, lane + CHUNK, ...
PASSES = 16  # three cut points a pass: 4**16 = 2**32 keys
# The lane loops' token step in PTX on NVIDIA GPUs (_exp, _add_above): 10 instructions a token a pass
# where Triton's ops take 16 (sm_90 SASS), the same sums; H100 (fortieth run) 64 rows 0.342 vs 0.379 ms,
# level from 256 rows (not issue-bound there). Off: Triton's ops (always so in the interpreter).
ASM = True


@triton.jit
def _float_key(x):
    """fp32 -> int32 whose order is the floats' order (negative floats: flip the low 31 bits)."""
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b)


@triton.jit
def _key_float(k):
    return tl.where(k < 0, k ^ 0x7FFFFFFF, k).to(tl.float32, bitcast=True)


@triton.jit
def _tree_sum(x, LOG: tl.constexpr):
    """x [2**LOG] summed as one fixed binary tree (adjacent pairs, level by level), so the bits do
    not follow the layout (tl.sum's order does: its lanes per thread, warps): any num_warps gives
    the same sum, and a program holding a run of 2**k lanes holds one subtree."""
    for _ in tl.static_range(LOG):
        x = tl.sum(tl.reshape(x, (x.shape[0] // 2, 2)), 1)  # one add a pair: the same either way round
    return tl.sum(x, 0)


@triton.jit
def _exp(d, ASM: tl.constexpr):
    """exp(d) as tl.exp computes it (ex2.approx of d log2 e); under ASM ex2's .ftz form, whose results
    under 2**-126 are 0 (no denormal fix-up: 3 instructions fewer). Such a term never moves a mass: a
    mass above a cut point holds the max's term, 1, and a denormal added to 1 rounds away."""
    if ASM:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [d * 1.4426950408889634],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.exp(d)


@triton.jit
def _add_above(a1, a2, a3, x, e, v1, v2, v3, ASM: tl.constexpr):
    """a_i + (e where x > v_i else 0): under ASM a compare and a predicated add each (no select; adding
    0 leaves a sum as it is, so the same bits)."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .pred p; "
            "setp.gt.f32 p, $6, $8; @p add.rn.f32 $0, $0, $7; "
            "setp.gt.f32 p, $6, $9; @p add.rn.f32 $1, $1, $7; "
            "setp.gt.f32 p, $6, $10; @p add.rn.f32 $2, $2, $7; }",
            "=f,=f,=f,0,1,2,f,f,f,f,f", [a1, a2, a3, x, e, v1, v2, v3],
            dtype=(tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        return a1 + tl.where(x > v1, e, 0.0), a2 + tl.where(x > v2, e, 0.0), a3 + tl.where(x > v3, e, 0.0)


@triton.jit
def _lane_max(base, lanes, V, CHUNK: tl.constexpr, UNROLL: tl.constexpr, STAGES: tl.constexpr):
    mv = tl.full(lanes.shape, float("-inf"), tl.float32)
    for v0 in tl.range(0, V, UNROLL * CHUNK, num_stages=STAGES):
        for j in tl.static_range(UNROLL):
            c = v0 + j * CHUNK + lanes
            mv = tl.maximum(mv, tl.load(base + c, mask=c < V, other=float("-inf")))
    return tl.max(mv, 0)


@triton.jit
def _lane_total(base, lanes, V, m, CHUNK: tl.constexpr, UNROLL: tl.constexpr, COUNT: tl.constexpr,
                STAGES: tl.constexpr, ASM: tl.constexpr):
    """Each lane's sum of exp(x - m) (COUNT: of 1 a finite x): its masses above -inf."""
    neg = tl.full([], float("-inf"), tl.float32)
    total, _, _ = _lane_masses(base, lanes, V, m, neg, neg, neg, CHUNK, UNROLL, COUNT, STAGES, ASM)
    return total


@triton.jit
def _cut_points(lo, hi):
    """The pass's three cut points, quartering the key bracket (lo, hi]: keys and their floats."""
    q1 = lo + (hi - lo) // 4
    q2 = lo + (hi - lo) // 2
    q3 = lo + (hi - lo) * 3 // 4
    return q1, q2, q3, _key_float(q1.to(tl.int32)), _key_float(q2.to(tl.int32)), _key_float(q3.to(tl.int32))


@triton.jit
def _lane_masses(base, lanes, V, m, v1, v2, v3, CHUNK: tl.constexpr, UNROLL: tl.constexpr, COUNT: tl.constexpr,
                 STAGES: tl.constexpr, ASM: tl.constexpr):
    """Each lane's sums of exp(x - m) (COUNT: 1) over its tokens above each cut point, chunk after chunk."""
    a1, a2, a3, n1, n2, n3, b1, b2, b3 = _lane_search(base, lanes, V, m, v1, v2, v3, CHUNK, UNROLL, COUNT, STAGES,
                                                      ASM, False)
    return a1, a2, a3


@triton.jit
def _lane_search(base, lanes, V, m, v1, v2, v3, CHUNK: tl.constexpr, UNROLL: tl.constexpr, COUNT: tl.constexpr,
                 STAGES: tl.constexpr, ASM: tl.constexpr, SNAP: tl.constexpr):
    """_lane_masses, and under SNAP each lane's smallest token above each cut point (n, +inf if none)
    and largest at or below it (b, -inf if none)."""
    a1 = tl.zeros(lanes.shape, tl.float32)
    a2 = tl.zeros(lanes.shape, tl.float32)
    a3 = tl.zeros(lanes.shape, tl.float32)
    n1 = tl.full(lanes.shape, float("inf"), tl.float32)
    n2 = n1
    n3 = n1
    b1 = tl.full(lanes.shape, float("-inf"), tl.float32)
    b2 = b1
    b3 = b1
    full = V // (UNROLL * CHUNK) * (UNROLL * CHUNK)  # whole loop steps unmasked, then the rest chunk by chunk
    for v0 in tl.range(0, full, UNROLL * CHUNK, num_stages=STAGES):
        for j in tl.static_range(UNROLL):
            x = tl.load(base + v0 + j * CHUNK + lanes)
            a1, a2, a3, n1, n2, n3, b1, b2, b3 = _token_step(a1, a2, a3, n1, n2, n3, b1, b2, b3, x, m, v1, v2, v3,
                                                             COUNT, ASM, SNAP)
    for v0 in range(full, V, CHUNK):
        c = v0 + lanes
        x = tl.load(base + c, mask=c < V, other=float("-inf"))
        a1, a2, a3, n1, n2, n3, b1, b2, b3 = _token_step(a1, a2, a3, n1, n2, n3, b1, b2, b3, x, m, v1, v2, v3,
                                                         COUNT, ASM, SNAP)
    return a1, a2, a3, n1, n2, n3, b1, b2, b3


@triton.jit
def _token_step(a1, a2, a3, n1, n2, n3, b1, b2, b3, x, m, v1, v2, v3, COUNT: tl.constexpr, ASM: tl.constexpr,
                SNAP: tl.constexpr):
    """A lane's next token into its three sums (lanes add their tokens chunk after chunk, however
    the loop steps are cut, so the same sums) and, under SNAP, its nearest tokens above (n) and at or
    below (b) each cut point."""
    if COUNT:
        e = tl.full(x.shape, 1.0, tl.float32)
    else:
        e = _exp(x - m, ASM)
    if SNAP and ASM:  # the compares shared: a predicated add, min and max each
        return tl.inline_asm_elementwise(
            "{ .reg .pred p; "
            "setp.gt.f32 p, $18, $20; @p add.rn.f32 $0, $0, $19; @p min.f32 $3, $3, $18; @!p max.f32 $6, $6, $18; "
            "setp.gt.f32 p, $18, $21; @p add.rn.f32 $1, $1, $19; @p min.f32 $4, $4, $18; @!p max.f32 $7, $7, $18; "
            "setp.gt.f32 p, $18, $22; @p add.rn.f32 $2, $2, $19; @p min.f32 $5, $5, $18; @!p max.f32 $8, $8, $18; }",
            "=f,=f,=f,=f,=f,=f,=f,=f,=f,0,1,2,3,4,5,6,7,8,f,f,f,f,f",
            [a1, a2, a3, n1, n2, n3, b1, b2, b3, x, e, v1, v2, v3], dtype=(tl.float32,) * 9, is_pure=True, pack=1)
    else:
        a1, a2, a3 = _add_above(a1, a2, a3, x, e, v1, v2, v3, ASM)
        if SNAP:
            n1 = tl.where(x > v1, tl.minimum(n1, x), n1)
            n2 = tl.where(x > v2, tl.minimum(n2, x), n2)
            n3 = tl.where(x > v3, tl.minimum(n3, x), n3)
            b1 = tl.where(x > v1, b1, tl.maximum(b1, x))
            b2 = tl.where(x > v2, b2, tl.maximum(b2, x))
            b3 = tl.where(x > v3, b3, tl.maximum(b3, x))
        return a1, a2, a3, n1, n2, n3, b1, b2, b3


@triton.jit
def _narrow(lo, hi, q1, q2, q3, s1, s2, s3, target):
    """The bracket after a pass: P(v) = mass above v < target is monotone, so one of the four
    spans holds its change; (lo, hi] keeps P(lo) false and P(hi) true."""
    p1 = s1 < target
    p2 = s2 < target
    p3 = s3 < target
    new_lo = tl.where(p1, lo, tl.where(p2, q1, tl.where(p3, q2, q3)))
    return new_lo, tl.where(p1, q1, tl.where(p2, q2, tl.where(p3, q3, hi)))


@triton.jit
def _snap(lo, hi, new_lo, new_hi, p1, p2, p3, n1, n2, n3, b1, b2, b3):
    """The bracket after a pass, pulled in to tokens. P changes only at a token's value, so the answer
    is one: a false cut point q (new_lo != lo) moves lo to just under the smallest token above q (P
    there is P(q): no token between), a true one (new_hi != hi) moves hi to the largest token at or below
    it (P there is P(q) too). Zeros: lo goes under -0.0 (both zeros are one value to P)."""
    n = tl.where(p2, n1, tl.where(p3, n2, n3))  # above the largest false cut point (used where p1 is false)
    b = tl.where(p1, b1, tl.where(p2, b2, b3))  # at or below the smallest true one (used where p3 is true)
    kn = tl.where(n == 0.0, -1, _float_key(n)).to(tl.int64)  # -1: -0.0's key
    lo = tl.where((new_lo != lo) & (n < float("inf")), tl.maximum(kn - 1, new_lo), new_lo)
    hi = tl.where((new_hi != hi) & (b > float("-inf")), tl.minimum(_float_key(b).to(tl.int64), new_hi), new_hi)
    return lo, hi


@triton.jit
def _target(level, total, COUNT: tl.constexpr):
    """P(v) is `above v < target`: top-p, level x the row's mass; COUNT (top-k), level = k."""
    if COUNT:
        return level + 0.0 * total
    return level * total


@triton.jit
def _cut(hi, total, level, COUNT: tl.constexpr):
    """The cut's value; a top-k row with fewer than k finite values keeps them all (-inf)."""
    cut = _key_float(hi.to(tl.int32))
    if COUNT:
        cut = tl.where(total < level, float("-inf"), cut)
    return cut


@triton.jit
def _start(m):
    """The first bracket: P(-inf) is false (all mass is above -inf), P(max) true (none above it)."""
    return _float_key(tl.full([], float("-inf"), tl.float32)).to(tl.int64), _float_key(m).to(tl.int64)


@triton.jit
def _narrow_start(m, total, level, V, COUNT: tl.constexpr):
    """A first bracket for one program's search: top-p's (lo, max] with lo = max + ln((1 - top_p) Z / V) - 1.
    The mass at or below lo is at most V exp(lo - max) = (1 - top_p) Z / e, so the mass above lo is at
    least Z (1 - (1 - top_p) / e) > top_p Z (a margin of 0.63 (1 - top_p) Z over the sums' rounding, kept
    for top_p <= 0.9999): P(lo) is false. Otherwise (top-k, an empty row) _start's."""
    lo, hi = _start(m)
    if not COUNT:
        b = m + tl.log((1.0 - level) * total / V) - 1.0
        ok = (level <= 0.9999) & (b > float("-inf")) & (b < m)
        lo = tl.where(ok, _float_key(tl.where(ok, b, m)).to(tl.int64), lo)
    return lo, hi


@fast_launch
@triton.jit
def _cut_kernel(x_ptr, cut_ptr, passes_ptr, V, stride_t, level, CHUNK: tl.constexpr, LOG: tl.constexpr,
                UNROLL: tl.constexpr, COUNT: tl.constexpr, PASSES_OUT: tl.constexpr, STAGES: tl.constexpr,
                ASM: tl.constexpr, SNAP: tl.constexpr):
    """One program a row, all passes in one launch (see the module): top-p's search starts from
    _narrow_start's bracket and ends when one key is left (PASSES_OUT: the passes a row took); SNAP:
    each pass's bracket pulled in to tokens (_snap; the same key in fewer passes)."""
    base = x_ptr + tl.program_id(0).to(tl.int64) * stride_t
    lanes = tl.arange(0, CHUNK)
    m = _lane_max(base, lanes, V, CHUNK, UNROLL, STAGES)
    total = _tree_sum(_lane_total(base, lanes, V, m, CHUNK, UNROLL, COUNT, STAGES, ASM), LOG)
    target = _target(level, total, COUNT)
    lo, hi = _narrow_start(m, total, level, V, COUNT)
    i = 0
    while hi - lo > 1:
        q1, q2, q3, v1, v2, v3 = _cut_points(lo, hi)
        a1, a2, a3, n1, n2, n3, b1, b2, b3 = _lane_search(base, lanes, V, m, v1, v2, v3, CHUNK, UNROLL, COUNT,
                                                          STAGES, ASM, SNAP)
        s1, s2, s3 = _tree_sum(a1, LOG), _tree_sum(a2, LOG), _tree_sum(a3, LOG)
        new_lo, new_hi = _narrow(lo, hi, q1, q2, q3, s1, s2, s3, target)
        if SNAP:
            new_lo, new_hi = _snap(lo, hi, new_lo, new_hi, s1 < target, s2 < target, s3 < target, tl.min(n1, 0),
                                   tl.min(n2, 0), tl.min(n3, 0), tl.max(b1, 0), tl.max(b2, 0), tl.max(b3, 0))
        lo, hi = new_lo, new_hi
        i += 1
    tl.store(cut_ptr + tl.program_id(0), _cut(hi, total, level, COUNT))
    if PASSES_OUT:
        tl.store(passes_ptr + tl.program_id(0), i)


@fast_launch
@triton.jit
def _cut_pass_kernel(x_ptr, part_max_ptr, part_ptr, state_ptr, total_ptr, cut_ptr, V, stride_t, level, step,
                     CHUNK: tl.constexpr, SPLIT: tl.constexpr, LOG_L: tl.constexpr, LOG_S: tl.constexpr,
                     UNROLL: tl.constexpr, PHASE: tl.constexpr, COUNT: tl.constexpr, STAGES: tl.constexpr,
                     ASM: tl.constexpr):
    """One launch of the cut over SPLIT programs a row (grid [T, SPLIT]; program s: lanes
    [s L, (s + 1) L), L = CHUNK / SPLIT). PHASE 0: each program's max. PHASE 1, step 0: the lanes'
    total as subtrees into part[0]; step k >= 1: the bracket (k = 1: _narrow_start's, from the total
    by the tree's top levels; then pass k - 1's decision from its SPLIT subtree sums), then, while it
    holds more than one key, pass k's lane sums as subtrees into part[k % 2]; program 0 keeps the
    bracket in state[k % 2] and the total. PHASE 2 (one program a row): the last decision, the cut. By
    parity, a launch reads what the one before it wrote and never what it writes itself; a bracket of
    one key stays, so the launches after it end after a few loads (one program a row's passes)."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    base = x_ptr + row * stride_t
    lanes = s * (CHUNK // SPLIT) + tl.arange(0, CHUNK // SPLIT)
    if PHASE == 0:
        tl.store(part_max_ptr + row * SPLIT + s, _lane_max(base, lanes, V, CHUNK, UNROLL, STAGES))
        return
    m = tl.max(tl.load(part_max_ptr + row * SPLIT + tl.arange(0, SPLIT)), 0)
    rows = tl.num_programs(0)
    if step == 0:
        tl.store(part_ptr + row * 4 * SPLIT + s,
                 _tree_sum(_lane_total(base, lanes, V, m, CHUNK, UNROLL, COUNT, STAGES, ASM), LOG_L))
        return
    prev = part_ptr + (((step - 1) % 2 * rows + row) * 4) * SPLIT + tl.arange(0, SPLIT)  # [total, above v1..v3]
    if step == 1:
        total = _tree_sum(tl.load(prev), LOG_S)
        lo, hi = _narrow_start(m, total, level, V, COUNT)
        if (PHASE == 1) & (s == 0):
            tl.store(total_ptr + row, total)
    else:
        total = tl.load(total_ptr + row)
        lo = tl.load(state_ptr + row * 4 + (step - 1) % 2 * 2)
        hi = tl.load(state_ptr + row * 4 + (step - 1) % 2 * 2 + 1)
        if hi - lo > 1:
            q1, q2, q3, _, _, _ = _cut_points(lo, hi)
            lo, hi = _narrow(lo, hi, q1, q2, q3, _tree_sum(tl.load(prev + SPLIT), LOG_S),
                             _tree_sum(tl.load(prev + 2 * SPLIT), LOG_S),
                             _tree_sum(tl.load(prev + 3 * SPLIT), LOG_S), _target(level, total, COUNT))
    if PHASE == 2:
        tl.store(cut_ptr + row, _cut(hi, total, level, COUNT))
    else:
        if s == 0:
            tl.store(state_ptr + row * 4 + step % 2 * 2, lo)
            tl.store(state_ptr + row * 4 + step % 2 * 2 + 1, hi)
        if hi - lo > 1:
            _, _, _, v1, v2, v3 = _cut_points(lo, hi)
            a1, a2, a3 = _lane_masses(base, lanes, V, m, v1, v2, v3, CHUNK, UNROLL, COUNT, STAGES, ASM)
            out = part_ptr + ((step % 2 * rows + row) * 4) * SPLIT + s
            tl.store(out + SPLIT, _tree_sum(a1, LOG_L))
            tl.store(out + 2 * SPLIT, _tree_sum(a2, LOG_L))
            tl.store(out + 3 * SPLIT, _tree_sum(a3, LOG_L))


# (from rows, num_warps, chunks a loop step, programs a row, stages[, snap]) of the cut: the last entry whose rows <=
# T. stages > 1: the lane loops' loads run that many chunk steps ahead (tl.range's pipeline, through shared memory).
# snap 1 (one program a row only): each pass's bracket pulled in to the tokens nearest its cut points (_snap; CPU
# count on filter.py's lm rows: top-p 0.9 / 0.95 12 -> 2.6-4.0 passes, top-k 16 -> 6), six more min / max a token, 126
# registers a thread (16 warps; 32 spill): written in the fortieth session, not yet timed, so no entry snaps. Same
# bits in every launch. H200 (thirty-ninth run, filter.py --cut-only --logits lm, top-p 0.9, 64 / 1,024 / 4,096 rows,
# the narrowed search): 32 warps, 4 chunks 0.337 / 4.396 / 17.09 ms; with 2 stages 0.394 / 4.054 / 15.97; 2 chunks, 3
# stages 0.407 / 4.106 / 16.16; 1 chunk, 4 stages 0.437 / 4.297 / 16.93 (the search before the narrowed start, 32
# warps, 4 chunks: 0.402 / 5.206 / 20.32). One read each. H100 (thirty-eighth run): 32 warps, 4 chunks 1.03-1.47x 8
# warps; 4 programs a row no faster. H100 (fortieth run, lane loops in PTX): 1 / 2 stages 0.341 / 0.367 ms at 64 rows,
# 0.687 / 0.641 at 128, 1.341 / 1.254 at 256, 5.166 / 4.886 at 1,024 (before the PTX, 256 / 512 rows: 1.38 / 2.70 vs
# 1.29 / 2.54): 2 from 128. H100 (forty-first run, snapped brackets, top-p 0.9 / top-k 20 by the cut): 32 warps, 4
# chunks, 1 stage 0.251 / 0.455 / 0.848 / 3.08 / 11.97 ms at 64 / 128 / 256 / 1,024 / 4,096 rows against the unsnapped
# 2-stage launch's 0.342 / 0.641 / 1.255 / 4.89 / 19.38 (passes 12 -> 2.4); 16 warps 2 stages 0.276-12.70, 8 warps
# slower; two and four programs a row 1.04-1.9x slower than one.
CUT_LAUNCH = ((0, 32, 4, 1, 1, 1),)


def _launch(T: int) -> tuple[int, int, int, int, bool]:
    """(num_warps, UNROLL, SPLIT, STAGES, SNAP) of the cut for T rows (CUT_LAUNCH; SNAP off where an
    entry has five fields)."""
    pick = CUT_LAUNCH[0]
    for entry in CUT_LAUNCH:
        if T >= entry[0]:
            pick = entry
    rows, num_warps, unroll, split, stages, *snap = pick
    return num_warps, unroll, split, stages, bool(snap and snap[0])


def _asm(x_TV: torch.Tensor) -> bool:
    """Whether the lane loops run ASM's PTX: on an NVIDIA GPU, outside the interpreter."""
    return (ASM and x_TV.is_cuda and torch.version.hip is None
            and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


def _floor(x_TV: torch.Tensor, level: float, count: bool, passes_T: torch.Tensor | None = None) -> torch.Tensor:
    """The cut of each row (passes_T, int32 [T]: the passes each row's search took, one program a row)."""
    x_TV = x_TV.contiguous()
    T, V = x_TV.shape
    cut_T = torch.empty(T, dtype=torch.float32, device=x_TV.device)
    if T == 0:
        return cut_T
    num_warps, unroll, split, stages, snap = _launch(T)
    log = CHUNK.bit_length() - 1
    asm = _asm(x_TV)
    if snap and split != 1:
        raise ValueError(f"miles_kernels filter cut: CUT_LAUNCH snaps with {split} programs a row: snapping "
                         "runs in one program a row (programs a row 1)")
    if split == 1:
        _cut_kernel[(T,)](x_TV, cut_T, passes_T if passes_T is not None else cut_T, V, x_TV.stride(0),
                          float(level), CHUNK=CHUNK, LOG=log, UNROLL=unroll, COUNT=count,
                          PASSES_OUT=passes_T is not None, STAGES=stages, ASM=asm, SNAP=snap, num_warps=num_warps)
        return cut_T
    if split & (split - 1) or not 1 < split <= CHUNK:
        raise ValueError(f"miles_kernels filter cut: {split} programs a row: want a power of two up to {CHUNK}")
    dev = x_TV.device
    part_max = torch.empty((T, split), dtype=torch.float32, device=dev)
    part = torch.empty((2, T, 4, split), dtype=torch.float32, device=dev)
    state = torch.empty((T, 4), dtype=torch.int64, device=dev)  # the bracket (lo, hi] by parity
    total = torch.empty(T, dtype=torch.float32, device=dev)
    log_s = split.bit_length() - 1
    consts = dict(CHUNK=CHUNK, SPLIT=split, LOG_L=log - log_s, LOG_S=log_s, UNROLL=unroll, COUNT=count,
                  STAGES=stages, ASM=asm, num_warps=num_warps)
    args = (x_TV, part_max, part, state, total, cut_T, V, x_TV.stride(0), float(level))
    _cut_pass_kernel[(T, split)](*args, 0, PHASE=0, **consts)
    for step in range(PASSES + 1):  # the total, then PASSES passes (a bracket of one key: launches that end)
        _cut_pass_kernel[(T, split)](*args, step, PHASE=1, **consts)
    _cut_pass_kernel[(T, 1)](*args, PASSES + 1, PHASE=2, **consts)
    return cut_T


def top_p_cutoff(x_TV: torch.Tensor, top_p: float, passes_T: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of fp32 x (temperature-scaled, top-k already masked), the smallest value a
    top-p filter keeps: keep x >= cut (see the module). passes_T: see _floor."""
    return _floor(x_TV, top_p, False, passes_T)


def top_k_floor(x_TV: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of fp32 x the k-th largest value (torch.topk(x, k).values[:, -1], ties counted; -inf
    where fewer than k are finite): the smallest v with fewer than k values above it, by the same
    search with counts for masses (exact, so any order gives it). 1 <= k < 2**24."""
    if not 1 <= k < 1 << 24:
        raise ValueError(f"miles_kernels top_k_floor: k={k}: want 1 <= k < 2**24 (counts are exact in fp32)")
    return _floor(x_TV, k, True)
