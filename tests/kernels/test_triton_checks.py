"""Checks of miles_kernels._triton, run by test_triton_interp.py in a TRITON_INTERPRET=1 child.

Importing this module must not import triton (the parent pytest process imports it to
list CHECKS). Each check raises AssertionError with a message on failure; references are
float64 torch. No test_ functions here: pytest collects nothing from this file.
"""

import contextlib
import sys

import torch

TOL = dict(atol=2e-5, rtol=2e-5)


def _kt():
    from miles_kernels import _triton

    return _triton


def _close(got: torch.Tensor, ref: torch.Tensor, what: str, atol=TOL["atol"], rtol=TOL["rtol"]) -> None:
    err = (got.double() - ref.double()).abs().max().item() if got.numel() else 0.0
    assert torch.allclose(got.double(), ref.double(), atol=atol, rtol=rtol), f"{what}: max abs err {err}"


def _bench_module(name: str):
    """tools/bench/NAME.py, loaded as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert torch.equal(a, b), f"{what}: not bitwise equal (max diff {(a.double() - b.double()).abs().max().item()})"


def check_linear() -> None:
    kt = _kt()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 72, generator=g)  # K not a multiple of BLOCK_K, M not of BLOCK_M
    w = torch.randn(81, 72, generator=g)
    b = torch.randn(81, generator=g)
    y = kt.linear(x, w, b)
    _close(y, x.double() @ w.double().T + b.double(), "linear with bias", atol=1e-4)
    _close(kt.linear(x, w), x.double() @ w.double().T, "linear without bias", atol=1e-4)
    assert y.dtype == torch.float32 and y.shape == (37, 81)
    for i in (0, 17, 36):
        _same(kt.linear(x[i : i + 1], w, b)[0], y[i], f"linear row {i} alone vs in batch of 37")
    _same(kt.linear(x[5:29], w, b), y[5:29], "linear rows 5:29 vs in batch")


def check_linear_tile_buckets() -> None:
    """Different M buckets (tile shapes, grouped order) must give bitwise equal rows."""
    from miles_kernels._triton import matmul as lin

    saved = lin.LINEAR_TILES[torch.float32]
    lin.LINEAR_TILES[torch.float32] = (
        lin.Tile(2, 16, 16, 32, 1, 4, 2),
        lin.Tile(8, 16, 64, 32, 2, 4, 2, k_unroll=2),  # K = 96: one pair of steps, then one step
        lin.Tile(1 << 62, 32, 32, 32, 4, 4, 2, k_unroll=3),  # three steps, no rest
    )
    try:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(40, 96, generator=g)
        w = torch.randn(70, 96, generator=g)
        y = lin.linear(x, w)
        _close(y, x.double() @ w.double().T, "bucketed linear", atol=1e-4)
        for rows in (slice(3, 4), slice(10, 12), slice(0, 8), slice(20, 40)):
            _same(lin.linear(x[rows], w), y[rows], f"linear rows {rows} in another bucket")
    finally:
        lin.LINEAR_TILES[torch.float32] = saved
    try:
        lin.linear_tile(4, torch.int32)
    except TypeError as e:
        assert "dtype" in str(e)
    else:
        raise AssertionError("linear_tile accepted int32")


def check_linear_tma_buckets() -> None:
    """The persistent TMA kernel (tile.tma): accurate, rows invariant across its buckets, and a
    misaligned tensor falls back to the pointer kernel, and TMA and pointer kernels with the
    same K walk give the same bits (the harness's dot sums K in a fixed order)."""
    from miles_kernels._triton import matmul as lin

    saved = lin.LINEAR_TILES[torch.float32]
    lin.LINEAR_TILES[torch.float32] = (
        lin.Tile(2, 16, 16, 32, 1, 4, 2, True),
        lin.Tile(8, 16, 32, 32, 2, 4, 2, True),
        lin.Tile(1 << 62, 32, 16, 32, 2, 4, 2, True),
    )
    try:
        g = torch.Generator().manual_seed(9)
        x = torch.randn(40, 96, generator=g)
        w = torch.randn(72, 96, generator=g)  # 72 * 4 bytes: 16-byte aligned rows
        b = torch.randn(72, generator=g)
        y = lin.linear(x, w, b)
        _close(y, x.double() @ w.double().T + b.double(), "tma linear", atol=1e-4)
        for rows in (slice(4, 5), slice(8, 12), slice(0, 8), slice(20, 40)):
            _same(lin.linear(x[rows], w, b), y[rows], f"tma linear rows {rows} in another bucket")
        w70 = w[:70].contiguous()  # 280-byte rows: not TMA-aligned, pointer fallback
        _close(lin.linear(x, w70), x.double() @ w70.double().T, "tma tile, misaligned fallback", atol=1e-4)
        lin.LINEAR_TILES[torch.float32] = tuple(t._replace(tma=False) for t in lin.LINEAR_TILES[torch.float32])
        _same(lin.linear(x, w, b), y, "pointer kernel vs tma kernel, same tiles")
    finally:
        lin.LINEAR_TILES[torch.float32] = saved


def check_linears() -> None:
    """linears (q/k/v, gate/up in one launch at small M): each output has linear's bits, with and
    without biases, 2 and 3 weights, whichever small-M tile the summed N picks, by pointers and
    (TMA tiles) by TMA in a persistent grid, its stores by pointers and by TMA (TMA_STORE); a misaligned x
    falls back to pointers."""
    from miles_kernels._triton import fused_linears as fl
    from miles_kernels._triton import matmul as lin

    saved, saved_tma, saved_store = dict(lin.SMALL_M_TILES), fl.SMALL_M_TMA, fl.TMA_STORE
    fl.SMALL_M_TMA = True  # the TMA tiles below by TMA
    g = torch.Generator().manual_seed(11)
    x = torch.randn(37, 72, generator=g)
    ws = [torch.randn(n, 72, generator=g) for n in (40, 24, 24)]
    bs = [torch.randn(w.shape[0], generator=g) for w in ws]
    try:
        tma = ((lin.Tile(64, 16, 16, 32, 1, 4, 2, True),),  # 3 row tiles x 6 column tiles on 4 programs
               (lin.Tile(64, 32, 32, 32, 1, 4, 2, True), lin.Tile(64, 16, 16, 32, 1, 4, 2)))
        for tiles, store in (((lin.Tile(64, 16, 16, 32, 1, 4, 2),), False),
                             ((lin.Tile(64, 32, 32, 32, 1, 4, 2), lin.Tile(64, 16, 16, 32, 1, 4, 2)), False),
                             ((lin.Tile(64, 16, 16, 32, 1, 4, 2, k_unroll=2),), False),  # K = 72: a pair, the tail
                             *((t, store) for t in tma for store in (False, True))):
            lin.SMALL_M_TILES[torch.float32], fl.TMA_STORE = tiles, store
            for k in (2, 3):
                for with_b in (False, True):
                    b = bs[:k] if with_b else None
                    ys = fl.linears(x, tuple(ws[:k]), None if b is None else tuple(b))
                    assert len(ys) == k
                    for i in range(k):
                        _same(ys[i], lin.linear(x, ws[i], None if b is None else b[i]),
                              f"linears output {i} of {k} (bias {with_b}, tiles {tiles}, TMA store {store}) vs linear")
                    _same(fl.linears(x[3:4], tuple(ws[:k]))[k - 1], fl.linears(x, tuple(ws[:k]))[k - 1][3:4],
                          "linears row 3 alone vs in batch")
        fl.TMA_STORE = True  # an output of 22 columns (88-byte rows): the TMA kernel stores by pointers
        lin.SMALL_M_TILES[torch.float32] = tma[0]
        w22 = ws[2][:22].contiguous()
        for y, w in zip(fl.linears(x, (ws[0], ws[1], w22)), (ws[0], ws[1], w22)):
            _same(y, lin.linear(x, w), "linears with an output of 22 columns (TMA store asked) vs linear")
        x70, ws70 = x[:, :70].contiguous(), [w[:, :70].contiguous() for w in ws]  # 280-byte rows: pointers
        for y, w in zip(fl.linears(x70, tuple(ws70)), ws70):
            _same(y, lin.linear(x70, w), "linears with misaligned rows (TMA tile, pointer fallback) vs linear")
    finally:
        lin.SMALL_M_TILES.clear()
        lin.SMALL_M_TILES.update(saved)
        fl.SMALL_M_TMA, fl.TMA_STORE = saved_tma, saved_store
    try:
        fl.linears(x, (ws[0], torch.randn(5, 71)))
    except ValueError as e:
        assert "K=72" in str(e)
    else:
        raise AssertionError("linears accepted weights of different K")


def check_swiglu() -> None:
    """swiglu (gate/up products and silu_mul in one launch at small M) has the bits of silu_mul
    over linears' outputs, whichever small-M tile 2F picks (its width halved a weight), by pointers
    and by TMA; a row's bits do not depend on the batch; shapes it cannot take are refused."""
    from miles_kernels._triton import fused_linears as fl
    from miles_kernels._triton import matmul as lin

    kt = _kt()
    saved, saved_tma = dict(lin.SMALL_M_TILES), fl.SMALL_M_TMA
    fl.SMALL_M_TMA = True  # the TMA tile below by TMA
    g = torch.Generator().manual_seed(12)
    x = torch.randn(37, 72, generator=g)
    wg, wu = torch.randn(40, 72, generator=g), torch.randn(40, 72, generator=g)
    try:
        for tiles in ((lin.Tile(64, 16, 32, 32, 1, 4, 2),), (lin.Tile(64, 32, 64, 32, 1, 4, 2), lin.Tile(64, 16, 32, 32, 1, 4, 2)),
                      (lin.Tile(64, 16, 32, 32, 1, 4, 2, k_unroll=2),),  # K = 72: a pair of steps, then the tail
                      (lin.Tile(64, 16, 32, 32, 1, 4, 2, True),)):  # by TMA: 3 x 3 tiles on 4 programs
            lin.SMALL_M_TILES[torch.float32] = tuple(t._replace(k_unroll=1, tma=False) for t in tiles)
            ref = kt.silu_mul(*fl.linears(x, (wg, wu)))
            lin.SMALL_M_TILES[torch.float32] = tiles
            y = fl.swiglu(x, wg, wu)
            _same(y, ref, f"swiglu (tiles {tiles}) vs silu_mul(linears)")
            _same(fl.swiglu(x[3:4], wg, wu), y[3:4], "swiglu row 3 alone vs in batch")
        for bad, what in (((x, wg, wu[:, :71]), "K=72"), ((x.repeat(14, 1), wg, wu), "M <= ")):
            try:
                fl.swiglu(*bad)
            except ValueError as e:
                assert what in str(e), str(e)
            else:
                raise AssertionError(f"swiglu accepted {[list(t.shape) for t in bad]}")
    finally:
        lin.SMALL_M_TILES.clear()
        lin.SMALL_M_TILES.update(saved)
        fl.SMALL_M_TMA = saved_tma


def check_streamk() -> None:
    """Stream-K (streamk.py; MILES_STREAM_K) in linear and swiglu: grids whose K-step ranges end inside tiles (the
    tail resumes the head's accumulator) give the plain persistent kernels' bits, with and without bias; the flags
    are zero again after each launch (a graph replays it); a grid of whole waves, or with fewer tiles than
    programs, keeps the plain launch."""
    from miles_kernels._triton import fused_linears as fl
    from miles_kernels._triton import matmul as lin
    from miles_kernels._triton import streamk

    kt = _kt()
    saved = lin.LINEAR_TILES[torch.float32], dict(lin.SMALL_M_TILES), fl.SMALL_M_TMA, streamk.STREAM_K
    launched = []  # a name a stream-K launch
    kernels = lin._linear_streamk_kernel, fl._swiglu_streamk_kernel

    class Counted:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.kernel[grid]

    lin._linear_streamk_kernel = Counted(kernels[0], "linear")
    fl._swiglu_streamk_kernel = Counted(kernels[1], "swiglu")
    g = torch.Generator().manual_seed(48)
    try:
        fl.SMALL_M_TMA = True
        lin.LINEAR_TILES[torch.float32] = (lin.Tile(1 << 62, 16, 16, 32, 1, 4, 2, True),)
        # M 37 x N 68 x K 200: 3 x 5 tiles of 7 K-steps on the interpreter's 4 programs (ranges end inside
        # tiles); N 64: 3 x 4 tiles (whole waves: plain); M 9: 1 x 5 tiles (T >= P, 5 % 4: stream-K); N 48 at
        # M 9: 3 tiles (fewer than the programs: plain)
        for M, N in ((37, 68), (37, 64), (9, 68), (9, 48)):
            x, w = torch.randn(M, 200, generator=g), torch.randn(N, 200, generator=g) / 200 ** 0.5
            b = torch.randn(N, generator=g)
            for bias in (None, b):
                streamk.STREAM_K = False
                want = lin.linear(x, w, bias)
                streamk.STREAM_K = True
                before = len(launched)
                for _ in range(2):
                    _same(lin.linear(x, w, bias), want, f"stream-K linear M {M} N {N} bias {bias is not None}")
                tiles = -(-M // 16) * -(-N // 16)
                want_sk = ["linear"] * 2 if tiles >= 4 and tiles % 4 != 0 else []
                assert launched[before:] == want_sk, f"M {M} N {N}: {tiles} tiles on 4 programs, {launched[before:]}"
        # swiglu: 3 x 3 tiles of 16 x 16 (the 16 x 32 tile halved a weight) and 3 K-steps on 4 programs
        lin.SMALL_M_TILES[torch.float32] = (lin.Tile(64, 16, 32, 32, 1, 4, 2, True),)
        x = torch.randn(37, 72, generator=g)
        wg, wu = torch.randn(40, 72, generator=g), torch.randn(40, 72, generator=g)
        streamk.STREAM_K = False
        want = fl.swiglu(x, wg, wu)
        _same(want, kt.silu_mul(lin.linear(x, wg), lin.linear(x, wu)), "swiglu vs silu_mul(linear, linear)")
        streamk.STREAM_K = True
        before = len(launched)
        for _ in range(2):
            _same(fl.swiglu(x, wg, wu), want, "stream-K swiglu")
        assert launched[before:] == ["swiglu"] * 2, launched[before:]
        for (_, _, programs), (_, flags) in streamk._WORKSPACE.items():
            assert flags.tolist() == [0] * programs, f"flags left set after the launches: {flags.tolist()}"
    finally:
        lin.LINEAR_TILES[torch.float32] = saved[0]
        lin.SMALL_M_TILES.clear()
        lin.SMALL_M_TILES.update(saved[1])
        fl.SMALL_M_TMA, streamk.STREAM_K = saved[2], saved[3]
        lin._linear_streamk_kernel, fl._swiglu_streamk_kernel = kernels


def check_grouped_linear() -> None:
    kt = _kt()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(45, 40, generator=g)
    w = torch.randn(4, 24, 40, generator=g)
    sizes = [10, 0, 33, 2]  # an empty expert and one spanning two row tiles
    offs = torch.tensor([0, 10, 10, 43, 45], dtype=torch.int32)
    y = kt.grouped_linear(x, w, offs)
    ref = torch.cat([x[o : o + n].double() @ w[e].double().T for e, (o, n) in enumerate(zip(offs[:-1].tolist(), sizes))])
    _close(y, ref, "grouped_linear", atol=1e-4)
    # same rows, other experts' counts changed: expert 2's rows must not move a bit
    x2 = torch.cat([x[:3], x[10:43], x[43:44]])
    y2 = kt.grouped_linear(x2, w, torch.tensor([0, 3, 3, 36, 37], dtype=torch.int32))
    _same(y2[3:36], y[10:43], "grouped_linear expert rows with other group sizes")
    _same(y2[36], y[43], "grouped_linear last expert row")


def check_grouped_linear_tma() -> None:
    """The TMA grouped kernel (tile.tma) gives the pointer kernel's bits, rows of a tile past
    its expert (and columns past N) loaded from the neighbour but never stored; so does any
    tile order."""
    from miles_kernels._triton import matmul as lin

    saved = lin.GROUPED_TILES[torch.float32]
    g = torch.Generator().manual_seed(12)
    x = torch.randn(45, 32, generator=g)
    w = torch.randn(4, 20, 32, generator=g)  # N = 20: a 16-wide column tile reads the next expert
    offs = torch.tensor([0, 10, 10, 43, 45], dtype=torch.int32)
    try:
        lin.GROUPED_TILES[torch.float32] = (lin.Tile(1 << 62, 16, 16, 32, 1, 4, 2),)
        want = lin.grouped_linear(x, w, offs)
        for group_m in (1, 2, 3):  # the tile order (grouped; TMA: persistent, 4 programs here) moves no bit
            for tma in (False, True):
                lin.GROUPED_TILES[torch.float32] = (lin.Tile(1 << 62, 16, 16, 32, group_m, 4, 2, tma),)
                _same(lin.grouped_linear(x, w, offs), want, f"grouped_linear tma={tma} group_m={group_m}")
        # the tile by mean rows per expert: 45 rows / 4 experts -> 12 > 8: the second tile
        lin.GROUPED_TILES[torch.float32] = (lin.Tile(8, 16, 16, 32, 1, 4, 2), lin.Tile(1 << 62, 32, 16, 32, 1, 4, 2, True))
        assert lin.grouped_tile(45, 4, torch.float32).block_m == 32 and lin.grouped_tile(32, 4, torch.float32).block_m == 16
        _same(lin.grouped_linear(x, w, offs), want, "grouped_linear 32-row TMA tile")
        _same(lin.grouped_linear(x[:30], w, torch.tensor([0, 10, 10, 30, 30], dtype=torch.int32)), want[:30],
              "grouped_linear 16-row tile (mean 8 rows an expert)")
        # a later tile of the bucket whose width divides n: 24 takes the 8-wide one; 20 (none divides) the first
        lin.GROUPED_TILES[torch.float32] = (lin.Tile(1 << 62, 16, 16, 32, 1, 4, 2), lin.Tile(1 << 62, 16, 8, 32, 1, 4, 2))
        assert lin.grouped_tile(45, 4, torch.float32, 24).block_n == 8 and lin.grouped_tile(45, 4, torch.float32, 32).block_n == 16
        assert lin.grouped_tile(45, 4, torch.float32, 20).block_n == 16  # none divides: the first
        # rows before offsets[0] and after offsets[E] are zero (y starts uninitialised)
        y = lin.grouped_linear(x, w, torch.tensor([3, 10, 10, 40, 40], dtype=torch.int32))
        assert not y[:3].any() and not y[40:].any(), "rows outside the groups not zeroed"
        _same(y[10:40], want[10:40], "grouped_linear rows inside offsets[0]..offsets[E]")
    finally:
        lin.GROUPED_TILES[torch.float32] = saved


def check_moe_combine() -> None:
    """The MoE combine kernel: fp32 slot sums close to float64, a token's row alone == in the batch,
    bf16 output; D not a power of two (a masked column block)."""
    kt = _kt()
    g = torch.Generator().manual_seed(13)
    T, k, D = 11, 4, 40
    pos = torch.randperm(T * k, generator=g).view(T, k)
    y = torch.randn(T * k, D, generator=g)
    w = torch.softmax(torch.randn(T, k, generator=g), -1)
    out = kt.moe_combine(y, pos, w)
    _close(out, (y.double()[pos] * w.double()[:, :, None]).sum(1), "moe_combine", atol=1e-5)
    _same(kt.moe_combine(y[pos[7]], torch.arange(k)[None], w[7:8])[0], out[7], "moe_combine token alone vs in batch")
    yb = y.to(torch.bfloat16)
    ob = kt.moe_combine(yb, pos, w)
    assert ob.dtype == torch.bfloat16
    _close(ob, (yb.double()[pos] * w.double()[:, :, None]).sum(1), "moe_combine bf16", atol=2e-2, rtol=1e-2)


def check_moe_backward() -> None:
    """moe_combine's backward kernel (dy rows at pos, dw dot products over column chunks) and
    moe_dispatch's (gather_sum: a token's k rows in slot order) against their torch twins; D
    over one column chunk and not a power of two; rows no slot reads get zero."""
    from miles_kernels import _grads

    kt = _kt()
    g = torch.Generator().manual_seed(14)
    for T, k, D in ((5, 3, 40), (4, 2, 1100)):
        R = T * k + 2  # two rows no slot reads
        pos = torch.randperm(R, generator=g)[: T * k].view(T, k)
        y = torch.randn(R, D, generator=g)
        w = torch.softmax(torch.randn(T, k, generator=g), -1)
        gout = torch.randn(T, D, generator=g)
        gy, gw = kt.moe_combine_grad(y, pos, w, gout)
        ry, _, rw = _grads.moe_combine_torch((y, pos, w), (), gout, (True, False, True))
        _close(gy, ry, f"moe_combine dy D={D}", atol=1e-5)
        _close(gw, rw, f"moe_combine dw D={D}", atol=1e-4)
        unread = torch.ones(R, dtype=torch.bool)
        unread[pos.reshape(-1)] = False
        assert not gy[unread].any(), "moe_combine dy of rows no slot reads"
        gx = torch.randn(T * k, D, generator=g)
        p2 = torch.randperm(T * k, generator=g).view(T, k)
        _close(kt.gather_sum(gx, p2), gx[p2].double().sum(1), f"gather_sum D={D}", atol=1e-5)


def check_rms_norm() -> None:
    kt = _kt()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 3, 40, generator=g) * 3
    w = torch.randn(40, generator=g)
    y = kt.rms_norm(x, w, 1e-6)
    xd = x.double()
    _close(y, xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double(), "rms_norm")
    assert y.shape == x.shape
    _same(kt.rms_norm(x[4:5], w, 1e-6), y[4:5], "rms_norm row alone vs in batch")


def check_apply_rope() -> None:
    kt = _kt()
    g = torch.Generator().manual_seed(4)
    T, H, D = 7, 3, 16
    qkv = torch.randn(T, 2 * H, D, generator=g)
    x = qkv[:, :H]  # non-contiguous view, as after a fused qkv projection
    f = torch.arange(T, dtype=torch.float32)[:, None] * (1.0 / 10000 ** (torch.arange(D // 2) * 2 / D))[None]
    cos, sin = f.cos(), f.sin()
    y = kt.apply_rope(x, cos, sin)
    xd, c, s = x.double(), cos.double()[:, None], sin.double()[:, None]
    x1, x2 = xd[..., : D // 2], xd[..., D // 2 :]
    _close(y, torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1), "apply_rope")
    _same(kt.apply_rope(x[2:3].contiguous(), cos[2:3], sin[2:3]), y[2:3], "apply_rope token alone")


def _rope_tables(T: int, D: int):
    f = (torch.arange(T, dtype=torch.float32) * 7)[:, None] * (1.0 / 100 ** (torch.arange(D // 2) * 2 / D))[None]
    return f.cos(), f.sin()


def check_qk_norm_rope() -> None:
    """The fused kernel gives rms_norm's then apply_rope's kernel bits, q and k alike: GQA and odd
    head counts, D and D/2 not powers of two, q/k views of a fused projection or contiguous, fp32
    or fp32-promoting weights; accurate vs float64; a token alone as in its batch."""
    kt = _kt()
    g = torch.Generator().manual_seed(30)
    for T, H, K, D in ((7, 4, 2, 16), (5, 3, 1, 20), (3, 6, 3, 40), (1, 2, 2, 8)):
        qkv = torch.randn(T, H + 2 * K, D, generator=g) * 3
        cos, sin = _rope_tables(T, D)
        q_w, k_w = 1 + 0.1 * torch.randn(D, generator=g), 1 + 0.1 * torch.randn(D, generator=g)
        for q, k in ((qkv[:, :H], qkv[:, H: H + K]), (qkv[:, :H].contiguous(), qkv[:, H + K:].contiguous())):
            what = f"qk_norm_rope T={T} H={H} K={K} D={D} (contiguous {q.is_contiguous()})"
            q_out, k_out = kt.qk_norm_rope(q, k, q_w, k_w, cos, sin, 1e-6)
            _same(q_out, kt.apply_rope(kt.rms_norm(q, q_w, 1e-6), cos, sin), f"{what}: q vs rms_norm then apply_rope")
            _same(k_out, kt.apply_rope(kt.rms_norm(k, k_w, 1e-6), cos, sin), f"{what}: k vs rms_norm then apply_rope")
            kd = k.double()
            n = kd * torch.rsqrt(kd.pow(2).mean(-1, keepdim=True) + 1e-6) * k_w.double()
            c, s_ = cos.double()[:, None], sin.double()[:, None]
            n1, n2 = n[..., : D // 2], n[..., D // 2:]
            _close(k_out, torch.cat([n1 * c - n2 * s_, n2 * c + n1 * s_], -1), f"{what}: k vs float64")
            t = T // 2
            one = kt.qk_norm_rope(q[t: t + 1], k[t: t + 1], q_w, k_w, cos[t: t + 1], sin[t: t + 1], 1e-6)
            _same(one[0], q_out[t: t + 1], f"{what}: q of token {t} alone")
            _same(one[1], k_out[t: t + 1], f"{what}: k of token {t} alone")
    q0, k0 = kt.qk_norm_rope(qkv[:0, :H], qkv[:0, H: H + K], q_w, k_w, cos[:0], sin[:0], 1e-6)
    assert q0.shape == (0, H, D) and k0.shape == (0, K, D), "qk_norm_rope of no tokens"
    # several tokens a program (long inputs; forced here): each row's bits as with one a program,
    # a partial last program (13 tokens, 8 a program) included
    qkv = torch.randn(13, 6, 16, generator=g)
    cos, sin = _rope_tables(13, 16)
    q, k, v = qkv[:, :3], qkv[:, 3:4], qkv[:, 4:5]
    q_w, k_w = 1 + 0.1 * torch.randn(16, generator=g), 1 + 0.1 * torch.randn(16, generator=g)
    one = kt.qk_norm_rope(q, k, q_w, k_w, cos, sin, 1e-6)
    slot = torch.randperm(16, generator=g)[:13]
    caches_one = [torch.zeros(4, 4, 1, 16) for _ in range(2)]
    q_one = kt.qk_norm_rope_write_kv(q, k, v, q_w, k_w, cos, sin, 1e-6, *caches_one, slot)
    with _many_tokens_a_program():
        many = kt.qk_norm_rope(q, k, q_w, k_w, cos, sin, 1e-6)
        caches = [torch.zeros(4, 4, 1, 16) for _ in range(2)]
        q_many = kt.qk_norm_rope_write_kv(q, k, v, q_w, k_w, cos, sin, 1e-6, *caches, slot)
    for a, b, what in ((many[0], one[0], "q"), (many[1], one[1], "k"), (q_many, q_one, "write_kv q"),
                       (caches[0], caches_one[0], "write_kv k cache"), (caches[1], caches_one[1], "write_kv v cache")):
        _same(a, b, f"qk_norm_rope with 8 tokens a program vs one: {what}")


@contextlib.contextmanager
def _many_tokens_a_program():
    """qk_norm_rope's programs take several tokens from the first token on (as from 2,048 on)."""
    from miles_kernels._triton import elementwise

    old = elementwise._ROWS_TOKENS
    elementwise._ROWS_TOKENS = 1
    try:
        yield
    finally:
        elementwise._ROWS_TOKENS = old


def check_qk_norm_rope_write_kv() -> None:
    """The one-launch norm/RoPE + K/V store: q is qk_norm_rope's q, and the caches hold what
    qk_norm_rope's k then write_kv would leave, bitwise (other slots untouched); k and v as
    column slices of one projection row, slots out of order, GQA."""
    from miles_kernels._triton.kv_write import write_kv

    kt = _kt()
    g = torch.Generator().manual_seed(32)
    for T, H, K, D in ((7, 4, 2, 16), (3, 6, 3, 40), (1, 2, 1, 8)):
        P, S = 4, 4
        qkv = torch.randn(T, H + 2 * K, D, generator=g) * 3
        q, k, v = qkv[:, :H], qkv[:, H: H + K], qkv[:, H + K:]
        cos, sin = _rope_tables(T, D)
        q_w, k_w = 1 + 0.1 * torch.randn(D, generator=g), 1 + 0.1 * torch.randn(D, generator=g)
        slot = torch.randperm(P * S, generator=g)[:T]
        caches = [torch.randn(P, S, K, D, generator=g) for _ in range(2)]
        want = [c.clone() for c in caches]
        q_want, k_want = kt.qk_norm_rope(q, k, q_w, k_w, cos, sin, 1e-6)
        write_kv(*want, k_want, v, slot)
        q_out = kt.qk_norm_rope_write_kv(q, k, v, q_w, k_w, cos, sin, 1e-6, *caches, slot)
        what = f"qk_norm_rope_write_kv T={T} H={H} K={K} D={D}"
        _same(q_out, q_want, f"{what}: q")
        _same(caches[0], want[0], f"{what}: k cache")
        _same(caches[1], want[1], f"{what}: v cache")


def check_add_rms_norm() -> None:
    """The fused kernel: h is torch's x + r, y is rms_norm's kernel on h, bitwise; D not a power of
    two and past one 128 block, strided and 16-byte-misaligned inputs (copied as rms_norm reads h)."""
    kt = _kt()
    g = torch.Generator().manual_seed(31)
    for M, D in ((9, 40), (5, 72), (4, 130)):
        buf = torch.randn(2 * M * D + 1, generator=g)
        cases = {"contiguous": (buf[: M * D].view(M, D), buf[M * D: 2 * M * D].view(M, D)),
                 "misaligned": (buf[1: M * D + 1].view(M, D), buf[: M * D].view(M, D)),
                 "column slices": (buf[: 2 * M * D].view(M, 2 * D)[:, :D], buf[: 2 * M * D].view(M, 2 * D)[:, D:])}
        w = 1 + 0.1 * torch.randn(D, generator=g)
        for name, (x, r) in cases.items():
            what = f"add_rms_norm M={M} D={D} {name}"
            h, y = kt.add_rms_norm(x, r, w, 1e-6)
            _same(h, x + r, f"{what}: h vs torch's add")
            _same(y, kt.rms_norm(x + r, w, 1e-6), f"{what}: y vs rms_norm of the sum")
            hd = (x + r).double()
            _close(y, hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double(), f"{what}: y vs float64")
            h1, y1 = kt.add_rms_norm(x[2:3], r[2:3], w, 1e-6)
            _same(y1, y[2:3], f"{what}: row alone")


def check_silu_mul() -> None:
    kt = _kt()
    g = torch.Generator().manual_seed(5)
    gate_up = torch.randn(6, 2 * 1100, generator=g) * 4  # F > one 1024 block
    gate, up = gate_up[:, :1100], gate_up[:, 1100:]
    y = kt.silu_mul(gate, up)
    _close(y, torch.nn.functional.silu(gate.double()) * up.double(), "silu_mul")
    _same(kt.silu_mul(gate[3:4], up[3:4]), y[3:4], "silu_mul row alone")


def check_write_kv() -> None:
    from miles_kernels._triton.kv_write import write_kv

    g = torch.Generator().manual_seed(5)
    T, K, D, P, S = 7, 3, 20, 5, 4
    kv = torch.randn(T, 2 * K * D + 6, generator=g)  # k and v as column slices of one row (linears' output)
    k, v = kv[:, : K * D].view(T, K, D), kv[:, K * D + 6 :].view(T, K, D)
    slot = torch.tensor([3, 17, 0, 8, 19, 4, 11])
    caches = [torch.randn(P, S, K, D, generator=g) for _ in range(2)]
    want = [c.clone() for c in caches]
    want[0].view(P * S, K, D).index_copy_(0, slot, k)
    want[1].view(P * S, K, D).index_copy_(0, slot, v)
    write_kv(*caches, k, v, slot)
    _same(caches[0], want[0], "write_kv k")
    _same(caches[1], want[1], "write_kv v")


def check_noisy_argmax() -> None:
    from miles_fsdp.engine.sampler import noisy_argmax

    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 300, generator=g)
    noise = torch.randn(5, 300, generator=g)
    x[1, 250:] = float("-inf")  # masked tokens
    x[2] = float("-inf")  # a row of -inf only: index 0, as torch
    x[3], noise[3] = 1.0, 0.0  # ties across chunks: the first index
    x[4, 7], x[4, 70] = 50.0, 50.0
    for neg in (False, True):
        want = (x - noise if neg else x + noise).argmax(-1)
        for chunk in (16, 64, 512):  # chunk maxima merged in token order, partial last chunk
            got = noisy_argmax(x, noise, neg, chunk=chunk)
            _same(got, want, f"noisy_argmax neg={neg} chunk={chunk}")
    _same(noisy_argmax(x[4:5], noise[4:5], False, 16), (x + noise).argmax(-1)[4:5], "noisy_argmax row alone")


def check_gumbel_log_fixes() -> None:
    """The noise kernel: the hash as gumbel_noise_torch's, the logs close to torch's, and the
    u values of the fix table (where Triton's logs differ from torch's) get the table's value;
    the argmax kernel that makes the noise itself picks what x + that noise picks."""
    from miles_fsdp.engine import sampler
    from miles_fsdp.engine.sampler import _gumbel_kernel, _mix32, gumbel_noise_torch, noisy_argmax

    keys = torch.tensor([[3, 2**32 - 7], [0, 2**31 + 5], [17, 4000]])  # seed, stream, position of 2 rows
    B, V = 2, 300
    want = gumbel_noise_torch(_mix32(_mix32(_mix32(keys[0]) ^ keys[1]) ^ keys[2]), V)
    k = _mix32(_mix32(_mix32(_mix32(keys[0]) ^ keys[1]) ^ keys[2])[:, None] ^ torch.arange(V)[None, :]) >> 9
    fix_k = torch.stack([k[0, 7], k[1, 250]])
    fix_v = torch.tensor([123.5, -7.25])
    for nfix in (0, 2):
        out = torch.empty(B, V)
        _gumbel_kernel[(B, 3)](keys, B, out, V, fix_k, fix_v, BLOCK=128, LOGS=True, NFIX=nfix)
        hit = (k[..., None] == fix_k).any(-1) if nfix else torch.zeros(B, V, dtype=torch.bool)
        _close(out[~hit], want[~hit], f"gumbel noise, {nfix} fixes", atol=1e-5, rtol=1e-5)
        if nfix:
            assert out[0, 7] == 123.5 and out[1, 250] == -7.25 and (out[hit] != want[hit]).all()
        u = torch.empty(B, V)
        _gumbel_kernel[(B, 3)](keys, B, u, V, fix_k, fix_v, BLOCK=128, LOGS=False, NFIX=nfix)
        _same(-torch.log(-torch.log(u)), want, "gumbel u, torch's logs")
        # the argmax that makes the noise itself: the argmax of x + the noise kernel's values (the
        # exact logs everywhere: these fixes are far from the logs' values, which the screen assumes)
        x = torch.randn(B, V, generator=torch.Generator().manual_seed(nfix))
        fixes = (fix_k[:nfix], fix_v[:nfix]) if nfix else (fix_k[:0], fix_v[:0])
        sampler.SCREEN = False
        try:
            got = noisy_argmax(x, keys, neg=False, chunk=64, fixes=fixes)
        finally:
            sampler.SCREEN = True
        _same(got, (x + out).argmax(-1), f"noisy_argmax with the noise made inside, {nfix} fixes")
        if nfix:
            assert got[0] == 7  # the fixed value (123.5) wins row 0


def check_noisy_argmax_screen() -> None:
    """The screened argmax (fast logs, then the exact logs of a clear winner only): per chunk the
    exact max of x + noise (x scaled by torch's CUDA 1 / T or not) and its first index, bitwise,
    whether the chunk has one clear winner
    (the exact value is recomputed), near ties (every token's exact logs), or only -inf (token 0);
    and the fast noise within NOISE_BOUND of torch's at u near 0, 1 and between."""
    import numpy as np

    from miles_fsdp.engine import sampler

    keys = torch.tensor([[3, 9, 11, 5], [1, 2, 3, 4], [100, 7, 0, 2**31 + 9]])  # 4 rows' seed, stream, position
    B, V, chunk = 4, 320, 64
    noise = torch.empty(B, V)  # the exact path's noise (the interpreter's logs, not torch's)
    sampler._gumbel_kernel[(B, 5)](keys, B, noise, V, noise, noise, BLOCK=64, LOGS=True, NFIX=0)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, V, generator=g) * 3
    x[1, :64] = 2.0 - noise[1, :64]  # chunk 0 of row 1: every z within rounding of 2 (near ties)
    x[1, 64:128] = 2.0 - noise[1, 64:128] - 1e-7 * torch.arange(64)  # a hair apart: rounding ties some
    x[2, :200] = float("-inf")  # -inf-only chunks, then one with its first 8 tokens masked
    x[3] = float("-inf")
    x[3, [5, 70, 300]] = torch.tensor([1.0, 4.0, 2.0])  # top-k-like: 3 live tokens in 320
    n_chunks = -(-V // chunk)
    scale = float(np.float32(1.0) / np.float32(0.7))  # what torch's CUDA x / 0.7 multiplies by
    for screen, scaled in ((True, False), (False, False), (True, True), (False, True)):
        z = (x * torch.tensor(scale) if scaled else x) + noise
        maxes = torch.empty(B, n_chunks)
        idx = torch.empty(B, n_chunks, dtype=torch.int32)
        sampler._noisy_argmax_kernel[(B, n_chunks)](
            x, keys, maxes, idx, V, x.stride(0), n_chunks, B, maxes, maxes, scale if scaled else 1.0, NEG=False,
            CHUNK=chunk, KEYS=True, NFIX=0, SCREEN=screen, ASM=False, BOUND=sampler.NOISE_BOUND, SCALED=scaled)
        zc = torch.nn.functional.pad(z, (0, n_chunks * chunk - V), value=float("-inf")).view(B, n_chunks, chunk)
        what = f"screen={screen} scaled={scaled}"
        _same(maxes, zc.max(-1).values, f"{what}: chunk maxima")
        _same(idx.long(), zc.argmax(-1) + torch.arange(n_chunks) * chunk, f"{what}: chunk argmax")
    z = x + noise
    got = sampler.noisy_argmax(x, keys, neg=False, chunk=chunk, fixes=(keys[0, :0], x[0, :0]))
    _same(got, z.argmax(-1), "screened noisy_argmax")
    k = torch.cat([torch.arange(4096),
                   torch.arange(2**23 - 4096, 2**23), torch.randint(0, 2**23, (8192,), generator=g)])
    want = -torch.log(-torch.log(sampler.uniform_from_bits(k)))
    err = (sampler.fast_noise(k) - want).abs().max().item()
    assert err < sampler.NOISE_BOUND / 8, f"fast noise off by {err}"


def check_persistent_probe() -> None:
    """tools/bench/persistent_probe.py's one-launch chain (one program: its barriers pass at once)
    equals the four separate launches bitwise and the float64 chain closely, and leaves its
    counters at zero for the next launch."""
    probe = _bench_module("persistent_probe")
    ch = probe.Chain([(128, 64), (64, 128), (128, 64), (32, 128)], 64, "cpu", copies=2)
    for c in range(2):
        ch.separate(c)
        want = ch.ys[3].clone()
        ch.ys[3].zero_()
        ch.persistent(c, 1)
        _same(ch.ys[3], want, f"persistent == separate, weights {c}")
        assert ch.count.tolist() == [0, 0], f"counters left at {ch.count.tolist()}"
        _close(want.double(), ch.reference(c), f"chain vs float64, weights {c}", atol=1e-4, rtol=1e-4)

def check_wide_probe() -> None:
    """tools/bench/wide_probe.py's multi-part tiles (three parts or a part and a half, side by side and stacked,
    edges partial, more tiles than programs) give linear's bits from a one-part tile of the same BLOCK_K walk."""
    from miles_kernels._triton import matmul as lin

    probe = _bench_module("wide_probe")
    g = torch.Generator().manual_seed(43)
    x, w = torch.randn(37, 72, generator=g), torch.randn(100, 72, generator=g) / 72 ** 0.5
    want = torch.empty(37, 100)
    lin._launch_linear(x, w, None, want, lin.Tile(0, 16, 16, 32, 1, 4, 2))
    _close(want.double(), x.double() @ w.double().T, "reference tile vs float64", atol=1e-4)
    for split, bm, bn in (("n3", 16, 16), ("m3", 16, 16), ("n3", 32, 16), ("m3", 16, 32), ("n2", 16, 32),
                          ("m2", 32, 16), ("n2", 32, 16)):
        y = torch.full_like(want, float("nan"))
        probe.wide_linear(x, w, y, split, bm, bn, 4, 2, block_k=32)
        _same(y, want, f"wide_probe {split} {bm}x{bn} vs linear")

def check_fold_probe() -> None:
    """tools/bench/fold_probe.py's kernels: each chunk's partial sum (one program a tile and chunk, a short
    last chunk included) and the ordered sum close to float64; the folded add_rms_norm equals the shipped
    add_rms_norm of the rounded sum bitwise (h and y), a row alone as in the batch."""
    kt = _kt()
    probe = _bench_module("fold_probe")
    g = torch.Generator().manual_seed(41)
    for M, N, K, chunk, block_n in ((5, 48, 256, 64, 16), (9, 40, 200, 64, 32), (3, 72, 384, 128, 64)):
        what = f"fold_probe M={M} N={N} K={K} chunk {chunk} n{block_n}"
        x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K ** 0.5
        parts = probe.partials(x, w, chunk, block_n)
        n_chunks = -(-K // chunk)
        assert parts.p.shape == (n_chunks, M, N), f"{what}: partials {list(parts.p.shape)}"
        for c in range(n_chunks):
            ks = slice(c * chunk, min(K, (c + 1) * chunk))
            _close(parts.p[c], x[:, ks].double() @ w[:, ks].double().T, f"{what}: chunk {c}")
        total = probe.chunk_sum(parts)
        want = torch.zeros(M, N)
        for c in range(n_chunks):
            want = want + parts.p[c]
        _same(total, want, f"{what}: the ordered sum")
        _close(total, x.double() @ w.double().T, f"{what}: the sum vs float64")
        r, nw = torch.randn(M, N, generator=g), 1 + 0.1 * torch.randn(N, generator=g)
        h, y = probe.fold_add_rms_norm(parts, r, nw, 1e-6)
        h_want, y_want = kt.add_rms_norm(total, r, nw, 1e-6)
        _same(h, h_want, f"{what}: folded h")
        _same(y, y_want, f"{what}: folded y")
        h1, y1 = probe.fold_add_rms_norm(probe.Partials(parts.p[:, 1:2].contiguous(), parts.dtype), r[1:2], nw, 1e-6)
        _same(y1, y[1:2], f"{what}: a row alone")
    # Through a model: the tiny Qwen3's down projections (K 128, two chunks of 64) return partials inside
    # `patched`, and its norms take them; both modes close to the model as it is, and the model restored after.
    from miles_fsdp.models import layers
    from miles_fsdp.models.transformer import packed_inputs

    model = _bench_module("engine").build("tiny", "cpu").float()
    mods = probe.partitioned(model, 64, 64, 64)
    assert len(mods) == model.args.n_layers, f"fold_probe: {len(mods)} partitioned projections"
    ids = torch.randint(0, model.args.vocab_size, (20,), generator=g)
    pos, meta, slot = packed_inputs(torch.tensor([0, 12, 20]))
    forward, want = layers.Linear.forward, model.forward(ids, pos, meta, slot)
    got = {}
    for mode in ("split", "fold"):
        with probe.patched(model, mode, {tuple(m.weight.shape): 16 for m in mods}, 64, mods):
            got[mode] = model.forward(ids, pos, meta, slot)
        assert layers.Linear.forward is forward, f"fold_probe: {mode} left Linear.forward patched"
        _close(got[mode], want, f"fold_probe tiny model, {mode}", atol=1e-4, rtol=1e-4)


def check_ablate_probe() -> None:
    """tools/bench/ablate_probe.py's patching, through the tiny model: every variant's logits keep their shape,
    each stub variant launches the stub once for each of its kind's launches (counted from the model's layers),
    shipped is the model as it is, and the ops are restored after each variant."""
    import miles_kernels as mk
    from miles_fsdp.models.transformer import packed_inputs

    probe = _bench_module("ablate_probe")

    model = _bench_module("engine").build("tiny", "cpu").float()
    n = model.args.n_layers
    g = torch.Generator().manual_seed(43)
    ids = torch.randint(0, model.args.vocab_size, (20,), generator=g)
    pos, meta, slot = packed_inputs(torch.tensor([0, 12, 20]))
    ops = {name: getattr(mk, name) for names in probe.KINDS.values() for name in names}
    want = model.logits(model.forward(ids, pos, meta, slot))
    # a layer: two norms, q|k|v + o + gate|up + down, one attention (two launches); then the final norm and the lm head
    launches = dict(norms=2 * n + 1, attn=2 * n, linears=4 * n + 1)
    launches["all"] = sum(launches.values())
    for variant in probe.VARIANTS:
        with probe.patched(variant) as stubs:
            got = model.logits(model.forward(ids, pos, meta, slot))
        assert got.shape == want.shape, f"ablate_probe {variant}: logits {list(got.shape)}"
        assert all(getattr(mk, k) is f for k, f in ops.items()), f"ablate_probe: {variant} left an op patched"
        kind = variant.split("_")[1] if variant != "shipped" else None
        if variant == "shipped":
            _same(got, want, "ablate_probe shipped")
        elif variant.startswith("stub"):
            assert stubs.launched == launches[kind], f"ablate_probe {variant}: {stubs.launched} stub launches, " \
                f"want {launches[kind]}"
        else:
            assert stubs.launched == 0, f"ablate_probe {variant}: {stubs.launched} stub launches"


def _close_rel(got: torch.Tensor, ref: torch.Tensor, what: str, rel: float = 1e-5) -> None:
    """Every element within rel * max |ref| (fp32 math vs a float64 or fp32 reference)."""
    assert got.shape == ref.shape, f"{what}: shape {list(got.shape)} vs {list(ref.shape)}"
    scale = ref.double().abs().max().item() if ref.numel() else 1.0
    _close(got, ref, what, atol=rel * (scale or 1.0), rtol=rel)


def _autograd64(fn, ins, g):
    """Grads of fn at ins (float64 copies) for the output grad g, via autograd."""
    ins64 = [t.detach().double().requires_grad_(True) for t in ins]
    return torch.autograd.grad(fn(*ins64), ins64, g.double())


NEEDS = ((True, True), (True, False), (False, True), (False, False))


def check_rms_norm_grad() -> None:
    """rms_norm's backward kernel vs the torch rule and float64 autograd, with several row
    blocks per program (the last one partial), both need flags, strided x and g; gx does not
    depend on the row partition and gw only on the inputs (bitwise, run to run)."""
    from miles_kernels import _grads, _ref
    from miles_kernels._triton import elementwise_grads as eg

    kt = _kt()
    g = torch.Generator().manual_seed(20)
    M, D, eps = 37, 40, 1e-6  # D not a power of two
    x = torch.randn(M, D + 3, generator=g)[:, :D] * 3  # row stride != D
    w = torch.randn(D, generator=g)
    gy = torch.randn(D, M, generator=g).T  # column-major: contiguous().T in the wrapper
    want64 = _autograd64(lambda a, b: _ref.rms_norm(a, b, eps), (x, w), gy)
    saved = eg._GW_PARTIAL
    try:
        eg._GW_PARTIAL = 4 * 64  # 4 programs of 10 rows: 37 rows end inside the last one
        for need_x, need_w in NEEDS:
            what = f"rms_norm grad need_x={need_x} need_w={need_w}"
            got = kt.rms_norm_grad(x, w, gy, eps, need_x, need_w)
            want = _grads.rms_norm_torch((x, w), (eps,), gy, (need_x, need_w))
            for a, b, b64, n in zip(got, want, want64, ("gx", "gw")):
                assert (a is None) == (b is None), f"{what}: {n} is {a} vs the torch rule's {b}"
                if a is not None:
                    assert a.dtype == b.dtype, f"{what}: {n} dtype"
                    _close_rel(a, b, f"{what}: {n} vs the torch rule")
                    _close_rel(a, b64, f"{what}: {n} vs float64 autograd through _ref")
        gx, gw = kt.rms_norm_grad(x, w, gy, eps, True, True)
        kt.rms_norm_grad(x * 5, w - 1, gy + 2, eps, True, True)  # other data through the same buffers
        gx2, gw2 = kt.rms_norm_grad(x.contiguous(), w, gy.contiguous(), eps, True, True)
        _same(gx2, gx, "rms_norm gx run to run (contiguous copies)")
        _same(gw2, gw, "rms_norm gw run to run (contiguous copies)")
        _same(kt.rms_norm_grad(x, w, gy, eps, False, True)[1], gw, "rms_norm gw without gx")
        add = torch.randn(D, M, generator=g).T  # a residual's other grad, strided: gx + add in the kernel's pass
        with_add = kt.rms_norm_grad(x, w, gy, eps, True, True, add)
        saved_ahead = eg.AHEAD_ELEMENTS
        try:
            for ahead in (1, 3, 16):  # rows loaded together: 3 ends 10 rows mid-group, 16 is capped at 10
                eg.AHEAD_ELEMENTS = ahead * 64  # D 40's block
                for got, want, what in ((kt.rms_norm_grad(x, w, gy, eps, True, True), (gx, gw), "no add"),
                                        (kt.rms_norm_grad(x, w, gy, eps, True, True, add), with_add, "add")):
                    for a, b, n in zip(got, want, ("gx", "gw")):
                        _same(a, b, f"rms_norm {n} ({what}) with {ahead} rows' loads ahead vs the default")
        finally:
            eg.AHEAD_ELEMENTS = saved_ahead
        eg._GW_PARTIAL = 1 << 20  # a row per program
        gx1, gw1 = kt.rms_norm_grad(x, w, gy, eps, True, True)
        _same(gx1, gx, "rms_norm gx with another row partition")
        _close_rel(gw1, gw, "rms_norm gw with another row partition")
        _same(kt.rms_norm_grad(x, w, gy, eps, True, False)[0], gx, "rms_norm gx without gw")
        gxa, gwa = kt.rms_norm_grad(x, w, gy, eps, True, True, add)
        _same(gxa, gx + add, "rms_norm gx + add vs torch's add of gx")
        _same(gwa, gw1, "rms_norm gw with an add")
        assert kt.rms_norm_grad(x, w, gy, eps, False, True, add)[0] is None, "rms_norm add without gx"
    finally:
        eg._GW_PARTIAL = saved
    gx0, gw0 = kt.rms_norm_grad(x[:0], w, gy[:0], eps, True, True)
    assert gx0.shape == (0, D) and torch.equal(gw0, torch.zeros(D)), "rms_norm grad of no rows"


def check_apply_rope_grad() -> None:
    """RoPE's backward (the forward kernel, rotated by -angle) vs the torch rule and float64
    autograd, odd H and F, strided g; it inverts the forward (the rotation is orthogonal)."""
    from miles_kernels import _grads, _ref

    kt = _kt()
    g = torch.Generator().manual_seed(21)
    T, H, D = 7, 3, 20  # F = 10: not a power of two
    cos, sin = _ref.rope_cos_sin(torch.arange(T) * 5, 1.0 / 100 ** (torch.arange(D // 2) * 2 / D))
    x = torch.randn(T, H, D, generator=g)
    gy = torch.randn(T, 2 * H, D, generator=g)[:, 1 : 2 * H : 2]  # head stride 2 * D
    got = kt.apply_rope_grad(gy, cos, sin, x.dtype)
    want = _grads.apply_rope_torch((x, cos, sin), (), gy, (True, False, False))
    assert want[1:] == (None, None) and got.dtype == x.dtype
    _close_rel(got, want[0], "apply_rope grad vs the torch rule")
    (want64,) = _autograd64(lambda a: _ref.apply_rope(a, cos.double(), sin.double()), (x,), gy)
    _close_rel(got, want64, "apply_rope grad vs float64 autograd through _ref")
    _same(kt.apply_rope_grad(gy.contiguous(), cos, sin, x.dtype), got, "apply_rope grad run to run")
    _close_rel(kt.apply_rope_grad(kt.apply_rope(x, cos, sin), cos, sin, x.dtype), x, "rope grad inverts rope")


def check_silu_mul_grad() -> None:
    """silu_mul's backward kernel vs the torch rule and float64 autograd, on column slices
    of a fused gate_up wider than one block, saturated sigmoids included, both need flags."""
    from miles_kernels import _grads, _ref

    kt = _kt()
    g = torch.Generator().manual_seed(22)
    M, F = 5, 1100
    gate_up = torch.randn(M, 2 * F, generator=g) * 4
    gate_up[0, :6] = torch.tensor([-100.0, -30.0, -12.0, 12.0, 30.0, 100.0])
    a, u = gate_up[:, :F], gate_up[:, F:]
    gy = torch.randn(M, F + 5, generator=g)[:, 5:]
    want64 = _autograd64(_ref.silu_mul, (a, u), gy)
    for need_a, need_u in NEEDS:
        what = f"silu_mul grad need_a={need_a} need_u={need_u}"
        got = kt.silu_mul_grad(a, u, gy, need_a, need_u)
        want = _grads.silu_mul_torch((a, u), (), gy, (need_a, need_u))
        for p, q, q64, n in zip(got, want, want64, ("ga", "gu")):
            assert (p is None) == (q is None), f"{what}: {n} is {p} vs the torch rule's {q}"
            if p is not None:
                assert p.dtype == q.dtype and p.shape == (M, F), f"{what}: {n} dtype/shape"
                _close_rel(p, q, f"{what}: {n} vs the torch rule")
                _close_rel(p, q64, f"{what}: {n} vs float64 autograd through _ref")
    ga, gu = kt.silu_mul_grad(a, u, gy, True, True)
    ga2, gu2 = kt.silu_mul_grad(a.contiguous(), u.contiguous(), gy.contiguous(), True, True)
    _same(ga2, ga, "silu_mul ga run to run")
    _same(gu2, gu, "silu_mul gu run to run")


def _each_part_size(check):
    """Run check with the default LOGPROB_PART and with one chunk a part (several parts a row,
    their states merged in order), restoring the default after."""
    from miles_kernels._triton import rows

    saved = rows.LOGPROB_PART
    try:
        for part in (saved, rows.LOGPROB_CHUNK):
            rows.LOGPROB_PART = part
            check()
    finally:
        rows.LOGPROB_PART = saved


def check_logprobs() -> None:
    _each_part_size(_check_logprobs)


def check_logprobs_filtered() -> None:
    """top-k / top-p act on logits / T (as the sampler's filter does), and a row whose first
    vocab chunks (parts) are all masked stays finite (the online max starts at -inf)."""
    _each_part_size(_check_logprobs_filtered)


def _check_logprobs() -> None:
    kt = _kt()
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(5, 9000, generator=g) * 5  # three vocab chunks, last one partial
    ids = torch.randint(0, 9000, (5,), generator=g)
    for temp in (1.0, 0.6):
        logp, ent, lse = kt.logprobs(logits, ids, temp)
        ls = torch.log_softmax(logits.double() / temp, -1)
        _close(logp, ls.gather(1, ids[:, None])[:, 0], f"logprobs T={temp}")
        _close(ent, -(ls.exp() * ls).sum(-1), f"entropy T={temp}")
        _close(lse, torch.logsumexp(logits.double() / temp, -1), f"lse T={temp}")
        assert logp.dtype == ent.dtype == lse.dtype == torch.float32
        one = kt.logprobs(logits[2:3], ids[2:3], temp)
        for a, b_, n in zip(one, (logp, ent, lse), ("logp", "entropy", "lse")):
            _same(a[0], b_[2], f"{n} row alone vs in batch")


def _check_logprobs_filtered() -> None:
    from miles_kernels._ref import filter_logits
    from miles_kernels._triton.rows import LOGPROB_CHUNK

    kt = _kt()
    g = torch.Generator().manual_seed(16)
    V = 2 * LOGPROB_CHUNK + 808  # three chunks, the last one partial
    logits = torch.randn(4, V, generator=g) * 3
    logits[:, 2 * LOGPROB_CHUNK + 5: 2 * LOGPROB_CHUNK + 30] += 12.0  # the nucleus sits in the last chunk
    for temp in (0.6, 1.0, 1.3):
        z = logits.double() / temp
        zs = torch.sort(z, -1, descending=True).values
        p = torch.softmax(zs, -1)
        before = torch.cumsum(p, -1) - p
        assert (before - 0.9).abs().min() > 1e-4, "premise: no token on the top-p cut"
        assert (zs[:, 19] - zs[:, 20]).min() > 1e-4, "premise: no tie at the top-k cut"
        for top_k in (0, 1, 20):
            for top_p in (1.0, 0.9):
                ref = torch.log_softmax(filter_logits(z, top_k, top_p), -1)
                ids = ref.argmax(-1)  # kept by any filter
                filtered = bool(top_k) or top_p < 1.0
                if filtered:
                    ids[0] = 7  # outside the nucleus: its logprob is -inf, the row's others stay finite
                logp, ent, lse = kt.logprobs(logits, ids, temp, top_k, top_p)
                what = f"filtered logprobs T={temp} top_k={top_k} top_p={top_p}"
                want = ref.gather(1, ids[:, None])[:, 0]
                assert torch.isfinite(ent).all() and torch.isfinite(lse).all(), what
                if filtered:
                    assert logp[0] == want[0] == float("-inf"), f"{what}: masked id, got {logp[0]}"
                _close(logp[int(filtered):], want[int(filtered):], what)
                pr = ref.exp()
                _close(ent, -(pr * torch.where(pr > 0, ref, torch.zeros_like(ref))).sum(-1), f"entropy, {what}")
                one = kt.logprobs(logits[2:3], ids[2:3], temp, top_k, top_p)
                _same(one[0][0], logp[2], f"{what}: row alone vs in batch")


def _logprobs_grad_both(logits, ids, g_logp, g_ent, temp, entropy, top_k, top_p, out):
    """(the Triton grad written into out, the torch rule's grad) for the forward's lse and
    entropy; filtered rows go to the kernel as the forward's masked fp32 logits at T = 1."""
    from miles_kernels import _logprobs as ops

    kt = _kt()
    _, ent, lse = ops._fast_logprobs(logits, ids, temp, True, top_k, top_p)
    want = ops._logprobs_grad(logits, ids, lse, ent, g_logp, g_ent, temp, entropy, top_k, top_p)  # CPU: torch
    z, t_in = logits, temp
    if top_k or top_p < 1.0:
        z, t_in = ops.filter_logits(logits.float() / temp, top_k, top_p), 1.0
    got = kt.logprobs_grad(z, ids, lse, ent, g_logp, g_ent if entropy else None, t_in, temp, out)
    return got, want


def check_logprobs_grad() -> None:
    """The logprobs backward kernel vs the torch rule (_logprobs._logprobs_grad's CPU path): T = 1
    and 0.7, entropy on and off, either output grad absent, top-k + top-p with a masked id;
    strided logits, a row slice of a larger out (other rows untouched), vocab tiles with a
    partial last one; bitwise equal run to run."""
    import importlib

    lg = importlib.import_module("miles_kernels._triton.logprobs_grad")  # the package's name is the function
    g = torch.Generator().manual_seed(23)
    T, V = 5, 1000
    logits = (torch.randn(T, V + 24, generator=g) * 3)[:, :V]  # row stride != V
    g_logp, g_ent = torch.randn(T, generator=g), torch.randn(T, generator=g)
    saved = lg.GRAD_BLOCK
    lg.GRAD_BLOCK = 256  # 4 tiles per row, the last one 232 wide
    try:
        cases = [(0, 1.0, True, True, True), (0, 1.0, False, True, True), (0, 1.0, True, False, True),
                 (0, 1.0, True, True, False), (7, 0.8, True, True, True), (7, 0.8, True, False, False)]
        for temp in (1.0, 0.7):
            for top_k, top_p, has_logp, has_ent, entropy in cases:
                what = (f"logprobs grad T={temp} top_k={top_k} top_p={top_p} g_logp={has_logp} "
                        f"g_ent={has_ent} entropy={entropy}")
                filtered = top_k > 0
                ids = logits.argmax(-1) if filtered else torch.randint(0, V, (T,), generator=g)
                if filtered:
                    ids[1] = logits[1].argmin()  # outside top-k: no one-hot term
                big = torch.full((T + 3, V), float("nan"))
                gl, ge = (g_logp if has_logp else None), (g_ent if has_ent else None)
                got, want = _logprobs_grad_both(logits, ids, gl, ge, temp, entropy, top_k, top_p, big[1: T + 1])
                assert got.data_ptr() == big[1].data_ptr() and got.dtype == want.dtype, what
                assert torch.isnan(big[0]).all() and torch.isnan(big[T + 1:]).all(), f"{what}: wrote outside out"
                _close_rel(got, want, what, rel=1e-6)
                if filtered:
                    assert want[1, ids[1]].abs() < 1e-30, f"premise: {what}: masked id has no one-hot term"
                again = _logprobs_grad_both(logits, ids, gl, ge, temp, entropy, top_k, top_p, torch.empty(T, V))[0]
                _same(again, got, f"{what}: run to run")
    finally:
        lg.GRAD_BLOCK = saved
    empty = torch.empty(0, V)
    assert _kt().logprobs_grad(logits[:0], ids[:0], g_logp[:0], g_logp[:0], None, None, 1.0, 1.0, empty) is empty


def check_top_p_cutoff() -> None:
    """The Triton top-p filter keeps exactly the tokens the sort-based reference keeps (rows
    with no token near the cut), ties included, and a row alone gets the bits it gets in a batch."""
    from miles_kernels._ref import filter_logits as ref_filter
    from miles_kernels._triton import cut as cut_mod

    kt = _kt()
    g = torch.Generator().manual_seed(17)
    V = cut_mod.CHUNK + 300
    x = torch.randn(6, V, generator=g) * 3
    x[1, :50] = 4.0  # a tie block at the top
    x[2] = float("-inf")
    x[2, 7] = 1.0  # one finite logit: always kept
    x[3, 2000:] = float("-inf")  # a top-k-like masked tail
    for top_k, top_p in ((0, 0.9), (0, 0.5), (20, 0.9), (0, 0.999), (1, 0.3)):
        got, want = kt.filter_logits(x, top_k, top_p), ref_filter(x.double(), top_k, top_p).float()
        xs = torch.sort(x.double(), -1, descending=True).values
        p = torch.softmax(xs, -1)
        near = ((torch.cumsum(p, -1) - p - top_p).abs() < 1e-5).any(-1)  # fp32 may decide those rows otherwise
        rows = ~near
        assert torch.equal(torch.isfinite(got[rows]), torch.isfinite(want[rows])), f"top_k={top_k} top_p={top_p}"
        assert torch.equal(got[torch.isfinite(got)], x[torch.isfinite(got)]), "kept logits are unchanged"
        _same(kt.filter_logits(x[3:4], top_k, top_p)[0], got[3], f"top_p={top_p}: row alone vs in batch")
        if top_p < 1.0:  # the cut is the smallest value kept: a token's value, not a float between two
            z = kt.filter_logits(x, top_k, 1.0)
            cut = kt.top_p_cutoff(z, top_p)
            kept_min = torch.where(z >= cut[:, None], z, float("inf")).amin(-1)
            _same(cut, kept_min, f"top_k={top_k} top_p={top_p}: cut == smallest kept value")
            if top_p in (0.9, 0.5) and not top_k:  # two of the cases: the interpreter is slow
                _each_cut_launch(lambda: kt.top_p_cutoff(z, top_p), cut, f"top_p={top_p}")
    assert torch.isfinite(kt.filter_logits(x, 0, 0.9)[1, :50]).all(), "ties at the top are all kept"


def check_top_p_narrow_start() -> None:
    """Top-p's search starts from the bound near the max (cut._narrow_start): one program a row takes
    fewer than the whole range's 16 passes where the max is high (PASSES_OUT), never more, and finds the
    cut the search over the whole range finds, bitwise; so does the split launch, its passes as launches
    that end once one key is left. A row whose V - 1 tokens sit 10 under its max puts a bound without
    its 1 / V inside (0, max): at top-p 0.9 that bracket would cut them all."""
    from _row_sums_kernel import whole_range

    from miles_kernels._triton import cut as cut_mod

    g = torch.Generator().manual_seed(41)
    V = cut_mod.CHUNK + 300
    x = torch.randn(4, V, generator=g) * 3
    x[0] += 20.0  # max ~30: the bound brackets ~2 binades
    x[2] = 0.0
    x[2, 5] = 10.0  # Z = 1.2 (rel. to the max), cut 0: every token kept
    x[3] = torch.round(x[3])  # ties at the cut
    for top_p in (0.9, 0.5):
        passes = torch.zeros(4, dtype=torch.int32)
        whole_passes = torch.zeros(4, dtype=torch.int32)
        narrow, shipped = cut_mod._narrow_start, cut_mod.CUT_LAUNCH
        try:
            cut_mod.CUT_LAUNCH = ((0, 8, 4, 1, 1),)  # unsnapped: the passes bisect the bracket
            cut = cut_mod.top_p_cutoff(x, top_p, passes)
            cut_mod._narrow_start = whole_range
            _same(cut_mod.top_p_cutoff(x, top_p, whole_passes), cut, f"top_p={top_p}: narrowed vs the whole range")
            cut_mod._narrow_start = narrow
            cut_mod.CUT_LAUNCH = ((0, 8, 4, 2, 1),)
            _same(cut_mod.top_p_cutoff(x, top_p), cut, f"top_p={top_p}: the split launch vs one program a row")
        finally:
            cut_mod._narrow_start, cut_mod.CUT_LAUNCH = narrow, shipped
        _same(cut_mod.top_p_cutoff(x, top_p), cut, f"top_p={top_p}: the shipped launch vs unsnapped")
        assert whole_passes.tolist() == [16] * 4, f"top_p={top_p}: whole-range passes {whole_passes.tolist()}"
        assert cut[2] == (0.0 if top_p == 0.9 else 10.0), f"top_p={top_p}: row 2's cut {cut[2]}"
        assert passes[0] <= 13 and passes.max() <= 16, f"top_p={top_p}: passes {passes.tolist()} (16 unnarrowed)"


def check_cut_snap() -> None:
    """A snapping launch (CUT_LAUNCH's sixth field: each pass's bracket pulled in to the tokens nearest
    its cut points) finds the same cut bits in fewer passes, top-p and top-k: a high max, ties, an
    LM-shaped row, signed zeros at the cut (the cut is -0.0's key), a row of one finite value,
    quarter-step values; a snapping launch over programs a row is refused."""
    from miles_kernels._triton import cut as cut_mod

    g = torch.Generator().manual_seed(43)
    V = cut_mod.CHUNK + 300
    x = torch.randn(6, V, generator=g) * 3
    x[0] += 20.0
    x[1] = torch.round(x[1])  # ties everywhere
    x[2] = torch.randn(V, generator=g) * 2.5
    x[2, :32] = 15 + 3 * torch.randn(32, generator=g)  # a head ~15 over the bulk
    x[3] = 0.0
    x[3, : V // 2] = -0.0
    x[3, :10] = 5.0  # top-p 0.9's cut falls on the zeros
    x[4] = float("-inf")
    x[4, 7] = 1.0
    x[5] = torch.round(x[5] * 4) / 4
    shipped = cut_mod.CUT_LAUNCH
    try:
        for level, count in ((0.9, False), (0.5, False), (0.95, False), (20, True), (1, True)):
            got = {}
            for snap in (0, 1):
                cut_mod.CUT_LAUNCH = ((0, 8, 4, 1, 1, snap),)
                passes = torch.zeros(6, dtype=torch.int32)
                got[snap] = cut_mod._floor(x, level, count, passes), passes
            (plain, plain_passes), (snapped, snap_passes) = got[0], got[1]
            _same(snapped.view(torch.int32), plain.view(torch.int32), f"level {level}: the cut's bits, snapped or not")
            more = f"level {level}: passes {snap_passes.tolist()} snapped vs {plain_passes.tolist()}"
            assert (snap_passes <= plain_passes).all(), more
            assert snap_passes.sum() < plain_passes.sum(), f"level {level}: no fewer passes {snap_passes.tolist()}"
        negative_zero = torch.tensor(-0.0).view(torch.int32).item()
        assert cut_mod.top_p_cutoff(x[3:4], 0.9).view(torch.int32).item() == negative_zero, "the cut on the zeros"
        cut_mod.CUT_LAUNCH = ((0, 8, 4, 2, 1, 1),)
        try:
            cut_mod.top_p_cutoff(x, 0.9)
            raise AssertionError("a snapping launch over 2 programs a row ran")
        except ValueError as e:
            assert "one program a row" in str(e), e
    finally:
        cut_mod.CUT_LAUNCH = shipped


def _each_cut_launch(run, want, what: str) -> None:
    """run() under a chunk a loop step, loads ahead, and a row over 2 / 8 programs (passes as launches) == want."""
    from miles_kernels._triton import cut as cut_mod

    shipped = cut_mod.CUT_LAUNCH
    try:
        for unroll, split, stages in ((1, 1, 3), (4, 2, 2), (1, 8, 1)):
            cut_mod.CUT_LAUNCH = ((0, 8, unroll, split, stages),)
            _same(run(), want, f"{what}: UNROLL {unroll}, SPLIT {split}, STAGES {stages}")
    finally:
        cut_mod.CUT_LAUNCH = shipped


def check_top_k_floor() -> None:
    """cut.top_k_floor (the cut's search with counts) is torch.topk's k-th value bitwise: ties, a
    masked tail, a row with fewer than k finite values (-inf), k = 1; in every launch; and the
    filter with rows.TOPK_BY_CUT masks what torch.topk's floor masks."""
    from miles_kernels._triton import cut as cut_mod
    from miles_kernels._triton import rows as rows_mod

    kt = _kt()
    g = torch.Generator().manual_seed(29)
    V = cut_mod.CHUNK + 300
    x = torch.randn(5, V, generator=g) * 3
    x[1, 100:160] = 5.0  # a tie block across the k-th place
    x[2, 10:] = float("-inf")  # 10 finite values
    x[3, 2000:] = float("-inf")
    x[4] = torch.round(x[4])  # many ties everywhere
    for k in (1, 20, 50):
        want = torch.topk(x, k, dim=-1).values[:, -1]
        got = kt.top_k_floor(x, k)
        _same(got, want, f"top_k_floor k={k} vs torch.topk")
        if k == 20:
            _each_cut_launch(lambda: kt.top_k_floor(x, k), want, f"top_k_floor k={k}")
            _same(kt.top_k_floor(x[1:2], k), want[1:2], f"top_k_floor k={k}: row alone vs in batch")
    assert got[2] == float("-inf"), "fewer than k finite values: -inf (keep them all)"
    for bad in (0, 1 << 24):
        try:
            kt.top_k_floor(x, bad)
        except ValueError as e:
            assert "top_k_floor" in str(e) and "k=" in str(e), str(e)
        else:
            raise AssertionError(f"top_k_floor k={bad} was not refused")
    shipped, masks = rows_mod.TOPK_BY_CUT, {}
    try:
        for by_cut in (True, False):
            rows_mod.TOPK_BY_CUT = by_cut
            masks[by_cut] = kt.filter_logits(x, 20, 0.9)
    finally:
        rows_mod.TOPK_BY_CUT = shipped
    _same(masks[True], masks[False], "filter top_k=20 top_p=0.9 with TOPK_BY_CUT vs torch.topk")


def check_route_topk() -> None:
    kt = _kt()
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(11, 12, generator=g)
    for norm in (False, True):
        w, ids = kt.route_topk(logits, 4, norm)
        p = torch.softmax(logits.double(), -1)
        ref_w, ref_ids = torch.topk(p, 4)
        if norm:
            ref_w = ref_w / ref_w.sum(-1, keepdim=True)
        assert torch.equal(ids, ref_ids), f"route_topk ids (norm={norm}): {ids} vs {ref_ids}"
        _close(w, ref_w, f"route_topk weights (norm={norm})")
        assert w.dtype == torch.float32 and ids.dtype == torch.int64
    tie = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0]])
    _, ids = kt.route_topk(tie, 2, False)
    assert ids.tolist() == [[1, 3]], f"ties must go to the lower expert id, got {ids.tolist()}"


def _paged(k_LKD: torch.Tensor, v_LKD: torch.Tensor, page: int, pages: list[int], n_pages: int):
    """Scatter one sequence's K/V into a fresh cache, on the given (shuffled) pages."""
    L, K, D = k_LKD.shape
    k_cache = torch.full((n_pages, page, K, D), float("nan"))  # unwritten slots must never be read
    v_cache = torch.full((n_pages, page, K, D), float("nan"))
    for pos in range(L):
        k_cache[pages[pos // page], pos % page] = k_LKD[pos]
        v_cache[pages[pos // page], pos % page] = v_LKD[pos]
    return k_cache, v_cache


def _attn_ref(q_THD, k_LKD, v_LKD, q_pos, scale):
    G = q_THD.shape[1] // k_LKD.shape[1]
    k = k_LKD.double().repeat_interleave(G, 1)  # [L, H, D]
    v = v_LKD.double().repeat_interleave(G, 1)
    s = torch.einsum("thd,lhd->htl", q_THD.double(), k) * scale
    s = s.masked_fill(torch.arange(k.shape[0])[None, None, :] > torch.tensor(q_pos)[None, :, None], float("-inf"))
    return torch.einsum("htl,lhd->thd", torch.softmax(s, -1), v)


def _run_attention(kt, q, caches, seqs, scale):
    """seqs: list of (q rows of this chunk, kv_len, pages). Returns o for the packed chunk."""
    cu = torch.tensor([0] + [sum(s[0] for s in seqs[: i + 1]) for i in range(len(seqs))], dtype=torch.int32)
    width = max(len(s[2]) for s in seqs)
    bt = torch.tensor([s[2] + [0] * (width - len(s[2])) for s in seqs], dtype=torch.int32)
    kv = torch.tensor([s[1] for s in seqs], dtype=torch.int32)
    return kt.attention(q, caches[0], caches[1], cu, kv, bt, max(s[0] for s in seqs), scale)


def _check_attention_case(L: int, H: int, K: int, D: int, page: int, chunks: list[int]) -> None:
    kt = _kt()
    g = torch.Generator().manual_seed(L * 7 + H)
    q = torch.randn(L, H, D, generator=g)
    k = torch.randn(L, K, D, generator=g)
    v = torch.randn(L, K, D, generator=g)
    n_pages = -(-L // page) + 3
    pages = torch.randperm(n_pages, generator=g)[: -(-L // page)].tolist()
    caches = _paged(k, v, page, pages, n_pages)
    scale = D**-0.5
    full = _run_attention(kt, q, caches, [(L, L, pages)], scale)
    _close(full, _attn_ref(q, k, v, list(range(L)), scale), f"attention prefill L={L} H={H} K={K}", atol=1e-5)
    start = 0
    for n in chunks:  # chunked prefill: each chunk sees the KV written so far
        got = _run_attention(kt, q[start : start + n], caches, [(n, start + n, pages)], scale)
        _same(got, full[start : start + n], f"chunked prefill rows {start}:{start + n} vs full prefill")
        start += n
    for t in (0, L // 2, L - 1):  # decode: one query at position t
        got = _run_attention(kt, q[t : t + 1], caches, [(1, t + 1, pages)], scale)
        _same(got[0], full[t], f"decode at position {t} vs prefill row")
    # decode batch: the same sequence at three positions at once == each alone
    batch = _run_attention(kt, torch.cat([q[L - 1 : L], q[3:4], q[L // 2 : L // 2 + 1]]), caches,
                           [(1, L, pages), (1, 4, pages), (1, L // 2 + 1, pages)], scale)
    _same(batch[0], full[L - 1], "decode in a batch of 3 vs prefill row")
    _same(batch[1], full[3], "short decode in a batch vs prefill row")
    # mixed batch (fused path): a long chunk next to a decode row
    mixed = _run_attention(kt, torch.cat([q[: L - 1], q[5:6]]), caches, [(L - 1, L - 1, pages), (1, 6, pages)], scale)
    _same(mixed[: L - 1], full[: L - 1], "prefill in a mixed batch vs alone")
    _same(mixed[L - 1], full[5], "decode row in a mixed batch vs prefill row")


def check_attention_gqa() -> None:
    _check_attention_case(L=45, H=4, K=2, D=16, page=16, chunks=[13, 4, 20, 8])


def check_attention_odd_group() -> None:
    _check_attention_case(L=33, H=6, K=2, D=8, page=32, chunks=[1, 16, 16])  # G=3 padded to 4


def check_attention_many_splits() -> None:
    """Shrink KV_SPLIT so decode merges several split states; must still equal prefill, whether
    each split has its own program, a program walks several (p, p + P, ...), or one program
    walks them all (DECODE_PROGRAMS reached by the (sequence, kv head) pairs alone)."""
    from miles_kernels._triton import paged_attention as attn_mod

    saved = attn_mod.KV_BLOCK, attn_mod.KV_SPLIT, attn_mod.DECODE_PROGRAMS
    attn_mod.KV_BLOCK, attn_mod.KV_SPLIT = 16, 32
    try:
        for programs in (1024, 2, 1):
            attn_mod.DECODE_PROGRAMS = programs
            _check_attention_case(L=90, H=2, K=1, D=16, page=32, chunks=[40, 7, 43])
    finally:
        attn_mod.KV_BLOCK, attn_mod.KV_SPLIT, attn_mod.DECODE_PROGRAMS = saved


def _packed_qkv(lens: list[int], H: int, K: int, D: int, g: torch.Generator):
    """Random q [T, H, D], k / v [T, K, D] of sequences of `lens` packed, and their cu_seqlens."""
    T = sum(lens)
    q, k, v = (torch.randn(T, n, D, generator=g) for n in (H, K, K))
    return T, q, k, v, torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def _walk_case(seed: int):
    """Packed sequences (4 q heads, 2 kv heads, D 16), the first one also on shuffled pages of 16
    (unwritten slots NaN), and decode positions in it: 1 to 3 splits of 32, some cut short.
    Returns (H, K, D, lens, T, q, k, v, cu, L, pages, caches, at)."""
    g = torch.Generator().manual_seed(seed)
    H, K, D, page = 4, 2, 16, 16
    lens = [90, 1, 64, 33, 100]
    T, q, k, v, cu = _packed_qkv(lens, H, K, D, g)
    L = lens[0]
    pages = torch.randperm(-(-L // page) + 2, generator=g)[: -(-L // page)].tolist()
    caches = _paged(k[:L], v[:L], page, pages, -(-L // page) + 2)
    return H, K, D, lens, T, q, k, v, cu, L, pages, caches, [L - 1, 3, 40, 63, 64, 70]


def check_walks_agree() -> None:
    """WALK "one" (every split in one loop), "splits" (a loop per split) and "auto" give the same bits:
    paged prefill and chunks (mask-free and masked blocks, a split cut short), packed training
    sequences with the LSE, and one-program decode in both decode tiles."""
    from miles_kernels._triton import paged_attention as attn_mod

    kt = _kt()
    H, K, D, lens, T, q, k, v, cu, L, pages, caches, at = _walk_case(11)
    saved = attn_mod.KV_BLOCK, attn_mod.KV_SPLIT, attn_mod.WALK, attn_mod.DECODE_PROGRAMS, attn_mod.DECODE_TILE
    attn_mod.KV_BLOCK, attn_mod.KV_SPLIT, attn_mod.DECODE_PROGRAMS = 16, 32, 1  # decode: one program a pair
    out = {}
    try:
        for walk in ("one", "splits", "auto"):  # auto here: one, but splits in the swapped tile (12 pairs)
            attn_mod.WALK = walk
            lse = torch.empty(H, T)
            got = [kt.packed_attention(q, k, v, cu, max(lens), D**-0.5, lse_HT=lse), lse,
                   _run_attention(kt, q[:L], caches, [(L, L, pages)], D**-0.5),
                   _run_attention(kt, q[40:L], caches, [(L - 40, L, pages)], D**-0.5)]
            for tile in ("rows", "swapped"):
                attn_mod.DECODE_TILE = tile
                got.append(_run_attention(kt, q[at], caches, [(1, t + 1, pages) for t in at], D**-0.5))
            out[walk] = got
        attn_mod.WALK = "bogus"
        try:
            kt.packed_attention(q, k, v, cu, max(lens), D**-0.5)
            raise AssertionError("WALK 'bogus' was not refused")
        except ValueError as e:
            assert "WALK 'bogus'" in str(e), e
    finally:
        attn_mod.KV_BLOCK, attn_mod.KV_SPLIT, attn_mod.WALK, attn_mod.DECODE_PROGRAMS, attn_mod.DECODE_TILE = saved
    names = ("packed", "lse", "paged prefill", "chunk", "decode (rows tile)", "decode (swapped tile)")
    for walk in ("one", "auto"):
        for name, a, b in zip(names, out[walk], out["splits"], strict=True):
            _same(a, b, f"WALK {walk} vs splits: {name}")
    _close(out["one"][2], _attn_ref(q[:L], k[:L], v[:L], list(range(L)), D**-0.5), "one-loop prefill", atol=1e-5)
    for tile in (4, 5):
        _same(out["one"][tile], out["one"][2][at], f"one-loop decode ({names[tile]}) vs prefill rows")


def check_kv_tma_agrees() -> None:
    """K/V read by TMA descriptors (KV_TMA: packed; PAGED_KV_TMA: paged caches) give the pointer
    walk's bits: packed sequences with the LSE, paged prefill and a chunk, decode in both tiles
    with split programs and with one program a pair; the caches' unwritten slots hold NaN, which
    the masked blocks must zero as the pointer loads do."""
    from miles_kernels._triton import paged_attention as attn_mod

    kt = _kt()
    H, K, D, lens, T, q, k, v, cu, L, pages, caches, at = _walk_case(12)
    names = ["packed", "lse", "paged prefill", "chunk"] + [f"decode ({tile}, {programs} programs)"
                                                           for programs in (1024, 1) for tile in ("rows", "swapped")]
    saved = (attn_mod.KV_BLOCK, attn_mod.KV_SPLIT, attn_mod.KV_TMA, attn_mod.PAGED_KV_TMA, attn_mod.DECODE_PROGRAMS,
             attn_mod.DECODE_TILE, attn_mod._kv_descriptors)
    made = []

    def spy(k_, v_, enabled):
        made.append(saved[-1](k_, v_, enabled))
        return made[-1]

    attn_mod.KV_BLOCK, attn_mod.KV_SPLIT, attn_mod._kv_descriptors = 16, 32, spy
    out = {}
    try:
        for tma in (False, True, "prefill"):  # "prefill": the paged prefill walks by TMA, decode by pointers
            attn_mod.KV_TMA = bool(tma)
            attn_mod.PAGED_KV_TMA = {"prefill": bool(tma), "decode": tma is True}
            made.clear()
            lse = torch.empty(H, T)
            got = [kt.packed_attention(q, k, v, cu, max(lens), D**-0.5, lse_HT=lse), lse,
                   _run_attention(kt, q[:L], caches, [(L, L, pages)], D**-0.5),
                   _run_attention(kt, q[40:L], caches, [(L - 40, L, pages)], D**-0.5)]
            for programs in (1024, 1):
                attn_mod.DECODE_PROGRAMS = programs
                for tile in ("rows", "swapped"):
                    attn_mod.DECODE_TILE = tile
                    got.append(_run_attention(kt, q[at], caches, [(1, t + 1, pages) for t in at], D**-0.5))
            asked = [bool(tma)] * 3 + [tma is True] * 4  # packed, paged prefill, chunk; the 4 decodes
            assert [d is not None for d in made] == asked, f"descriptors not made as asked ({tma})"
            out[tma] = got
        empty = kt.packed_attention(q[:0], k[:0], v[:0], torch.zeros(2, dtype=torch.int32), 0, D**-0.5)
        assert empty.shape == (0, H, D), "an empty pack with KV_TMA on"
    finally:
        (attn_mod.KV_BLOCK, attn_mod.KV_SPLIT, attn_mod.KV_TMA, attn_mod.PAGED_KV_TMA, attn_mod.DECODE_PROGRAMS,
         attn_mod.DECODE_TILE, attn_mod._kv_descriptors) = saved
    for way in (True, "prefill"):
        for name, a, b in zip(names, out[way], out[False], strict=True):
            _same(a, b, f"TMA ({way}) vs pointers: {name}")
    assert not out[True][2].isnan().any(), "NaN from the cache's unwritten slots"


def check_attention_kv_block_spans_pages() -> None:
    """A KV block wider than a page gathers each token's page; still prefill == chunked == decode."""
    from miles_kernels._triton import paged_attention as attn_mod

    saved = attn_mod.KV_BLOCK, attn_mod.KV_SPLIT
    attn_mod.KV_BLOCK, attn_mod.KV_SPLIT = 32, 64
    try:
        _check_attention_case(L=90, H=4, K=2, D=16, page=16, chunks=[40, 7, 43])
    finally:
        attn_mod.KV_BLOCK, attn_mod.KV_SPLIT = saved


def check_row_sums_order_free() -> None:
    """attn_parts.exact_sum and fixed_sum (ROW_SUM "exact", "fixed"): the same bits for any
    order of the terms, within 64 * 2**-37 (exact) / 64 * 2**-24 (fixed) (+ one rounding) of
    the float64 sum, on softmax-like rows (one 1, the rest spread over 40 binades: what a long
    context adds); fixed_sum's terms are p rounded to a multiple of 2**-23, summed exactly."""
    from _row_sums_kernel import row_sums

    g = torch.Generator().manual_seed(0)
    p = torch.exp2(-40 * torch.rand(64, 64, generator=g))
    p[:, 0] = 1.0
    p[1] = 1.0  # the largest sum, 64
    p[2, 1:] = 2.0**-24  # ties: round half to even (to 0)
    for fixed, tol in ((False, 64 * 2.0**-37), (True, 64 * 2.0**-24)):
        outs = []
        for perm in (torch.arange(64), torch.randperm(64, generator=g), torch.arange(63, -1, -1)):
            o = torch.empty(64)
            row_sums[(1,)](p[:, perm].contiguous(), o, fixed)
            outs.append(o)
        for o in outs[1:]:
            _same(o, outs[0], f"{'fixed' if fixed else 'exact'}_sum of permuted terms")
        err = (outs[0].double() - p.double().sum(1)).abs().max().item()
        assert err <= tol + 2.0**-22, f"{'fixed' if fixed else 'exact'}_sum vs float64: {err}"
        if fixed:
            q = torch.round(p.double() * 2.0**23).sum(1) * 2.0**-23
            _same(outs[0], q.float(), "fixed_sum vs the float64 sum of p rounded to 2**-23")



def pair_tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Rows of fp32 x [R, 2**k] summed as cut._tree_sum sums them: adjacent pairs, level by level."""
    while x.shape[-1] > 1:
        x = x[:, 0::2] + x[:, 1::2]
    return x[:, 0]


def check_tree_sum() -> None:
    """cut._tree_sum (the top-p cut's sums over its lanes) is the adjacent-pair tree, bit for bit,
    on terms spread over 60 binades (where other orders give other sums: checked)."""
    from _row_sums_kernel import tree_sums

    g = torch.Generator().manual_seed(3)
    x = torch.exp2(60 * torch.rand(8, 4096, generator=g) - 50) * (torch.rand(8, 4096, generator=g) + 0.5)
    x[1, ::7] = 0.0
    o = torch.empty(8)
    tree_sums[(8,)](x, o, 12)
    want = pair_tree_sum(x)
    _same(o, want, "_tree_sum vs the adjacent-pair tree")
    halves = x.clone()
    while halves.shape[-1] > 1:  # another fixed tree (first half + second half): other bits on these rows
        n = halves.shape[-1] // 2
        halves = halves[:, :n] + halves[:, n:]
    assert not torch.equal(halves[:, 0], want), "the rows do not tell one tree from another"

class _Launches:
    """Counts launches of a Triton kernel (kernel[grid](...)) and passes them on."""

    def __init__(self, kernel):
        self.kernel, self.n, self.grids = kernel, 0, []

    def __getitem__(self, grid):
        self.n += 1
        self.grids.append(grid)
        return self.kernel[grid]


def check_attention_decode_pairs() -> None:
    """DECODE_PAIRS 2 (a swapped-tile decode program walks two (sequence, kv head) pairs in one loop)
    == one pair a program, output and LSE bitwise, and == the prefill's rows: decode rows over several
    splits and pages, verify chunks, an empty chunk, an odd count of pairs (the last program's second
    pair absent), the caches read by TMA too; half the programs launched; DECODE_PAIRS 3 refused."""
    from miles_kernels._triton import paged_attention as attn_mod

    kt = _kt()
    names = ("DECODE_TILE", "ROW_SUM", "KV_BLOCK", "KV_SPLIT", "DECODE_PROGRAMS", "WALK", "DECODE_PAIRS",
             "DECODE_PAIRS_MIN", "DECODE_PAIRS_MAX", "PAGED_KV_TMA", "decode_kernel", "decode_pairs_kernel")
    saved = {n: getattr(attn_mod, n) for n in names}
    launches = {1: _Launches(attn_mod.decode_kernel), 2: _Launches(attn_mod.decode_pairs_kernel)}
    attn_mod.decode_kernel, attn_mod.decode_pairs_kernel = launches[1], launches[2]
    attn_mod.DECODE_TILE, attn_mod.ROW_SUM, attn_mod.KV_BLOCK, attn_mod.KV_SPLIT = "swapped", "fixed", 16, 32
    attn_mod.DECODE_PROGRAMS, attn_mod.WALK, attn_mod.DECODE_PAIRS_MIN, attn_mod.DECODE_PAIRS_MAX = 1, "one", 1, 1 << 30
    g = torch.Generator().manual_seed(17)
    L, D, page = 90, 16, 16
    pages = torch.randperm(L // page + 3, generator=g)[: L // page + 1].tolist()
    try:
        for H, K in ((4, 2), (3, 1)):
            q, k, v = (torch.randn(L, n, D, generator=g) * 2 for n in (H, K, K))
            caches = _paged(k, v, page, pages, L // page + 3)
            bt1 = torch.tensor([pages], dtype=torch.int32)
            lse_full = torch.empty(H, L)
            cu1, kv1 = torch.tensor([0, L], dtype=torch.int32), torch.tensor([L], dtype=torch.int32)
            full = kt.attention(q, *caches, cu1, kv1, bt1, L, D**-0.5, lse_HT=lse_full)
            for chunks in (((1, 1), (1, 17), (1, 32), (1, 33), (1, 90)), ((3, 50), (0, 20), (1, 90), (2, 64))):
                rows = [t for n, end in chunks for t in range(end - n, end)]
                cu = torch.tensor([0] + [n for n, _ in chunks], dtype=torch.int32).cumsum(0).to(torch.int32)
                kv = torch.tensor([end for _, end in chunks], dtype=torch.int32)
                bt = bt1.expand(len(chunks), -1).contiguous()
                got = {}
                for pairs, tma in ((1, False), (2, False), (2, True)):  # TMA: the caches read by descriptors
                    attn_mod.DECODE_PAIRS, attn_mod.PAGED_KV_TMA = pairs, {"prefill": False, "decode": tma}
                    lse = torch.empty(H, len(rows))
                    n0 = len(launches[pairs].grids)
                    out = kt.attention(q[rows], *caches, cu, kv, bt, max(n for n, _ in chunks), D**-0.5, lse_HT=lse)
                    grids = launches[pairs].grids[n0:]
                    assert [gr[0] for gr in grids] == [-(-len(chunks) * K // pairs)], (pairs, grids)
                    got[pairs, tma] = out, lse
                what = f"H {H} K {K} chunks {chunks}"
                for key in ((2, False), (2, True)):
                    _same(got[key][0], got[1, False][0], f"decode two pairs a program {key} vs one: {what}")
                    _same(got[key][1], got[1, False][1], f"decode two pairs a program {key} vs one, LSE: {what}")
                _same(got[2, False][0], full[rows], f"decode two pairs a program vs prefill rows: {what}")
                _same(got[2, False][1], lse_full[:, rows], f"decode two pairs a program vs prefill LSE: {what}")
        attn_mod.DECODE_PAIRS = 3
        try:
            _run_attention(kt, q[:1], caches, [(1, 1, pages)], D**-0.5)
        except ValueError as e:
            assert "DECODE_PAIRS 3" in str(e), e
        else:
            raise AssertionError("DECODE_PAIRS 3 was not refused")
    finally:
        for n, val in saved.items():
            setattr(attn_mod, n, val)


def check_pdl_rows_reach_each_row_kernel() -> None:
    """Every kernel that takes USE_GDC but the TMA linears asks launch.gdc_rows with its launch's rows
    (tokens; sequences for decode attention) and its limit (the norms PDL_NORM_MAX_ROWS), and gets False on
    the CPU: rms_norm, add_rms_norm, qk_norm_rope, and by pointers linear, linears and swiglu; decode attention
    one and two pairs a program."""
    from miles_kernels._triton import fused_linears as fl
    from miles_kernels._triton import launch
    from miles_kernels._triton import matmul as lin
    from miles_kernels._triton import paged_attention as attn_mod

    kt = _kt()
    asked, sites, limits, gdc_rows = [], [], [], launch.gdc_rows
    site_of = _bench_module("pdl_sites").site_of  # the launcher each site limit of tools/bench/pdl_sites.py names

    def ask(x, rows, limit=None):
        got = gdc_rows(x, rows, limit)
        assert got is False, f"gdc_rows gave {got} for a CPU tensor"
        asked.append(rows)
        limits.append(limit)
        sites.append(site_of(sys._getframe(1)))
        return got

    names = ("DECODE_TILE", "ROW_SUM", "KV_BLOCK", "KV_SPLIT", "DECODE_PROGRAMS", "WALK", "DECODE_PAIRS",
             "DECODE_PAIRS_MIN", "DECODE_PAIRS_MAX", "PAGED_KV_TMA")
    saved = {n: getattr(attn_mod, n) for n in names}
    saved_tiles, saved_tma = dict(lin.SMALL_M_TILES), fl.SMALL_M_TMA
    launch.gdc_rows, fl.SMALL_M_TMA = ask, False
    lin.SMALL_M_TILES[torch.float32] = (lin.Tile(64, 16, 16, 32, 1, 4, 2),)
    attn_mod.DECODE_TILE, attn_mod.ROW_SUM, attn_mod.KV_BLOCK, attn_mod.KV_SPLIT = "swapped", "fixed", 16, 32
    attn_mod.DECODE_PROGRAMS, attn_mod.WALK, attn_mod.DECODE_PAIRS_MIN, attn_mod.DECODE_PAIRS_MAX = 1, "one", 1, 1 << 30
    attn_mod.PAGED_KV_TMA = {"prefill": False, "decode": False}
    g = torch.Generator().manual_seed(23)
    x, w = torch.randn(5, 32, generator=g), 1 + 0.1 * torch.randn(32, generator=g)
    ws = [torch.randn(n, 32, generator=g) for n in (24, 16, 16)]
    q, k = torch.randn(3, 4, 16, generator=g), torch.randn(3, 2, 16, generator=g)
    cos, sin = _rope_tables(3, 16)
    L, page = 40, 16
    pages = [2, 0, 3]
    caches = _paged(torch.randn(L, 2, 16, generator=g), torch.randn(L, 2, 16, generator=g), page, pages, 4)
    decode = [(1, end, pages) for end in (17, 40, 33)]
    calls = {"rms_norm": (lambda: kt.rms_norm(x, w, 1e-6), [5]),
             "add_rms_norm": (lambda: kt.add_rms_norm(x, x, w, 1e-6), [5]),
             "qk_norm_rope": (lambda: kt.qk_norm_rope(q, k, w[:16], w[16:], cos, sin, 1e-6), [3]),
             "linear": (lambda: lin.linear(x, ws[0]), [5]),
             "linears": (lambda: fl.linears(x, tuple(ws)), [5]),
             "swiglu": (lambda: fl.swiglu(x, ws[1], ws[2]), [5])}
    for pairs in (1, 2):
        calls[f"decode attention, {pairs} pairs a program"] = (
            lambda pairs=pairs: (setattr(attn_mod, "DECODE_PAIRS", pairs),
                                 _run_attention(kt, torch.randn(3, 4, 16, generator=g), caches, decode, 0.25)), [3])
    try:
        for what, (call, rows) in calls.items():
            asked.clear()
            sites.clear()
            limits.clear()
            call()
            assert asked == rows, f"{what}: gdc_rows asked for {asked} rows, want {rows}"
            limit = launch.PDL_NORM_MAX_ROWS if what in ("rms_norm", "add_rms_norm") else None  # None: PDL_MAX_ROWS
            assert limits == [limit] * len(rows), f"{what}: gdc_rows asked with limit {limits}, want {limit}"
            site = "attention" if what.startswith("decode attention") else what
            assert sites == [site] * len(rows), f"{what}: pdl_sites.py reads the site as {sites}, want {site}"
    finally:
        launch.gdc_rows, fl.SMALL_M_TMA = gdc_rows, saved_tma
        lin.SMALL_M_TILES.clear()
        lin.SMALL_M_TILES.update(saved_tiles)
        for n, val in saved.items():
            setattr(attn_mod, n, val)


def check_attention_swapped_decode() -> None:
    """DECODE_TILE "swapped" (decode_attention.py) with each shared row sum (ROW_SUM "dot",
    "exact", "fixed"): prefill == chunked == decode, alone and batched, in one program, split programs
    and programs walking several splits, LSE included (bitwise); "reduce" is refused there (and
    checked in the 64-row tile); "auto" picks the tile by (sequence, kv head) pairs."""
    from miles_kernels._triton import paged_attention as attn_mod

    kt = _kt()
    saved = attn_mod.ROW_SUM, attn_mod.DECODE_TILE, attn_mod.decode_kernel, attn_mod.KV_BLOCK, attn_mod.KV_SPLIT, \
        attn_mod.DECODE_PROGRAMS
    launches = attn_mod.decode_kernel = _Launches(attn_mod.decode_kernel)
    g = torch.Generator().manual_seed(5)
    L, H, K, D, page = 90, 4, 2, 16, 16
    q, k, v = (torch.randn(L, n, D, generator=g) * 2 for n in (H, K, K))
    caches = _paged(k, v, page, list(range(L // page + 1)), L // page + 1)
    pages = list(range(L // page + 1))
    try:
        attn_mod.DECODE_TILE, attn_mod.ROW_SUM = "swapped", "reduce"
        try:
            _run_attention(kt, q[:1], caches, [(1, 1, pages)], D**-0.5)
            raise AssertionError("DECODE_TILE swapped with ROW_SUM reduce must be refused")
        except ValueError as e:
            assert "ROW_SUM" in str(e), e
        for tile, mode in (("bogus", "fixed"), ("auto", "bogus")):
            attn_mod.DECODE_TILE, attn_mod.ROW_SUM = tile, mode
            try:
                _run_attention(kt, q[:1], caches, [(1, 1, pages)], D**-0.5)
                raise AssertionError(f"DECODE_TILE {tile!r}, ROW_SUM {mode!r} must be refused")
            except ValueError as e:
                assert "bogus" in str(e), e
        attn_mod.DECODE_TILE, attn_mod.ROW_SUM = "rows", "reduce"  # the register row sums: 64-row tile only
        check_attention_gqa()
        attn_mod.DECODE_TILE = "swapped"
        for mode in ("dot", "exact", "fixed"):
            attn_mod.ROW_SUM = mode
            check_attention_gqa()
            check_attention_kv_block_spans_pages()
            check_attention_many_splits()
            attn_mod.KV_BLOCK, attn_mod.KV_SPLIT = 16, 32
            cu = torch.tensor([0, L], dtype=torch.int32)
            bt = torch.tensor([pages], dtype=torch.int32)
            lse = torch.empty(H, L)
            full = kt.attention(q, *caches, cu, torch.tensor([L], dtype=torch.int32), bt, L, D**-0.5, lse_HT=lse)
            rows = [0, 15, 16, 47, 48, 89]
            for programs in (1024, 2, 1):
                attn_mod.DECODE_PROGRAMS = programs
                lse_d = torch.empty(H, len(rows))
                out = kt.attention(q[rows], *caches, torch.arange(len(rows) + 1, dtype=torch.int32),
                                   torch.tensor([t + 1 for t in rows], dtype=torch.int32),
                                   bt.expand(len(rows), -1).contiguous(), 1, D**-0.5, lse_HT=lse_d)
                _same(out, full[rows], f"swapped decode ({mode}, DECODE_PROGRAMS {programs}) vs prefill rows")
                _same(lse_d, lse[:, rows], f"swapped decode LSE ({mode}, DECODE_PROGRAMS {programs}) vs prefill")
            attn_mod.KV_BLOCK, attn_mod.KV_SPLIT, attn_mod.DECODE_PROGRAMS = saved[3:]
        assert launches.n > 0, "the swapped decode kernel never ran"
        # "auto": the swapped tile from SWAPPED_MIN_PAIRS (sequence, kv head) pairs on, same bits either way
        attn_mod.DECODE_TILE, saved_min = "auto", attn_mod.SWAPPED_MIN_PAIRS
        try:
            for mode, min_pairs, swapped in (("fixed", 4, True), ("fixed", 5, False), ("reduce", 1, False)):
                attn_mod.ROW_SUM, attn_mod.SWAPPED_MIN_PAIRS = mode, min_pairs
                n0 = launches.n
                out = _run_attention(kt, q[[30, 60]], caches, [(1, 31, pages), (1, 61, pages)], D**-0.5)
                assert (launches.n > n0) == swapped, f"auto with {min_pairs} pairs, {mode}: swapped {not swapped}"
                attn_mod.DECODE_TILE = "rows"
                _same(out, _run_attention(kt, q[[30, 60]], caches, [(1, 31, pages), (1, 61, pages)], D**-0.5),
                      f"auto ({mode}) vs rows")
                attn_mod.DECODE_TILE = "auto"
        finally:
            attn_mod.SWAPPED_MIN_PAIRS = saved_min
    finally:
        (attn_mod.ROW_SUM, attn_mod.DECODE_TILE, attn_mod.decode_kernel, attn_mod.KV_BLOCK, attn_mod.KV_SPLIT,
         attn_mod.DECODE_PROGRAMS) = saved


def check_attention_lse() -> None:
    """lse_HT: each row's natural-log log-sum-exp of its scaled causal scores ([H, T], flash's
    layout), from the fused path (a packed prefill of two sequences) and the split-parallel
    path (decode rows, several splits); the output's bits are the same with or without it."""
    from miles_kernels._triton import paged_attention as attn_mod

    kt = _kt()
    g = torch.Generator().manual_seed(21)
    H, K, D, page = 4, 2, 16, 16
    lens = [37, 20]
    saved = attn_mod.KV_BLOCK, attn_mod.KV_SPLIT
    attn_mod.KV_BLOCK, attn_mod.KV_SPLIT = 16, 32  # decode rows merge several split states
    try:
        for decode in (False, True):
            qs, ks, vs, seqs, refs = [], [], [], [], []
            for i, L in enumerate(lens):
                q, k, v = (torch.randn(L, n, D, generator=g) for n in (H, K, K))
                pages = list(range(i * 3, i * 3 + 3))
                caches_i = _paged(k, v, page, pages, 6)
                rows = slice(L - 1, L) if decode else slice(0, L)
                qs.append(q[rows])
                ks.append(caches_i[0][pages[0]: pages[-1] + 1])
                vs.append(caches_i[1][pages[0]: pages[-1] + 1])
                seqs.append((rows.stop - rows.start, L, pages))
                s_ = torch.einsum("thd,lhd->htl", q.double(), k.double().repeat_interleave(H // K, 1)) * D**-0.5
                s_ = s_.masked_fill(torch.arange(L)[None, None, :] > torch.arange(L)[None, :, None], float("-inf"))
                refs.append(torch.logsumexp(s_, -1)[:, rows])
            caches = (torch.cat(ks), torch.cat(vs))
            q = torch.cat(qs)
            lse = torch.full((H, q.shape[0]), float("nan"))
            cu = torch.tensor([0, seqs[0][0], seqs[0][0] + seqs[1][0]], dtype=torch.int32)
            kv = torch.tensor(lens, dtype=torch.int32)
            bt = torch.tensor([s_[2] for s_ in seqs], dtype=torch.int32)
            out = kt.attention(q, *caches, cu, kv, bt, max(s_[0] for s_ in seqs), D**-0.5, lse_HT=lse)
            _same(out, kt.attention(q, *caches, cu, kv, bt, max(s_[0] for s_ in seqs), D**-0.5),
                  "attention output with lse_HT vs without")
            _close(lse, torch.cat(refs, 1), f"attention lse ({'decode' if decode else 'prefill'})", atol=1e-5)
    finally:
        attn_mod.KV_BLOCK, attn_mod.KV_SPLIT = saved


def check_packed_attention() -> None:
    """packed_attention (training: whole sequences read from the packed K/V, no cache) gives
    the paged kernel's bits (each sequence on its own shuffled pages), LSE included, across
    several splits and the mask-free / masked blocks, reading K/V by TMA descriptors (also
    from views of a fused projection) or by pointers; and is accurate."""
    from miles_kernels._triton import paged_attention as attn_mod

    kt = _kt()
    g = torch.Generator().manual_seed(5)
    H, K, D, page = 4, 2, 16, 16
    lens = [45, 1, 70, 16, 33]
    T, q, k, v, cu = _packed_qkv(lens, H, K, D, g)
    saved = attn_mod.KV_BLOCK, attn_mod.KV_SPLIT, attn_mod.KV_TMA
    attn_mod.KV_BLOCK, attn_mod.KV_SPLIT = 16, 32
    try:
        n_pages = sum(-(-L // page) for L in lens) + 2
        order = torch.randperm(n_pages, generator=g).tolist()
        k_cache = torch.full((n_pages, page, K, D), float("nan"))
        v_cache = torch.full((n_pages, page, K, D), float("nan"))
        tables, used = [], 0
        for b, L in enumerate(lens):
            pages = order[used: used + -(-L // page)]
            used += len(pages)
            kc, vc = _paged(k[cu[b]:cu[b + 1]], v[cu[b]:cu[b + 1]], page, pages, n_pages)
            for pg in pages:
                k_cache[pg], v_cache[pg] = kc[pg], vc[pg]
            tables.append(pages)
        width = max(len(t) for t in tables)
        bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        lse_p = torch.full((H, T), float("nan"))
        paged = kt.attention(q, k_cache, v_cache, cu, torch.tensor(lens, dtype=torch.int32), bt, max(lens), D**-0.5,
                             lse_HT=lse_p)
        # K/V as views of one fused [T, (H + 2K) * D] projection (the row stride is not K * D)
        qkv = torch.cat([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)], 1)
        k_view, v_view = qkv[:, H * D:(H + K) * D].view(T, K, D), qkv[:, (H + K) * D:].view(T, K, D)
        for tma, kk, vv in ((True, k, v), (True, k_view, v_view), (False, k, v)):
            attn_mod.KV_TMA = tma
            made = attn_mod._kv_descriptors(kk, vv, attn_mod.KV_TMA)
            assert (made is not None) == tma, "the descriptor walk was not taken"
            lse_c = torch.full((H, T), float("nan"))
            packed = kt.packed_attention(q, kk, vv, cu, max(lens), D**-0.5, lse_HT=lse_c)
            _same(packed, paged, f"packed_attention (KV_TMA {tma}, row stride {kk.stride(0)}) vs the paged kernel")
            _same(lse_c, lse_p, f"packed_attention LSE (KV_TMA {tma}) vs the paged kernel's")
        for b, L in enumerate(lens):
            rows = slice(int(cu[b]), int(cu[b + 1]))
            _close(packed[rows], _attn_ref(q[rows], k[rows], v[rows], list(range(L)), D**-0.5),
                   f"packed_attention sequence {b} (L={L})", atol=1e-5)
    finally:
        attn_mod.KV_BLOCK, attn_mod.KV_SPLIT, attn_mod.KV_TMA = saved


def _packed_attn64(lens: list[int], scale: float):
    """Causal GQA attention of packed sequences in float64 (autograd's reference)."""
    def fn(q, k, v):
        outs, lo = [], 0
        for L in lens:
            rows = slice(lo, lo + L)
            outs.append(_attn_ref(q[rows], k[rows], v[rows], list(range(L)), scale))
            lo += L
        return torch.cat(outs)
    return fn


def _check_attention_bwd_case(lens: list[int], H: int, K: int, D: int, scale: float, seed: int, tiles=None) -> None:
    """Gradients from the forward's own output and LSE (packed_attention) vs float64 autograd."""
    from miles_kernels._triton import attention_bwd as bwd_mod

    kt = _kt()
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q, k, v = (torch.randn(T, n, D, generator=g) for n in (H, K, K))
    dout = torch.randn(T, H, D, generator=g)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    lse = torch.full((H, T), float("nan"))
    out = kt.packed_attention(q, k, v, cu, max(lens), scale, lse_HT=lse)
    want = _autograd64(_packed_attn64(lens, scale), (q, k, v), dout)
    tiles = tiles or {}
    got = bwd_mod.packed_attention_bwd(q, k, v, out, dout, lse, cu, max(lens), scale, **tiles)
    for name, a, r in zip(("dq", "dk", "dv"), got, want):
        assert a.dtype == torch.float32 and a.shape == r.shape, f"{name}: {a.dtype} {list(a.shape)}"
        _close_rel(a, r, f"attention bwd {name} (lens {lens}, H={H}, K={K}, D={D}, tiles {tiles})", rel=5e-6)
    for tma in (False, True):  # the loops' operands by TMA descriptors or by pointers: the same bits
        for name, a, b in zip(("dq", "dk", "dv"), got, _bwd_tma(tma, q, k, v, out, dout, lse, cu, lens, scale, tiles)):
            _same(a, b, f"attention bwd {name} with DKDV_TMA = DQ_TMA = {tma} vs the defaults (lens {lens})")


def _bwd_tma(tma: bool, q, k, v, out, dout, lse, cu, lens, scale, tiles=None):
    """packed_attention_bwd with DKDV_TMA = DQ_TMA = tma."""
    from miles_kernels._triton import attention_bwd as bwd_mod

    saved = bwd_mod.DKDV_TMA, bwd_mod.DQ_TMA
    bwd_mod.DKDV_TMA = bwd_mod.DQ_TMA = tma
    try:
        return bwd_mod.packed_attention_bwd(q, k, v, out, dout, lse, cu, max(lens), scale, **(tiles or {}))
    finally:
        bwd_mod.DKDV_TMA, bwd_mod.DQ_TMA = saved


def check_attention_bwd() -> None:
    """packed_attention_bwd: dq, dk, dv of several packed sequences of odd lengths (a lone
    token, partial blocks, mask-free blocks) vs float64 autograd, GQA 2 and 4."""
    _check_attention_bwd_case([1, 17, 45], H=4, K=2, D=16, scale=16**-0.5, seed=31)
    _check_attention_bwd_case([45, 1, 33], H=8, K=2, D=32, scale=0.3, seed=32)


def check_attention_bwd_nan_neighbour() -> None:
    """A sequence of NaNs packed after another leaves the first one's output (K/V read by TMA)
    and grads finite, the grads the same with the backward's operands read by TMA (the masked
    rows zeroed) or by pointers."""
    kt = _kt()
    g = torch.Generator().manual_seed(35)
    lens, H, K, D = [21, 40], 4, 2, 16
    T, q, k, v, cu = _packed_qkv(lens, H, K, D, g)
    dout = torch.randn(T, H, D, generator=g)
    for x in (q, k, v, dout):
        x[lens[0]:] = float("nan")
    lse = torch.full((H, T), float("nan"))
    out = kt.packed_attention(q, k, v, cu, max(lens), D**-0.5, lse_HT=lse)  # K/V by TMA (KV_TMA)
    assert out[: lens[0]].isfinite().all(), "the forward took the NaN neighbour's K/V rows"
    grads = [_bwd_tma(tma, q, k, v, out, dout, lse, cu, lens, D**-0.5) for tma in (True, False)]
    for name, a, b in zip(("dq", "dk", "dv"), *grads):
        assert a[: lens[0]].isfinite().all(), f"{name} of the first sequence took the NaN neighbour's rows"
        _same(a[: lens[0]], b[: lens[0]], f"{name} of the first sequence, TMA vs pointers")


def check_attention_bwd_uneven_tiles() -> None:
    """Tiles with BLOCK_M != BLOCK_N (the diagonal then spans several steps, or a step spans
    several diagonals) give the same gradients, passed as overrides (as the benchmark's sweep
    does); an empty sequence in the pack is skipped."""
    from miles_kernels._triton.attention_bwd import Tile

    _check_attention_bwd_case([40, 0, 3, 21], H=6, K=2, D=16, scale=0.25, seed=33,
                              tiles=dict(dkdv_tile=Tile(16, 32, 4, 1), dq_tile=Tile(32, 16, 4, 1)))
    _check_attention_bwd_case([40, 3, 21], H=6, K=2, D=16, scale=0.25, seed=33,
                              tiles=dict(dkdv_tile=Tile(32, 16, 4, 1), dq_tile=Tile(16, 32, 4, 1)))


def check_matches_cpu_reference() -> None:
    """Triton and the CPU implementation (miles_kernels._cpu) agree within fp32 tolerance."""
    from miles_kernels import _cpu
    from miles_kernels.meta import AttnMeta

    kt = _kt()
    g = torch.Generator().manual_seed(8)
    x, w, b = torch.randn(19, 48, generator=g), torch.randn(30, 48, generator=g), torch.randn(30, generator=g)
    _close(kt.linear(x, w, b), _cpu.linear(x, w, b), "linear vs _cpu", atol=1e-4)
    _close(kt.rms_norm(x, x[0], 1e-5), _cpu.rms_norm(x, x[0], 1e-5), "rms_norm vs _cpu")
    for a_, r_, n in zip(kt.add_rms_norm(x, x.flip(0), x[1], 1e-5), _cpu.add_rms_norm(x, x.flip(0), x[1], 1e-5), "hy"):
        _close(a_, r_, f"add_rms_norm {n} vs _cpu")
    q3, k3 = x[:, :32].reshape(19, 2, 16), x[:, 32:].reshape(19, 1, 16)
    cos, sin = _rope_tables(19, 16)
    for a_, r_, n in zip(kt.qk_norm_rope(q3, k3, x[2, :16], x[3, :16], cos, sin, 1e-5),
                         _cpu.qk_norm_rope(q3, k3, x[2, :16], x[3, :16], cos, sin, 1e-5), "qk"):
        _close(a_, r_, f"qk_norm_rope {n} vs _cpu")
    _close(kt.silu_mul(x, x.flip(0)), _cpu.silu_mul(x, x.flip(0)), "silu_mul vs _cpu")
    logits, ids = torch.randn(6, 5000, generator=g) * 4, torch.randint(0, 5000, (6,), generator=g)
    got, ref = kt.logprobs(logits, ids, 0.8), _cpu.logprobs(logits, ids, 0.8, entropy=True)
    for a_, r_, n in zip(got, ref, ("logp", "entropy", "lse")):
        _close(a_, r_, f"logprobs {n} vs _cpu")
    wt, it = kt.route_topk(logits[:, :16], 3, True)
    wr, ir = _cpu.route_topk(logits[:, :16], 3, True)
    assert torch.equal(it, ir), "route_topk ids differ from _cpu"
    _close(wt, wr, "route_topk weights vs _cpu")
    sizes = torch.tensor([5, 0, 14])
    we = torch.randn(3, 30, 48, generator=g)
    offs = torch.tensor([0, 5, 5, 19], dtype=torch.int32)
    _close(kt.grouped_linear(x, we, offs), _cpu.grouped_linear(x, we, sizes), "grouped_linear vs _cpu", atol=1e-4)
    L, H, K, D, page = 40, 4, 2, 16, 16
    q, k, v = (torch.randn(L, n, D, generator=g) for n in (H, K, K))
    caches = _paged(k, v, page, [2, 0, 1], 4)
    meta = AttnMeta(torch.tensor([0, 30, 31], dtype=torch.int32), torch.tensor([30, 38], dtype=torch.int32),
                    torch.tensor([[2, 0, 1], [2, 0, 1]], dtype=torch.int32), 30)
    qq = torch.cat([q[:30], q[37:38]])
    got = kt.attention(qq, *caches, meta.cu_seqlens_q, meta.kv_lens, meta.block_table, meta.max_q_len, D**-0.5)
    _close(got, _cpu.attention(qq, *caches, meta, D**-0.5), "attention vs _cpu", atol=1e-5)


def check_errors() -> None:
    kt = _kt()
    for call, word in (
        (lambda: kt.linear(torch.randn(2, 3), torch.randn(4, 5)), "K="),
        (lambda: kt.rms_norm(torch.randn(2, 3), torch.randn(4), 1e-6), "weight shape"),
        (lambda: kt.route_topk(torch.randn(2, 3), 4, True), "k=4"),
        (lambda: kt.logprobs(torch.randn(2, 3), torch.zeros(3, dtype=torch.long)), "ids shape"),
        (lambda: kt.packed_attention(torch.randn(4, 2, 16), torch.randn(4, 1, 16), torch.randn(4, 1, 16),
                                     torch.tensor([0, 4], dtype=torch.int32), 4, -0.25), "scale -0.25"),
        (lambda: kt.packed_attention(torch.randn(4, 2, 16), torch.randn(4, 1, 16), torch.randn(4, 1, 16),
                                     torch.tensor([0, 4], dtype=torch.int32), 4, float("nan")), "scale nan"),
    ):
        try:
            call()
        except (ValueError, TypeError) as e:
            assert word in str(e), f"message {e!r} should mention {word!r}"
        else:
            raise AssertionError(f"no error raised (expected one mentioning {word!r})")


def _adamw64(p, m, v, g, step, lr, betas, wd, eps, scale):
    """torch's fused AdamW step in float64 from float hyperparameters (what its kernel rounds them to)."""
    f = lambda x: float(torch.tensor(x, dtype=torch.float32))  # noqa: E731
    lr, b1, b2, wd, eps = f(lr), f(betas[0]), f(betas[1]), f(wd), f(eps)
    g = g.double() / scale
    p = p - lr * wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    return p - lr / (1 - b1**step) * m / (v.sqrt() / (1 - b2**step) ** 0.5 + eps), m, v


def check_adamw_step() -> None:
    """The optimizer's one pass over tensors of several sizes (program and block edges inside
    them) against a float64 AdamW, 3 steps; bf16 and fp32 grads; the shadows; found_inf skips
    the step and writes nothing; bad inputs are refused."""
    import miles_kernels._triton.adamw as ka

    g = torch.Generator().manual_seed(31)
    saved = ka.CHUNK, ka.BLOCK
    ka.CHUNK, ka.BLOCK = 64, 32  # 2 blocks a program: whole, partial and empty blocks all run
    try:
        sizes = [64 * 3 + 40, 8, 1, 96]
        for gdt in (torch.bfloat16, torch.float32):
            ps = [torch.randn(n, generator=g) for n in sizes]
            ms, vs = [torch.zeros(n) for n in sizes], [torch.zeros(n) for n in sizes]
            steps = [torch.zeros(()) for _ in sizes]
            shadows = [torch.empty(n, dtype=torch.bfloat16) for n in sizes]
            ref = [(p.double(), m.double(), v.double()) for p, m, v in zip(ps, ms, vs)]
            for step in (1, 2, 3):
                grads = [torch.randn(n, generator=g).to(gdt) for n in sizes]
                torch._foreach_add_(steps, 1)
                ka.adamw_step(ps, grads, ms, vs, steps, shadows, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1,
                              eps=1e-8, grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0))
                ref = [_adamw64(*r, gr, step, 1e-2, (0.9, 0.99), 0.1, 1e-8, 2.0) for r, gr in zip(ref, grads)]
                for i, (p, m, v, sh, (rp, rm, rv)) in enumerate(zip(ps, ms, vs, shadows, ref)):
                    what = f"adamw step {step}, {gdt} grads, tensor {i} of {sizes[i]}"
                    _close_rel(p, rp, f"{what}: params", 1e-5)
                    _close_rel(m, rm, f"{what}: exp_avg", 1e-5)
                    _close_rel(v, rv, f"{what}: exp_avg_sq", 1e-5)
                    # the interpreter truncates to bf16 where the GPU rounds to nearest
                    near = (sh == p.bfloat16()) | (sh == (p.view(torch.int32) & -65536).view(torch.float32).bfloat16())
                    assert bool(near.all()), f"{what}: the shadow is not the new params in bf16"
            before = [t.clone() for t in ps + ms + vs + shadows]
            ka.adamw_step(ps, grads, ms, vs, steps, shadows, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1,
                          eps=1e-8, found_inf=torch.tensor(1.0))
            assert all(torch.equal(a, b) for a, b in zip(before, ps + ms + vs + shadows)), "found_inf wrote"
            ka.adamw_step(ps, grads, ms, vs, steps, None, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8)
            assert all(torch.equal(a, b) for a, b in zip(before[-len(sizes):], shadows)), "no shadows: none written"
    finally:
        ka.CHUNK, ka.BLOCK = saved
    p, gr = torch.zeros(8), torch.zeros(8)
    for call, word in (
        (lambda: ka.adamw_step([p], [gr, gr], [p], [p], [torch.zeros(())], None, lr=1, beta1=0.9, beta2=0.9,
                               weight_decay=0, eps=0), "2 grads"),
        (lambda: ka.adamw_step([p], [torch.zeros(9)], [p], [p], [torch.zeros(())], None, lr=1, beta1=0.9,
                               beta2=0.9, weight_decay=0, eps=0), "shaped"),
        (lambda: ka.adamw_step([p], [torch.zeros(9)[1:]], [p], [p], [torch.zeros(())], None, lr=1, beta1=0.9,
                               beta2=0.9, weight_decay=0, eps=0), "aligned"),
        (lambda: ka.adamw_step([p.double()], [gr], [p], [p], [torch.zeros(())], None, lr=1, beta1=0.9,
                               beta2=0.9, weight_decay=0, eps=0), "params must share"),
        (lambda: ka.adamw_step([p], [gr], [p], [p], [torch.zeros(2)], None, lr=1, beta1=0.9, beta2=0.9,
                               weight_decay=0, eps=0), "step count"),
    ):
        try:
            call()
        except ValueError as e:
            assert word in str(e), f"message {e!r} should mention {word!r}"
        else:
            raise AssertionError(f"no error raised (expected one mentioning {word!r})")


CHECKS = {name[len("check_") :]: fn for name, fn in dict(globals()).items() if name.startswith("check_")}
