"""CPU miles_kernels: the invariance property, accuracy vs float64, autograd, fast mode."""

import pytest
import torch

import miles_kernels as mk
from miles_kernels import _ref

DTYPES = [torch.float32, torch.bfloat16]


def _rows_invariant(fn, x, *rest, rows=(0, 1, 5, 37, -1)):
    """Each row alone, and inside batches of other sizes and positions, equals the full batch."""
    full = fn(x, *rest)
    full = full if isinstance(full, tuple) else (full,)
    n = x.shape[0]
    for r in rows:
        r = r % n
        for lo, hi in ((r, r + 1), (max(0, r - 3), min(n, r + 9)), (0, r + 1)):
            part = fn(x[lo:hi], *[t[lo:hi] if isinstance(t, torch.Tensor) and t.shape[:1] == x.shape[:1] else t for t in rest])
            part = part if isinstance(part, tuple) else (part,)
            for a, b in zip(part, full):
                if a is not None:
                    assert torch.equal(a[r - lo], b[r]), f"row {r} differs in slice [{lo}:{hi}]"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,N", [(64, 96), (200, 77), (1024, 512)])
def test_linear_invariant_and_accurate(dtype, K, N):
    g = torch.Generator().manual_seed(K + N)
    x = torch.randn(70, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    _rows_invariant(lambda a: mk.linear(a, w, b), x)
    ref = x.double() @ w.double().t() + b.double()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((mk.linear(x, w, b).double() - ref).norm() / ref.norm()) < tol


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_and_norm_invariant(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 72, generator=g).to(dtype)
    u = torch.randn(90, 72, generator=g).to(dtype)
    w = torch.randn(72, generator=g).to(dtype)
    _rows_invariant(lambda a: mk.rms_norm(a, w, 1e-6), x)
    _rows_invariant(lambda a, b: mk.silu_mul(a, b), x, u)
    assert torch.allclose(mk.rms_norm(x, w, 1e-6).float(), _ref.rms_norm(x.double(), w.double(), 1e-6).float(),
                          rtol=1e-5 if dtype == torch.float32 else 2e-2, atol=1e-5 if dtype == torch.float32 else 2e-2)
    assert torch.allclose(mk.silu_mul(x, u).float(), _ref.silu_mul(x.double(), u.double()).float(),
                          rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("mode", ["invariant", "fast"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_op_grads_match_autograd_through_ref(dtype, mode):
    """The closed-form backward rules (_grads) equal autograd through the _ref formulas, in
    float64 exactly up to rounding, and in the run dtype within its precision. Fast mode runs
    _ref's forward (the same bits) with the same rules."""
    g = torch.Generator().manual_seed(5)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    x = (torch.randn(40, 64, generator=g) * 2).to(dtype).requires_grad_(True)
    u = torch.randn(40, 64, generator=g).to(dtype).requires_grad_(True)
    w = torch.randn(64, generator=g).to(dtype).requires_grad_(True)
    q = torch.randn(40, 4, 32, generator=g).to(dtype).requires_grad_(True)
    cos, sin = mk.rope_cos_sin(torch.arange(40), 1.0 / (1e4 ** (torch.arange(0, 32, 2).float() / 32)))
    cases = [("rms_norm", lambda f, a, b: f.rms_norm(a, b, 1e-6), (x, w)),
             ("silu_mul", lambda f, a, b: f.silu_mul(a, b), (x, u)),
             ("apply_rope", lambda f, a: f.apply_rope(a, cos, sin), (q,))]
    for name, fn, ins in cases:
        gy = torch.randn(fn(_ref, *ins).shape, generator=g).to(dtype)
        with mk.use_mode(mode):
            y = fn(mk, *ins)
        assert "_RuleBackward" in y.grad_fn.name() or "_RuleBackward" in str(y.grad_fn.next_functions), name
        if mode == "fast":
            assert torch.equal(y, fn(_ref, *ins)), f"fast {name} forward is _ref's"
        got = torch.autograd.grad(y, ins, gy)
        want = torch.autograd.grad(fn(_ref, *ins), ins, gy)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.allclose(a.float(), b.float(), **tol), f"{name} ({dtype})"
        if dtype == torch.float32:  # the rule is the derivative itself: float64 agrees to rounding
            ins64 = [t.detach().double().requires_grad_(True) for t in ins]
            ref64 = torch.autograd.grad(fn(_ref, *ins64), ins64, gy.double())
            for a, b in zip(got, ref64):
                assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-5), f"{name} vs float64"


def test_rope_tables_position_only():
    inv = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    pos = torch.arange(300)
    cos, sin = mk.rope_cos_sin(pos, inv)
    for p in (0, 7, 255, 299):
        c1, s1 = mk.rope_cos_sin(torch.tensor([p]), inv)
        assert torch.equal(c1[0], cos[p]) and torch.equal(s1[0], sin[p])
    f = (pos.float()[:, None] * inv[None, :]).double()  # the fp32 angle, then exact cos/sin
    ref_c, ref_s = f.cos(), f.sin()
    assert torch.allclose(cos.double(), ref_c, atol=1e-6, rtol=0) and torch.allclose(sin.double(), ref_s, atol=1e-6, rtol=0)


@pytest.mark.parametrize("V", [50, 1000, 40000])
def test_logprobs_invariant_and_accurate(V):
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(40, V, generator=g) * 3
    ids = torch.randint(0, V, (40,), generator=g)
    for kw in ({}, {"top_k": 7}, {"top_p": 0.8}):
        fn = lambda a, i: mk.logprobs(a, i, 0.7, entropy=True, **kw)  # noqa: E731
        _rows_invariant(fn, logits, ids)
    logp, ent = mk.logprobs(logits, ids, 0.7, entropy=True)
    rl, re = _ref.logprobs(logits.double(), ids, 0.7, entropy=True)
    assert torch.allclose(logp.double(), rl, atol=1e-5) and torch.allclose(ent.double(), re, atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        mk.logprobs(logits, ids, 0.0)


def test_logprobs_grad_matches_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 33, generator=g, requires_grad=True)
    ids = torch.randint(0, 33, (6,), generator=g)
    wl, we = torch.randn(6, generator=g), torch.randn(6, generator=g)
    for kw in ({}, {"top_k": 5}):
        lp, ent = mk.logprobs(logits, ids, 0.9, entropy=True, **kw)
        (ga,) = torch.autograd.grad((lp * wl + ent * we).sum(), logits)
        rl, re = _ref.logprobs(logits, ids, 0.9, entropy=True, **kw)
        (gb,) = torch.autograd.grad((rl * wl + re * we).sum(), logits)
        assert torch.allclose(ga, gb, atol=1e-5)
        with mk.use_mode("fast"):  # fast mode: chunked torch forward, same backward rule
            fl, fe = mk.logprobs(logits, ids, 0.9, entropy=True, **kw)
            (gf,) = torch.autograd.grad((fl * wl + fe * we).sum(), logits)
        assert torch.allclose(fl, rl, atol=1e-5) and torch.allclose(gf, gb, atol=1e-5)
        # forward identical with and without autograd
        with torch.no_grad():
            assert torch.equal(mk.logprobs(logits, ids, 0.9, entropy=True, **kw)[0], lp.detach())


def _separated_logits_inputs(g, T=100, K=24, V=57, temperature=0.8, top_k=5, top_p=0.7):
    """x [T, K], w [V, K] whose logits x @ w.T lie >= 0.1 apart in every row, far from the
    top-k and top-p cuts. Fast mode's logits move by rounding (chunked vs whole matmul),
    and a token that sits on a cut could then cross it; here none can, so fast mode must
    match the whole computation up to rounding. The premise is checked in float64."""
    x = torch.randn(T, K, generator=g) * 0.03
    w = torch.randn(V, K, generator=g) * 0.03
    x[:, 0] = 1.0
    w[:, 0] = 0.25 * torch.randperm(V, generator=g).float()  # spacing 0.25, noise <= ~0.03
    z = torch.sort((x.double() @ w.double().T) / temperature, -1, descending=True).values
    assert (z[:, :-1] - z[:, 1:]).min() > 0.1 / temperature
    p = torch.softmax(z, -1)
    before = torch.cumsum(p, -1) - p
    assert (before - top_p).abs().min() > 1e-3, "a token sits on the top-p cut: pick other inputs"
    assert top_k < V
    return x, w


@pytest.mark.parametrize("mode", ["invariant", "fast"])
def test_linear_logprobs_equals_linear_then_logprobs(mode):
    g = torch.Generator().manual_seed(3)
    if mode == "invariant":  # any input: row-wise ops give the same bits however rows are chunked
        x = torch.randn(100, 24, generator=g)
        w = torch.randn(57, 24, generator=g) * 0.5
    else:
        x, w = _separated_logits_inputs(g)
    x, w = x.requires_grad_(True), w.requires_grad_(True)
    ids = torch.randint(0, 57, (100,), generator=g)
    wl, we = torch.randn(100, generator=g), torch.randn(100, generator=g)
    with mk.use_mode(mode):
        for kw in ({}, {"top_k": 5}, {"top_p": 0.7}):
            lp, ent = mk.logprobs(mk.linear(x, w), ids, 0.8, entropy=True, **kw)
            ga = torch.autograd.grad((lp * wl + ent * we).sum(), (x, w))
            for rows in (48, 7, 4096):  # chunks off the CPU row tile, tiny chunks, one chunk
                flp, fent = mk.linear_logprobs(x, w, ids, 0.8, entropy=True, chunk_rows=rows, **kw)
                if mode == "invariant":  # row-wise ops: chunking cannot change a bit
                    assert torch.equal(flp, lp) and torch.equal(fent, ent)
                else:
                    assert torch.allclose(flp, lp, atol=1e-4) and torch.allclose(fent, ent, atol=1e-4)
                gb = torch.autograd.grad((flp * wl + fent * we).sum(), (x, w))
                # the forward's logits kept for the backward (as on CUDA) vs recomputed (the CPU's default)
                klp, kent = mk.linear_logprobs(x, w, ids, 0.8, entropy=True, chunk_rows=rows, keep_bytes=1 << 40, **kw)
                gk = torch.autograd.grad((klp * wl + kent * we).sum(), (x, w))
                assert torch.equal(klp, flp) and all(torch.equal(a, b) for a, b in zip(gk, gb)), f"kept logits, {kw}"
                # fast mode's matmuls are the host BLAS's, whose sum order may follow the chunk's
                # rows; the softmax grads cancel, so compare at the grads' scale
                assert all(torch.allclose(a, b, rtol=0, atol=1e-4 * float(a.abs().max())) for a, b in zip(ga, gb))
            with torch.no_grad():  # forward identical with and without autograd, logp alone too
                nlp, nent = mk.linear_logprobs(x, w, ids, 0.8, chunk_rows=48, **kw)
            assert nent is None and torch.equal(nlp, mk.linear_logprobs(x, w, ids, 0.8, chunk_rows=48, **kw)[0].detach())
    (gx,) = torch.autograd.grad(mk.linear_logprobs(x, w.detach(), ids, 0.8)[0].sum(), x)  # grad of x only
    assert gx.shape == x.shape
    with pytest.raises(ValueError, match="chunk_rows"):
        mk.linear_logprobs(x, w, ids, chunk_rows=0)


def test_route_topk_stable_and_invariant():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(50, 8, generator=g)
    logits[3] = 0.0  # all tied: lower ids win
    _rows_invariant(lambda a: mk.route_topk(a, 2, True), logits)
    w, ids = mk.route_topk(logits, 2, True)
    assert ids[3].tolist() == [0, 1]
    rw, rids = _ref.route_topk(logits.double(), 2, True)
    assert torch.equal(ids, rids) and torch.allclose(w.double(), rw, atol=1e-6)
    x = logits.clone().requires_grad_(True)
    w2, _ = mk.route_topk(x, 2, False)
    (g1,) = torch.autograd.grad(w2.sum(), x)
    x2 = logits.clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(_ref.route_topk(x2, 2, False)[0].sum(), x2)
    assert torch.allclose(g1, g2, atol=1e-6)


@pytest.mark.parametrize("N,K", [(24, 16), (20, 12)])  # 8-aligned: torch._grouped_mm backward; else the loop
def test_grouped_linear_rows_independent_and_grad(N, K):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, N, K, generator=g)
    x = torch.randn(30, K, generator=g, requires_grad=True)
    sizes = torch.tensor([7, 0, 20, 3])
    y = mk.grouped_linear(x, w, sizes)
    # a row computed in a group of one equals the same row in its full group
    alone = mk.grouped_linear(x[10:11].detach(), w, torch.tensor([0, 0, 1, 0]))
    assert torch.equal(alone[0], y[10].detach())
    assert torch.allclose(y, _ref.grouped_linear(x, w, sizes), atol=1e-5)
    wg = w.clone().requires_grad_(True)
    (gx, gw) = torch.autograd.grad(mk.grouped_linear(x, wg, sizes).square().sum(), (x, wg))
    (rx, rw) = torch.autograd.grad(_ref.grouped_linear(x, wg, sizes).square().sum(), (x, wg))
    assert torch.allclose(gx, rx, atol=1e-4) and torch.allclose(gw, rw, atol=1e-4)


@pytest.mark.parametrize("mode", ["invariant", "fast"])
def test_moe_combine_rows_independent_and_grad(mode):
    g = torch.Generator().manual_seed(6)
    T, k, D = 9, 3, 20
    pos = torch.randperm(T * k, generator=g).view(T, k)
    y = torch.randn(T * k, D, generator=g, dtype=torch.float64).to(torch.bfloat16).requires_grad_(True)
    w = torch.softmax(torch.randn(T, k, generator=g), -1).requires_grad_(True)
    with mk.use_mode(mode):
        out = mk.moe_combine(y, pos, w)
        assert out.dtype == torch.bfloat16 and out.shape == (T, D)
        ref = (y.double()[pos] * w.double()[:, :, None]).sum(1)
        assert (out.double() - ref).abs().max() <= 2e-2 * ref.abs().max()
        # a token alone (its k rows only) equals the same token in the batch
        assert torch.equal(mk.moe_combine(y[pos[4]].detach(), torch.arange(k)[None], w[4:5].detach())[0], out[4].detach())
        gout = torch.randn(T, D, generator=g).to(torch.bfloat16)
        gy, gw = torch.autograd.grad(out, (y, w), gout)
        ry, rw = torch.autograd.grad(_ref.moe_combine(y.double(), pos, w.double()), (y, w), gout.double())
        assert torch.allclose(gy.double(), ry.double(), atol=1e-2) and torch.allclose(gw.double(), rw.double(), atol=1e-3)
    with pytest.raises(ValueError, match="moe_combine"):
        mk.moe_combine(y, pos, w[:, :2])


def test_moe_dispatch_rows_and_grad():
    g = torch.Generator().manual_seed(7)
    T, k, D = 6, 3, 10
    ids = torch.stack([torch.randperm(8, generator=g)[:k] for _ in range(T)])
    order = torch.argsort(ids.reshape(-1), stable=True)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(T * k)
    pos = pos.view(T, k)
    x = torch.randn(T, D, generator=g, requires_grad=True)
    xr = mk.moe_dispatch(x, order, pos)
    assert torch.equal(xr.detach(), x.detach()[order // k])
    gr = torch.randn(T * k, D, generator=g)
    (gx,) = torch.autograd.grad(xr, x, gr)
    (rx,) = torch.autograd.grad(x[:, None, :].expand(T, k, D).reshape(T * k, D)[order], x, gr)
    assert torch.allclose(gx, rx, atol=1e-6)
    with pytest.raises(ValueError, match="moe_dispatch"):
        mk.moe_dispatch(x, order[:-1], pos)


def test_moe_bwd_switch_is_checked_at_import():
    """MILES_MOE_BWD: a value other than torch / triton fails the import with a message naming it;
    torch (the default is triton) changes nothing on CPU (the kernels take CUDA tensors)."""
    from import_switch import check_import_switch

    code = ("import torch, miles_kernels as mk; from miles_kernels import _grads; assert _grads.MOE_BWD == 'torch'; "
            "x = torch.randn(3, 4, requires_grad=True); pos = torch.tensor([[1, 0], [2, 4], [5, 3]]); "
            "order = torch.tensor([1, 0, 2, 5, 3, 4]); w = torch.rand(3, 2, requires_grad=True); "
            "mk.moe_combine(mk.moe_dispatch(x, order, pos), pos, w).sum().backward(); "
            "assert x.grad is not None and w.grad is not None")
    check_import_switch("MILES_MOE_BWD", code, "torch", "triton")


def test_linear_grad_and_fast_mode():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 12, generator=g, requires_grad=True)
    w = torch.randn(7, 12, generator=g, requires_grad=True)
    b = torch.randn(7, generator=g, requires_grad=True)
    y = mk.linear(x, w, b)
    grads = torch.autograd.grad(y.square().sum(), (x, w, b))
    ref = torch.autograd.grad(torch.nn.functional.linear(x, w, b).square().sum(), (x, w, b))
    for a, r in zip(grads, ref):
        assert torch.allclose(a, r, atol=1e-4)
    with mk.use_mode("fast"):
        assert mk.get_mode() == "fast"
        assert torch.allclose(mk.linear(x, w, b), y, atol=1e-5)
    assert mk.get_mode() == "invariant"
    with pytest.raises(ValueError, match="mode"):
        mk.set_mode("turbo")


@pytest.mark.parametrize("mode", ["invariant", "fast"])
@pytest.mark.parametrize("bias", [False, True])
def test_linears_equal_separate_linears(mode, bias):
    """mk.linears (q/k/v, gate/up): each output, and every grad, as the separate linears give."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    ws = [torch.randn(n, 16, generator=g, requires_grad=True) for n in (12, 8, 8)]
    bs = [torch.randn(w.shape[0], generator=g, requires_grad=True) for w in ws] if bias else None
    with mk.use_mode(mode):
        ys = mk.linears(x, ws, bs)
        refs = [mk.linear(x, w, bs[i] if bias else None) for i, w in enumerate(ws)]
    params = [x, *ws, *(bs or [])]
    for y, r in zip(ys, refs):
        assert y.shape == r.shape and torch.equal(y, r)
    # one autograd node for all weights, in fast mode too (x's grads summed inside addmm)
    assert len({y.grad_fn.next_functions[0][0] if y.dim() == 3 else y.grad_fn for y in ys}) == 1
    loss = sum((y * (i + 1)).square().sum() for i, y in enumerate(ys))
    ref_loss = sum((r * (i + 1)).square().sum() for i, r in enumerate(refs))
    for a, r in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref_loss, params)):
        assert torch.allclose(a, r, rtol=1e-5, atol=1e-4)
    with torch.no_grad(), mk.use_mode(mode):  # two weights, no autograd node
        for y, w in zip(mk.linears(x, ws[:2]), ws[:2]):
            assert torch.equal(y, mk.linear(x, w))


@pytest.mark.parametrize("mode", ["invariant", "fast"])
def test_swiglu_is_silu_mul_of_linears(mode):
    """mk.swiglu: the value and the grads of silu_mul(*linears(x, (gate, up))), any leading dims."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    wg, wu = (torch.randn(24, 16, generator=g, requires_grad=True) for _ in range(2))
    with mk.use_mode(mode):
        y = mk.swiglu(x, wg, wu)
        ref = mk.silu_mul(*mk.linears(x, (wg, wu)))
    assert y.shape == (2, 9, 24) and torch.equal(y, ref)
    for a, r in zip(torch.autograd.grad(y.square().sum(), (x, wg, wu)),
                    torch.autograd.grad(ref.square().sum(), (x, wg, wu))):
        assert torch.equal(a, r)


def test_ops_take_zero_rows():
    """A micro-batch may have no trained position (the trainer then scores none)."""
    w = torch.randn(7, 5)
    lp, ent = mk.logprobs(torch.zeros(0, 7), torch.zeros(0, dtype=torch.long), entropy=True, top_k=3)
    assert lp.shape == ent.shape == (0,) and lp.dtype == torch.float32
    assert mk.linear(torch.zeros(0, 5), w).shape == (0, 7)
    assert mk.rms_norm(torch.zeros(0, 5), torch.ones(5), 1e-6).shape == (0, 5)
    lp, _ = mk.linear_logprobs(torch.zeros(0, 5, requires_grad=True), w, torch.zeros(0, dtype=torch.long))
    assert lp.shape == (0,)

