"""miles_kernels matmuls on a real GPU: linear (every tile, pointer and TMA kernels), linears,
swiglu, grouped_linear (tiles, Gluon, gradients) and the MoE combine: bitwise invariance and accuracy.
In a file of their own so that a fresh machine compiles them beside test_kernels_gpu.py's kernels
(tools/gpu_checks.sh runs a pytest process a file, all at once).

Run on a CUDA machine (triton >= 3.6):  python -m pytest -q tests/gpu/test_matmul_gpu.py
"""

import pytest
import torch
from kernel_asserts import DTYPES, _accurate, _gen, _randn, _same

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def kt():
    from miles_kernels import _triton

    return _triton


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_linear_every_tile_agrees(kt, dtype):
    """Rows computed with each tile linear may pick (LINEAR_TILES, SMALL_M_TILES, MID_M_TILES), on the
    pointer and on the persistent TMA kernel, are bitwise equal to the same rows from linear
    at M = 4096; linear itself at M sizes crossing every bucket too."""
    from miles_kernels._triton import matmul as lin

    g = _gen(0)
    K, N, M = 2056, 3000, 4096  # not tile multiples; 16-byte aligned rows (TMA)
    x = _randn(M, K, dtype=dtype, g=g)
    w = _randn(N, K, dtype=dtype, g=g, scale=K**-0.5)
    b = _randn(N, dtype=dtype, g=g)
    y_full = kt.linear(x, w, b)
    _accurate(y_full, x.double() @ w.double().T + b.double(), dtype, "linear vs float64")
    for tile in lin.all_linear_tiles(dtype):
        # and the 64-row pointer tiles with one and two BLOCK_K steps an iteration (K: pairs, then a tail)
        unrolled = tuple(tile._replace(tma=False, k_unroll=u) for u in (1, 2) if u != tile.k_unroll)
        for t in (tile._replace(tma=False), tile._replace(tma=True), *(unrolled if tile.block_m == 64 else ())):
            for start, m in ((0, 1), (5, 64), (100, 300), (0, M)):
                y = torch.empty(m, N, dtype=dtype, device="cuda")
                lin._launch_linear(x[start : start + m], w, b, y, t)
                _same(y, y_full[start : start + m], f"tile {t} rows {start}:{start + m} vs linear at M={M}")
    for m in (1, 3, 64, 65, 128, 256, 512, 513, 2048, 2049):
        for n in (64, 1024, N):
            tile = lin.linear_tile(m, dtype, n, x.device)
            _same(kt.linear(x[7 : 7 + m], w[:n], b[:n]), y_full[7 : 7 + m, :n],
                  f"linear M={m} N={n} (tile {tile}) vs M={M}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linears_equal_linear(kt, monkeypatch, dtype):
    """linears (one launch at M <= SMALL_M) gives each weight linear's bits: 0.6B q/k/v with
    biases, gate/up shapes and widths that end in part tiles, M across the small-M range (partial
    row tiles too) and past it, with the 128-row tiles by TMA (the default) and by pointers, and by TMA with
    the outputs stored by TMA (fused_linears.TMA_STORE)."""
    from miles_kernels._triton import fused_linears

    g = _gen(3)
    K = 1024
    x = _randn(600, K, dtype=dtype, g=g)
    for by_tma, store in ((True, False), (False, False), (True, True)):
        monkeypatch.setattr(fused_linears, "SMALL_M_TMA", by_tma)
        monkeypatch.setattr(fused_linears, "TMA_STORE", store)
        for ns, bias in (((2048, 1024, 1024), True), ((3072, 3072), False), ((1000, 520, 136), True)):
            ws = tuple(_randn(n, K, dtype=dtype, g=g, scale=K**-0.5) for n in ns)
            bs = tuple(_randn(n, dtype=dtype, g=g) for n in ns) if bias else None
            for m in (1, 5, 64, 128, 256, 300, 512, 513):
                ys = kt.linears(x[:m], ws, bs)
                for i, (y, w) in enumerate(zip(ys, ws)):
                    _same(y, kt.linear(x[:m], w, None if bs is None else bs[i]),
                          f"linears output {i}, M={m}, N={ns}, TMA {by_tma}, TMA store {store}")
    assert fused_linears._linears_tma_kernel.kernels, "the TMA linears kernel never ran"


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_linear_rows_independent(kt, dtype):
    g = _gen(1)
    E, N, K = 8, 768, 512
    sizes = torch.tensor([0, 5, 130, 1, 64, 0, 300, 12])
    x = _randn(int(sizes.sum()), K, dtype=dtype, g=g)
    w = _randn(E, N, K, dtype=dtype, g=g, scale=K**-0.5)
    offs = torch.zeros(E + 1, dtype=torch.int32)
    offs[1:] = sizes.cumsum(0)
    y = kt.grouped_linear(x, w, offs.cuda())
    o = offs.tolist()
    ref = torch.cat([x[o[e] : o[e + 1]].double() @ w[e].double().T for e in range(E)])
    _accurate(y, ref, dtype, "grouped_linear vs float64")
    row = kt.grouped_linear(x[o[6] + 7 : o[6] + 8], w, torch.tensor([0] * 7 + [1, 1], dtype=torch.int32).cuda())
    _same(row[0], y[o[6] + 7], "grouped_linear row alone vs in its expert group")
    from miles_kernels._triton import matmul

    for tile in matmul.GROUPED_TILES[dtype]:  # each tile grouped_tile may pick, both kernels: the same bits
        for t in (tile._replace(tma=False), tile._replace(tma=True)):
            got = torch.zeros_like(y)
            matmul.launch_grouped(x, w, offs.cuda(), got, t)
            _same(got, y, f"grouped_linear tile {tuple(t)[1:]} vs grouped_linear's pick")


# one small launch of gluon_grouped's kernel (an expert's tail in each half, a box past x's rows)
_GLUON_GROUPED_PROBE = """
import torch
from miles_kernels._triton import matmul
matmul.GLUON_GROUPED = True
x = torch.randn(300, 128, device="cuda", dtype=torch.bfloat16)
w = torch.randn(3, 256, 128, device="cuda", dtype=torch.bfloat16)
offs = torch.tensor([0, 129, 193, 290], dtype=torch.int32, device="cuda")
y = torch.zeros(300, 256, device="cuda", dtype=torch.bfloat16)
matmul.launch_grouped(x, w, offs, y, matmul.grouped_tile(300, 3, torch.bfloat16, 256)._replace(tma=True))
torch.cuda.synchronize()
"""


def _launches_in_a_child(code: str, what: str, timeout_s: float = 180.0) -> None:
    """Run code in a child process first: a kernel that never ends (a barrier protocol gone wrong)
    fails the test there, killed, instead of holding this process and the GPU."""
    import os
    import subprocess
    import sys

    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s,
                           env=os.environ.copy())
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not finish in {timeout_s:.0f} s in a child process (killed): a hang")
    assert r.returncode == 0, f"{what} failed in a child process:\n{r.stderr[-3000:]}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gluon_grouped_equals_triton(dtype, monkeypatch):
    """matmul.GLUON_GROUPED: gluon_grouped's kernel gives the Triton TMA kernel's bits for every
    row it stores and leaves the rest untouched: experts of 0, 1, 63, 64, 65, 127, 128, 129 and
    ~288 rows (tails in either half), rows outside the groups, N a multiple of 256 / 128 / neither,
    K not a multiple of 64, each ring depth, and in a CUDA graph."""
    from miles_kernels._triton import gluon_grouped as GG
    from miles_kernels._triton import matmul

    if not GG.supported(torch.empty(1, 8, dtype=dtype, device="cuda"), torch.empty(1, 8, 8, dtype=dtype, device="cuda"),
                        128, 256, 64):
        pytest.skip("gluon_grouped runs on sm_90 only")
    _launches_in_a_child(_GLUON_GROUPED_PROBE, "gluon_grouped's kernel")
    g = _gen(7)
    cases = [  # (N, K, rows an expert, rows before the first expert)
        (1536, 2048, [288] * 6 + [0, 1, 63, 64, 65, 127, 128, 129, 300, 955], 0),
        (384, 1024, [570, 512, 0, 3, 64, 200], 5),
        (1000, 104, [129, 64, 65, 1], 0),
    ]
    for N, K, sizes, lead in cases:
        E = len(sizes)
        x = _randn(lead + sum(sizes) + 7, K, dtype=dtype, g=g)
        w = _randn(E, N, K, dtype=dtype, g=g, scale=K**-0.5)
        offs = torch.tensor([lead] + [lead + sum(sizes[: i + 1]) for i in range(E)], dtype=torch.int32, device="cuda")
        tile = matmul.grouped_tile(x.shape[0], E, dtype, N)._replace(tma=True)
        monkeypatch.setattr(matmul, "GLUON_GROUPED", False)
        ref = torch.full((x.shape[0], N), 7.0, dtype=dtype, device="cuda")
        matmul.launch_grouped(x, w, offs, ref, tile)
        monkeypatch.setattr(matmul, "GLUON_GROUPED", True)
        for stages in (2, 3, 4):
            monkeypatch.setattr(GG, "STAGES", stages)
            got = torch.full_like(ref, 7.0)
            matmul.launch_grouped(x, w, offs, got, tile)
            _same(got, ref, f"gluon grouped N={N} K={K} stages={stages} vs the Triton kernel")
        got = torch.full_like(ref, 7.0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            matmul.launch_grouped(x, w, offs, got, tile)
        graph.replay()
        _same(got, ref, f"gluon grouped N={N} K={K} in a CUDA graph")
        assert (got[:lead] == 7.0).all() and (got[offs[-1].item():] == 7.0).all(), "rows outside the groups written"


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_combine_at_scale(dtype):
    """mk.moe_combine at a training step's size (4,096 tokens, top-8, D 1024) and a decode
    step's: close to float64, a token's row the same alone, in 64 tokens and in 4,096; grads
    (the Triton backward kernels), and mk.moe_dispatch's rows and grad."""
    import miles_kernels as mk

    g = _gen(7)
    T, k, D = 4096, 8, 1024
    pos = torch.randperm(T * k, generator=g, device="cuda").view(T, k)
    y = _randn(T * k, D, dtype=dtype, g=g).requires_grad_(True)
    w = torch.softmax(torch.randn(T, k, generator=g, device="cuda"), -1).requires_grad_(True)
    out = mk.moe_combine(y, pos, w)
    _accurate(out, (y.double()[pos] * w.double()[:, :, None]).sum(1), dtype, "moe_combine vs float64")
    with torch.no_grad():
        rows = pos[100:164].reshape(-1)
        few = mk.moe_combine(y[rows], torch.arange(64 * k, device="cuda").view(64, k), w[100:164])
        _same(few, out[100:164].detach(), "moe_combine 64 tokens vs 4096")
        one = mk.moe_combine(y[pos[3000]], torch.arange(k, device="cuda")[None], w[3000:3001])
        _same(one[0], out[3000].detach(), "moe_combine one token vs 4096")
    gout = _randn(T, D, dtype=dtype, g=g)
    ry, rw = torch.autograd.grad((y.double()[pos] * w.double()[:, :, None]).sum(1), (y, w), gout.double())
    from miles_kernels import _grads

    default = _grads.MOE_BWD
    for bwd in ("torch", "triton"):  # MILES_MOE_BWD's two backwards
        _grads.MOE_BWD = bwd
        try:
            gy, gw = torch.autograd.grad(mk.moe_combine(y, pos, w), (y, w), gout)
            _accurate(gy, ry, dtype, f"moe_combine grad y ({bwd})")
            _accurate(gw, rw, dtype, f"moe_combine grad w ({bwd})")
            order = torch.empty_like(pos.reshape(-1))  # the inverse of pos: the rows in expert order
            order[pos.reshape(-1)] = torch.arange(T * k, device="cuda")
            x = _randn(T, D, dtype=dtype, g=g).requires_grad_(True)
            xr = mk.moe_dispatch(x, order, pos)
            _same(xr.detach(), x.detach()[order // k], "moe_dispatch rows")
            (gx,) = torch.autograd.grad(xr, x, gy)
            _accurate(gx, gy.double()[pos].sum(1), dtype, f"moe_dispatch grad ({bwd})")
        finally:
            _grads.MOE_BWD = default


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_linear_grads(dtype):
    """mk.grouped_linear's backward (torch's grouped GEMM: no host sync) vs float64 per expert,
    64 experts with empty groups, MoE-shaped."""
    import miles_kernels as mk

    g = _gen(5)
    E, N, K = 64, 256, 512
    sizes = torch.randint(0, 40, (E,), generator=torch.Generator().manual_seed(5))
    sizes[::7] = 0
    x = _randn(int(sizes.sum()), K, dtype=dtype, g=g).requires_grad_(True)
    w = _randn(E, N, K, dtype=dtype, g=g, scale=K**-0.5).requires_grad_(True)
    gy = _randn(x.shape[0], N, dtype=dtype, g=g)
    gx, gw = torch.autograd.grad(mk.grouped_linear(x, w, sizes.cuda()), (x, w), gy)
    o = [0, *sizes.cumsum(0).tolist()]
    rx = torch.cat([gy[o[e]: o[e + 1]].double() @ w[e].double() for e in range(E)])
    rw = torch.stack([gy[o[e]: o[e + 1]].double().T @ x[o[e]: o[e + 1]].double() for e in range(E)])
    _accurate(gx, rx, dtype, "grouped_linear grad x")
    _accurate(gw, rw, dtype, "grouped_linear grad w")
    assert not gw[sizes.cuda() == 0].any(), "an expert without rows got a gradient"
    with mk.use_mode("fast"):  # torch's grouped GEMM forward in bf16 (no per-expert host loop), else the loop
        y = mk.grouped_linear(x, w, sizes.cuda())
        _accurate(y, torch.cat([x[o[e]: o[e + 1]].double() @ w[e].double().T for e in range(E)]), dtype,
                  "fast grouped_linear")
        fx, fw = torch.autograd.grad(y, (x, w), gy)
        _accurate(fx, rx, dtype, "fast grouped_linear grad x")
        _accurate(fw, rw, dtype, "fast grouped_linear grad w")


def test_fast_mode_linears(kt):
    """Fast mode's linears: the fused kernel (invariant mode's bits) at decode sizes without
    autograd; cuBLAS (F.linear's bits) above SMALL_M and under autograd."""
    import miles_kernels as mk
    from miles_kernels import _ref

    g = _gen(8)
    ws = tuple(_randn(n, 1024, dtype=torch.bfloat16, g=g, scale=1024**-0.5) for n in (2048, 1024, 1024))
    for m in (64, 512, 600):
        x = _randn(m, 1024, dtype=torch.bfloat16, g=g)
        with mk.use_mode("fast"):
            got = mk.linears(x, ws)
        want = mk.linears(x, ws) if m <= kt.matmul.SMALL_M else tuple(_ref.linear(x, w) for w in ws)
        for i in range(3):
            _same(got[i], want[i], f"fast-mode linears output {i}, M={m}")
    x = _randn(64, 1024, dtype=torch.bfloat16, g=g).requires_grad_(True)
    with mk.use_mode("fast"):
        got = mk.linears(x, ws)
    _same(got[0].detach(), _ref.linear(x.detach(), ws[0]), "fast-mode linears under autograd: cuBLAS")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_swiglu_is_silu_mul_of_linears(kt, monkeypatch, dtype):
    """The swiglu kernel (gate/up products and silu_mul in one launch at M <= SMALL_M) gives
    silu_mul(*linears(...))'s bits on the 0.6B and 8B MLP shapes at every M the decode and
    short prefill chunks bring, in both modes, and a row's bits alone equal its bits in a batch;
    the 128-row tiles by TMA (the default) and by pointers."""
    import miles_kernels as mk
    from miles_kernels._triton import fused_linears

    g = _gen(13)
    monkeypatch.setattr(fused_linears, "SMALL_M_TMA", True)
    for F, K in ((3072, 1024), (12288, 4096)):
        wg = _randn(F, K, dtype=dtype, g=g, scale=K**-0.5)
        wu = _randn(F, K, dtype=dtype, g=g, scale=K**-0.5)
        x = _randn(kt.matmul.SMALL_M, K, dtype=dtype, g=g)
        wants = {}
        for m in (1, 7, 64, 65, 128, 256, 300, 512):
            want = wants[m] = mk.silu_mul(*mk.linears(x[:m], (wg, wu)))
            _same(kt.swiglu(x[:m], wg, wu), want, f"swiglu kernel F={F} M={m}")
            for mode in ("invariant", "fast"):
                with mk.use_mode(mode):
                    _same(mk.swiglu(x[:m], wg, wu), want, f"mk.swiglu ({mode}) F={F} M={m}")
        _same(kt.swiglu(x[5:6], wg, wu), kt.swiglu(x, wg, wu)[5:6], f"swiglu row alone vs in {len(x)} rows")
        monkeypatch.setattr(fused_linears, "SMALL_M_TMA", False)  # the 128-row tiles by pointers: the same bits
        for m in (128, 300, 512):
            _same(kt.swiglu(x[:m], wg, wu), wants[m], f"swiglu by pointers M={m} vs by TMA")
        monkeypatch.setattr(fused_linears, "SMALL_M_TMA", True)
    assert fused_linears._swiglu_kernel.kernels and fused_linears._swiglu_tma_kernel.kernels, \
        "the swiglu kernels (pointer and TMA) did not both run"


@pytest.mark.parametrize("unroll", [2, 4])
def test_unrolled_small_m_tiles_same_bits(kt, monkeypatch, unroll):
    """The small-M pointer tiles with `unroll` BLOCK_K steps a loop iteration (Tile.k_unroll)
    give linear's, linears' and swiglu's bits of the same tiles at one step an iteration: 0.6B
    and 8B decode shapes (K a multiple of the unrolled step or not), M across the small-M range."""
    lin = kt.matmul
    dtype = torch.bfloat16
    one_step = tuple(t._replace(k_unroll=1) for t in lin.SMALL_M_TILES[dtype])
    monkeypatch.setitem(lin.SMALL_M_TILES, dtype, one_step)
    g = _gen(14)
    shapes = ((1024, 2048), (1024, 3072), (2048, 1024), (4096, 4096), (4096, 12288), (1000, 1088))
    xs = {K: _randn(lin.SMALL_M, K, dtype=dtype, g=g) for K in {k for _, k in shapes}}
    ws = {(N, K): _randn(N, K, dtype=dtype, g=g, scale=K**-0.5) for N, K in shapes}
    ms = (1, 64, 65, 256, 512)
    want = {(N, K, m): kt.linear(xs[K][:m], ws[N, K]) for N, K in shapes for m in ms}
    glu = {(K, m): kt.swiglu(xs[K][:m], ws[N, K], ws[N, K].flip(0)) for N, K in shapes[:3] for m in ms}
    qkv = {m: kt.linears(xs[1024][:m], (ws[2048, 1024], ws[1024, 2048][:, :1024].contiguous())) for m in ms}
    tiles = tuple(t._replace(k_unroll=unroll, num_stages=max(2, t.num_stages * 2 // unroll)) if not t.tma else t
                  for t in one_step)
    monkeypatch.setitem(lin.SMALL_M_TILES, dtype, tiles)
    for (N, K, m), y in want.items():
        _same(kt.linear(xs[K][:m], ws[N, K]), y, f"linear N={N} K={K} M={m}, unroll {unroll}")
    for N, K in shapes[:3]:
        for m in ms:
            _same(kt.swiglu(xs[K][:m], ws[N, K], ws[N, K].flip(0)), glu[K, m], f"swiglu K={K} M={m}, unroll {unroll}")
    for m, ys in qkv.items():
        for a, b in zip(kt.linears(xs[1024][:m], (ws[2048, 1024], ws[1024, 2048][:, :1024].contiguous())), ys):
            _same(a, b, f"linears M={m}, unroll {unroll}")
