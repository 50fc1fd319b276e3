"""miles_kernels Triton kernels on a real GPU: invariance (bitwise), accuracy, CUDA graphs: row ops,
logprobs, the fused and gradient kernels (matmuls: test_matmul_gpu.py; attention: test_attention_gpu.py).

Run on a CUDA machine (triton >= 3.6):  python -m pytest -q tests/gpu/test_kernels_gpu.py
The invariance tests are the point: if one fails, the kernel's reduction order depends on
the batch, and trainer/engine log-probs will no longer match bit for bit.
"""

import pytest
import torch
from kernel_asserts import DTYPES, _accurate, _gen, _randn, _same

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def kt():
    from miles_kernels import _triton

    return _triton

def test_fast_mode_row_ops_run_the_kernels():
    """Fast mode on CUDA runs the Triton kernels for the row-wise ops, filter_logits and
    logprobs (one launch each), so those give invariant mode's bits for the same inputs."""
    import miles_kernels as mk

    g = _gen(5)
    x = _randn(300, 1024, dtype=torch.bfloat16, g=g)
    w = _randn(1024, dtype=torch.bfloat16, g=g)
    cos, sin = torch.rand(300, 64, device="cuda", generator=g), torch.rand(300, 64, device="cuda", generator=g)
    logits = _randn(64, 151936, dtype=torch.bfloat16, g=g, scale=4.0)
    ids = torch.randint(0, 151936, (64,), device="cuda", generator=g)
    cases = {
        "rms_norm": lambda: mk.rms_norm(x, w, 1e-6),
        "apply_rope": lambda: mk.apply_rope(x.view(300, 8, 128), cos, sin),
        "silu_mul": lambda: mk.silu_mul(x, x.flip(0)),
        "filter_logits": lambda: mk.filter_logits(logits.float() / 0.7, 20, 0.9),
        "logprobs": lambda: torch.stack(mk.logprobs(logits, ids, 0.7, entropy=True, top_k=20)),
    }
    for name, fn in cases.items():
        with mk.use_mode("invariant"):
            want = fn()
        with mk.use_mode("fast"):
            _same(fn(), want, f"fast-mode {name} vs invariant")


def test_fast_mode_linears_take_the_faster_kernel(kt, monkeypatch):
    """Fast mode's linears (_fast_pick): a kept choice runs that kernel (the invariant kernel's bits
    or F.linear's), with autograd too; a new key is timed once eagerly and its choice kept and run;
    under CUDA graph capture nothing is timed or kept and cuBLAS serves."""
    import miles_kernels as mk
    import torch.nn.functional as F
    from miles_kernels import _fast_pick as fp

    monkeypatch.setattr(fp, "_CHOICE", {})
    g = _gen(21)
    x = _randn(1000, 1024, dtype=torch.bfloat16, g=g)  # above SMALL_M: fast mode's decode rule stays out
    wq, wk = _randn(2048, 1024, dtype=torch.bfloat16, g=g, scale=0.03), _randn(1024, 1024, dtype=torch.bfloat16, g=g,
                                                                             scale=0.03)
    with mk.use_mode("fast"):
        for pick in (True, False):
            fp._CHOICE.clear()
            fp._CHOICE[fp.key("linear", x, (wq,), None)] = pick
            fp._CHOICE[fp.key("linears", x, (wq, wk), None)] = pick
            want = (kt.linear(x, wq), kt.linear(x, wk)) if pick else (F.linear(x, wq), F.linear(x, wk))
            _same(mk.linear(x, wq), want[0], f"fast linear, kept choice {pick}")
            for got, w in zip(mk.linears(x, (wq, wk)), want):
                _same(got, w, f"fast linears, kept choice {pick}")
            xg = x.clone().requires_grad_()
            yq, yk = mk.linears(xg, (wq, wk))
            _same(yq.detach(), want[0], f"fast linears with autograd, kept choice {pick}")
            (yq.float().square().sum() + yk.float().sum()).backward()
            ref = x.clone().requires_grad_()
            (F.linear(ref, wq).float().square().sum() + F.linear(ref, wk).float().sum()).backward()
            torch.testing.assert_close(xg.grad, ref.grad, rtol=2e-2, atol=2e-2)
        fp._CHOICE.clear()
        y = mk.linear(x, wk)  # timed now
        k = fp.key("linear", x, (wk,), None)
        assert k in fp._CHOICE, "a new key was not timed"
        _same(y, kt.linear(x, wk) if fp._CHOICE[k] else F.linear(x, wk), "fast linear after its timing")
        x2 = _randn(3000, 1024, dtype=torch.bfloat16, g=g)
        k2 = fp.key("linear", x2, (wk,), None)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            F.linear(x2, wk)  # cuBLAS warm before the capture, outside mk (no key timed)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y2 = mk.linear(x2, wk)
        assert k2 not in fp._CHOICE, "a key was timed or kept during capture"
        graph.replay()
        torch.cuda.synchronize()
        _same(y2, F.linear(x2, wk), "fast linear captured before its timing (cuBLAS)")


def test_fast_launch_gives_tritons_bits_and_keys_alignment(kt, monkeypatch):
    """Every kernel family through launch.FastKernel (repeat calls skip Triton's binding) gives
    the bits of Triton's own launch path; a 16-byte-misaligned view after an aligned one (and
    back) gets its own compiled kernel, not the aligned one's."""
    import miles_kernels as mk
    from miles_kernels._triton import fused_linears, launch

    monkeypatch.setattr(fused_linears, "SMALL_M_TMA", True)  # the TMA cases below take the TMA kernels
    g = _gen(11)
    buf = _randn(4096 * 1024 + 8, dtype=torch.bfloat16, g=g)
    x_big, x_mis = buf[: 4096 * 1024].view(4096, 1024), buf[1: 256 * 1024 + 1].view(256, 1024)
    w = _randn(3072, 1024, dtype=torch.bfloat16, g=g, scale=0.03)
    nw = _randn(1024, dtype=torch.bfloat16, g=g)
    logits = _randn(64, 151936, dtype=torch.bfloat16, g=g, scale=4.0)
    ids = torch.randint(0, 151936, (64,), device="cuda", generator=g)
    cases = {
        "linear TMA": lambda: mk.linear(x_big, w),
        "linear M=256": lambda: mk.linear(x_big[:256], w),
        "linears M=64": lambda: torch.cat(mk.linears(x_big[:64], (w[:1024], w[1024:1536], w[1536:2048])), 1),
        "linears M=512 TMA": lambda: torch.cat(mk.linears(x_big[:512], (w, w[:1024])), 1),
        "swiglu M=512 TMA": lambda: mk.swiglu(x_big[:512], w, w),
        "rms_norm misaligned": lambda: mk.rms_norm(x_mis, nw, 1e-6),
        "rms_norm aligned": lambda: mk.rms_norm(x_big[:256], nw, 1e-6),
        "silu_mul misaligned": lambda: mk.silu_mul(x_mis[:, :512], x_mis[:, 512:]),
        "logprobs": lambda: torch.stack(mk.logprobs(logits, ids, 0.7, entropy=True, top_k=20, top_p=0.9)),
    }
    with mk.use_mode("invariant"):
        monkeypatch.setattr(launch, "ENABLED", False)
        want = {name: fn() for name, fn in cases.items()}
        monkeypatch.setattr(launch, "ENABLED", True)
        for _ in range(3):  # first call keys, the next ones take the fast path
            for name, fn in cases.items():
                _same(fn(), want[name], f"fast launch {name}")
    torch.cuda.synchronize()
    from miles_kernels._triton import elementwise, fused_linears, matmul

    assert len(elementwise._rms_norm_kernel.kernels) >= 2, "aligned and misaligned rows share one kernel"
    assert matmul._linear_tma_kernel.kernels and fused_linears._linears_kernel.kernels
    assert fused_linears._linears_tma_kernel.kernels and fused_linears._swiglu_tma_kernel.kernels


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_ops_invariant_and_accurate(kt, dtype):
    g = _gen(2)
    x = _randn(300, 1024, dtype=dtype, g=g, scale=3)
    w = _randn(1024, dtype=dtype, g=g)
    y = kt.rms_norm(x, w, 1e-6)
    xd = x.double()
    _accurate(y, xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double(), dtype, "rms_norm")
    _same(kt.rms_norm(x[17:18], w, 1e-6), y[17:18], "rms_norm row alone")
    gate, up = x[:, :512], x[:, 512:]
    s = kt.silu_mul(gate, up)
    _accurate(s, torch.nn.functional.silu(gate.double()) * up.double(), dtype, "silu_mul")
    _same(kt.silu_mul(gate[5:6], up[5:6]), s[5:6], "silu_mul row alone")
    T, H, D = 64, 16, 128
    q = _randn(T, H, D, dtype=dtype, g=g)
    f = torch.arange(T, device="cuda").float()[:, None] * (1e6 ** (-torch.arange(D // 2, device="cuda") * 2 / D))[None]
    r = kt.apply_rope(q, f.cos(), f.sin())
    c, sn = f.cos().double()[:, None], f.sin().double()[:, None]
    q1, q2 = q.double()[..., : D // 2], q.double()[..., D // 2 :]
    _accurate(r, torch.cat([q1 * c - q2 * sn, q2 * c + q1 * sn], -1), dtype, "apply_rope")
    _same(kt.apply_rope(q[9:10].contiguous(), f.cos()[9:10], f.sin()[9:10]), r[9:10], "apply_rope token alone")


@pytest.mark.parametrize("dtype", DTYPES)
def test_logprobs_and_route_topk(kt, dtype):
    g = _gen(3)
    logits = _randn(33, 151936, dtype=dtype, g=g, scale=4)
    ids = torch.randint(0, 151936, (33,), generator=g, device="cuda")
    logp, ent, lse = kt.logprobs(logits, ids, 0.7)
    ls = torch.log_softmax(logits.double() / 0.7, -1)
    assert (logp - ls.gather(1, ids[:, None])[:, 0]).abs().max().item() < 1e-4
    assert (ent - (-(ls.exp() * ls).sum(-1))).abs().max().item() < 1e-4
    assert (lse - torch.logsumexp(logits.double() / 0.7, -1)).abs().max().item() < 1e-4
    for a, b, n in zip(kt.logprobs(logits[4:5], ids[4:5], 0.7), (logp, ent, lse), ("logp", "entropy", "lse")):
        _same(a[0], b[4], f"{n} row alone")
    router = _randn(200, 128, dtype=dtype, g=g)
    w, e = kt.route_topk(router, 8, True)
    # bf16 logits tie exactly; the contract sends ties to the lower id (torch.topk does not promise that)
    rw, re = torch.sort(torch.softmax(router.double(), -1), dim=-1, descending=True, stable=True)
    rw, re = rw[:, :8], re[:, :8]
    assert torch.equal(e, re), "route_topk ids differ from a stable descending sort (ties -> lower id)"
    _accurate(w, rw / rw.sum(-1, keepdim=True), torch.float32, "route_topk weights")
    w1, e1 = kt.route_topk(router[50:51], 8, True)
    _same(w1[0], w[50], "route_topk row alone")



def test_filter_cuts_same_bits_in_every_launch(kt, monkeypatch):
    """The filter's cuts are fixed by the row alone: every launch (num_warps, chunks a step, programs
    a row with the passes as launches, loads ahead, brackets snapped to tokens), which cut.CUT_LAUNCH
    picks by the row count, gives the shipped rule's bits and a row alone's, for the top-p cut and
    top-k's k-th value (== torch.topk's); cut._tree_sum is the adjacent-pair tree on the GPU at any
    num_warps (tl.sum's order follows the layout)."""
    import os
    import sys

    from miles_kernels._triton import cut as tp

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels"))
    from _row_sums_kernel import tree_sums

    g = _gen(23)
    x = torch.exp2(60 * torch.rand(16, 4096, device="cuda", generator=g) - 50)
    want = x
    while want.shape[-1] > 1:
        want = want[:, 0::2] + want[:, 1::2]
    for nw in (1, 4, 8, 16, 32):
        o = torch.empty(16, device="cuda")
        tree_sums[(16,)](x, o, 12, num_warps=nw)
        _same(o, want[:, 0], f"_tree_sum at {nw} warps vs the adjacent-pair tree")
    z = _randn(300, 151936, dtype=torch.float32, g=g, scale=4.0) / 0.7
    z[7, :4000] = 9.0  # a tie block at the top
    z[9, 100:] = float("-inf")  # a top-k-like row
    z[11, 30:] = float("-inf")  # fewer finite values than k = 50
    z[12] = torch.round(z[12])  # ties everywhere
    launches = ((4, 1, 1, 1), (8, 1, 1, 1), (16, 4, 1, 1), (32, 2, 1, 1), (32, 4, 1, 1), (4, 2, 4, 1), (8, 4, 8, 1),
                (8, 1, 16, 1), (4, 4, 32, 1), (32, 2, 1, 3), (32, 4, 1, 2), (32, 1, 1, 4), (16, 2, 1, 3), (8, 4, 4, 2),
                (16, 4, 1, 1, 1), (16, 4, 1, 2, 1), (32, 4, 1, 1, 1), (8, 2, 1, 1, 1))  # the last four: snapped
    cases = [(f"top_p {p}", lambda p=p: kt.top_p_cutoff(z, p), lambda p=p: kt.top_p_cutoff(z[7:8], p))
             for p in (0.9, 0.95, 0.5)]
    cases += [(f"top_k {k}", lambda k=k: kt.top_k_floor(z, k), lambda k=k: kt.top_k_floor(z[7:8], k))
              for k in (1, 20, 50)]
    for what, run, alone in cases:
        cut = run()
        _same(alone(), cut[7:8], f"{what}: row alone vs 300 rows")
        if what.startswith("top_k"):
            _same(cut, torch.topk(z, int(what.split()[1]), dim=-1).values[:, -1], f"{what} vs torch.topk")
        else:
            kept_min = torch.where(z >= cut[:, None], z, float("inf")).amin(-1)
            _same(cut, kept_min, f"{what}: the cut is the smallest kept value")
        for launch in launches:
            monkeypatch.setattr(tp, "CUT_LAUNCH", ((0, *launch),))
            _same(run().view(torch.int32), cut.view(torch.int32), f"{what}: at launch (warps, chunks a step, "
                  f"programs a row, stages[, snap]) {launch} vs shipped")
        monkeypatch.undo()


def test_filter_cut_ptx_same_bits(kt, monkeypatch):
    """The cut's lane loops in PTX (cut.ASM: ex2's .ftz form, predicated adds) give Triton's ops' bits,
    on rows whose tokens reach far under the max (their terms under 2**-126 flushed to 0: never a
    mass's bits), in one program a row and over programs, top-p and top-k."""
    from miles_kernels._triton import cut as tp

    g = _gen(29)
    z = _randn(96, 151936, dtype=torch.float32, g=g, scale=4.0) / 0.7
    z[:32] = z[:32] * 8.0  # logits over +-150: terms far under 2**-126
    z[40] = torch.linspace(-300.0, 20.0, 151936, device="cuda")
    z[41, 1000:] = float("-inf")
    z[42] = torch.round(z[42])
    for launch in ((0, 32, 4, 1, 1), (0, 32, 4, 1, 2), (0, 8, 1, 4, 1), (0, 16, 4, 1, 1, 1)):
        monkeypatch.setattr(tp, "CUT_LAUNCH", (launch,))
        for what, run in [(f"top_p {p}", lambda p=p: kt.top_p_cutoff(z, p)) for p in (0.9, 0.95, 0.5)] + [
                ("top_k 20", lambda: kt.top_k_floor(z, 20))]:
            monkeypatch.setattr(tp, "ASM", True)
            ptx = run()
            monkeypatch.setattr(tp, "ASM", False)
            _same(ptx, run(), f"{what} at launch {launch}: PTX lane loops vs Triton's ops")


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_logprobs_bitwise_equals_linear_then_logprobs(dtype):
    import miles_kernels as mk

    g = _gen(4)
    x = _randn(3000, 1024, dtype=dtype, g=g).requires_grad_(True)
    w = _randn(151936, 1024, dtype=dtype, g=g, scale=0.02).requires_grad_(True)
    ids = torch.randint(0, 151936, (3000,), generator=g, device="cuda")
    lp, ent = mk.logprobs(mk.linear(x, w), ids, 0.7, entropy=True)
    flp, fent = mk.linear_logprobs(x, w, ids, 0.7, entropy=True, chunk_rows=1024)
    _same(flp, lp, "linear_logprobs logp")
    _same(fent, ent, "linear_logprobs entropy")
    ga = torch.autograd.grad((lp + 0.1 * ent).sum(), (x, w))
    gb = torch.autograd.grad((flp + 0.1 * fent).sum(), (x, w))
    for a, b, n in zip(ga, gb, ("grad x", "grad w")):
        _accurate(b, a, dtype, n)


QWEN3_ROWS = {"0.6b": (1024, 16, 8, 128), "8b": (4096, 32, 8, 128)}  # hidden, q heads, kv heads, head dim


def _qwen3_rows_inputs(T, hidden, H, K, D, w_dtype, g):
    """A fused [T, (H + 2K) D] bf16 projection (q, k: views of it), weights near 1, RoPE tables of
    scattered positions, and a residual pair x, r [T, hidden]."""
    qkv = _randn(T, H + 2 * K, D, dtype=torch.bfloat16, g=g, scale=3)
    q_w, k_w, w = ((1 + 0.1 * torch.randn(n, generator=g, device="cuda")).to(w_dtype) for n in (D, D, hidden))
    pos = torch.randint(0, 32768, (T,), generator=g, device="cuda")
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, D, 2, device="cuda", dtype=torch.float32) / D)
    cos, sin = torch.cos(pos.float()[:, None] * inv_freq), torch.sin(pos.float()[:, None] * inv_freq)
    x, r = _randn(T, hidden, dtype=torch.bfloat16, g=g), _randn(T, hidden, dtype=torch.bfloat16, g=g, scale=4)
    return qkv[:, :H], qkv[:, H: H + K], q_w, k_w, cos, sin, x, r, w


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("model", QWEN3_ROWS)
def test_fused_row_kernels_equal_unfused(kt, model, w_dtype):
    """qk_norm_rope == apply_rope(rms_norm(.)) for q and k, and add_rms_norm == (x + r, rms_norm(x + r)),
    bitwise in bf16 at Qwen3 shapes, decode to prefill row counts; q/k as separate tensors (the
    model's) and as views of one projection; a token alone as in its batch. If this fails, the
    fused kernel's reduction or contraction differs from the unfused kernels' (elementwise.py)."""
    hidden, H, K, D = QWEN3_ROWS[model]
    g, eps = _gen(12), 1e-6
    for T in (1, 64, 256, 2051, 4096):  # from 2,048 tokens on, 8 tokens a norm/RoPE program (2,051: a partial one)
        q, k, q_w, k_w, cos, sin, x, r, w = _qwen3_rows_inputs(T, hidden, H, K, D, w_dtype, g)
        for layout, (qq, kk) in (("views", (q, k)), ("contiguous", (q.contiguous(), k.contiguous()))):
            what = f"{model} T={T} w {w_dtype} q/k {layout}"
            q_out, k_out = kt.qk_norm_rope(qq, kk, q_w, k_w, cos, sin, eps)
            _same(q_out, kt.apply_rope(kt.rms_norm(qq, q_w, eps), cos, sin), f"qk_norm_rope q, {what}")
            _same(k_out, kt.apply_rope(kt.rms_norm(kk, k_w, eps), cos, sin), f"qk_norm_rope k, {what}")
        t = T // 2
        one = kt.qk_norm_rope(q[t: t + 1], k[t: t + 1], q_w, k_w, cos[t: t + 1], sin[t: t + 1], eps)
        _same(one[0], q_out[t: t + 1], f"qk_norm_rope q of token {t} alone, {what}")
        _same(one[1], k_out[t: t + 1], f"qk_norm_rope k of token {t} alone, {what}")
        h, y = kt.add_rms_norm(x, r, w, eps)
        _same(h, x + r, f"add_rms_norm h vs torch's add, {model} T={T} w {w_dtype}")
        _same(y, kt.rms_norm(x + r, w, eps), f"add_rms_norm y vs rms_norm of the sum, {model} T={T} w {w_dtype}")
        _same(kt.add_rms_norm(x[t: t + 1], r[t: t + 1], w, eps)[1], y[t: t + 1], f"add_rms_norm row {t} alone")
    n = q_out.float()  # accuracy, once: float64 of the same math (bf16 roundings aside)
    qd = q.double()
    nd = (qd * torch.rsqrt(qd.pow(2).mean(-1, keepdim=True) + eps) * q_w.double())
    c, s_ = cos.double()[:, None], sin.double()[:, None]
    want = torch.cat([nd[..., : D // 2] * c - nd[..., D // 2:] * s_, nd[..., D // 2:] * c + nd[..., : D // 2] * s_], -1)
    _accurate(n, want, torch.bfloat16, f"qk_norm_rope vs float64, {model}")


@pytest.mark.parametrize("mode", ["invariant", "fast"])
def test_fused_row_ops_autograd_graphs_and_modes(mode):
    """mk.qk_norm_rope / mk.add_rms_norm at 8B shapes, T = 4096: the forward with autograd equals
    the one without and the unfused ops', every grad equals the unfused ops' grads bitwise (the
    same backward kernels in the same order), in both modes; a CUDA graph replays the decode step's
    fused ops (T = 64) with the eager bits."""
    import miles_kernels as mk

    hidden, H, K, D = QWEN3_ROWS["8b"]
    g, eps = _gen(13), 1e-6
    q, k, q_w, k_w, cos, sin, x, r, w = _qwen3_rows_inputs(4096, hidden, H, K, D, torch.bfloat16, g)
    q, k = q.contiguous(), k.contiguous()

    def fused(q, k, q_w, k_w, x, r, w):
        return (*mk.qk_norm_rope(q, k, q_w, k_w, cos, sin, eps), *mk.add_rms_norm(x, r, w, eps))

    def unfused(q, k, q_w, k_w, x, r, w):
        h = x + r
        return (mk.apply_rope(mk.rms_norm(q, q_w, eps), cos, sin), mk.apply_rope(mk.rms_norm(k, k_w, eps), cos, sin),
                h, mk.rms_norm(h, w, eps))

    ins = (q, k, q_w, k_w, x, r, w)
    with mk.use_mode(mode):
        with torch.no_grad():
            plain = fused(*ins)
        leaves = [[t.clone().requires_grad_(True) for t in ins] for _ in range(2)]
        got, want = fused(*leaves[0]), unfused(*leaves[1])
        gs = [_randn(*o.shape, dtype=o.dtype, g=g) for o in got]
        grads = [torch.autograd.grad(o, lv, gs) for o, lv in zip((got, want), leaves)]
    names = ("q_out", "k_out", "h", "y")
    for a, b, c, n in zip(got, want, plain, names):
        _same(a.detach(), b.detach(), f"{mode} {n} fused vs unfused")
        _same(c, a.detach(), f"{mode} {n} without vs with autograd")
    for a, b, n in zip(*grads, ("q", "k", "q_w", "k_w", "x", "r", "w")):
        _same(a, b, f"{mode} grad of {n}, fused vs unfused")
    T = 64
    qs, ks, xs, rs = (t[:T].clone() for t in (q, k, x, r))
    cs, ss = cos[:T].clone(), sin[:T].clone()
    with mk.use_mode(mode), torch.no_grad():
        step = lambda: (*mk.qk_norm_rope(qs, ks, q_w, k_w, cs, ss, eps), *mk.add_rms_norm(xs, rs, w, eps))  # noqa: E731
        for _ in range(2):  # compile outside the graph
            step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = step()
        for i in (1, 2):
            for dst, src in ((qs, q), (ks, k), (xs, x), (rs, r), (cs, cos), (ss, sin)):
                dst.copy_(src[i * T: (i + 1) * T])
            graph.replay()
            for a, b, n in zip(static, step(), names):
                _same(a, b, f"{mode} graph replay {n}, step {i}")


def _pow2_rms_rows(M, D, g):
    """bf16 rows whose rms is a power of two (to ~1e-4): x * rsqrt(mean(x^2) + eps) then lands
    within a tiny fraction of a bf16 step of x / 2^k, so its rounding to bf16 inside the gw rule
    is the same in the kernel (fp32), the torch rule and float64 (no flipped roundings)."""
    z = torch.randn(M, D, generator=g, device="cuda", dtype=torch.float64)
    z = z / z.pow(2).mean(-1, keepdim=True).sqrt()
    return (z * 2.0 ** torch.randint(-3, 4, (M, 1), generator=g, device="cuda")).to(torch.bfloat16)


def _rms_norm_grads64(x, w, gy, eps):
    """The rms_norm rule in float64, with the bf16 rounding of xhat that gw sees."""
    xf = x.double()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xf * r
    ga = gy.double() * w.double()
    gx = r * (ga - xhat * (ga * xhat).mean(-1, keepdim=True))
    return gx, (gy.double() * xhat.to(x.dtype).double()).sum(0)


def _no_torch_rule(name, monkeypatch):
    """Make the torch twin of a _grads rule fail, so autograd on CUDA must take the kernel."""
    from miles_kernels import _grads

    def boom(*a, **k):
        raise AssertionError(f"_grads.{name} ran the torch rule on CUDA")

    monkeypatch.setattr(_grads, f"{name}_torch", boom)


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,D", [(4096, 1024), (4096 * 16, 128)])  # hidden norm; q_norm over heads
def test_rms_norm_grad_kernel(kt, M, D, w_dtype, monkeypatch):
    """The backward kernel vs the torch rule and float64 (gw to fp32 precision when w is fp32),
    deterministic, each need flag alone; mk.rms_norm's autograd vs float64 autograd through _ref."""
    import miles_kernels as mk
    from miles_kernels import _grads, _ref

    g, eps = _gen(7), 1e-6
    x = _pow2_rms_rows(M, D, g)
    w = (1 + 0.1 * torch.randn(D, generator=g, device="cuda")).to(w_dtype)
    gy = _randn(M, D, dtype=torch.result_type(x, w), g=g)
    gx, gw = kt.rms_norm_grad(x, w, gy, eps, True, True)
    assert gx.dtype == x.dtype and gw.dtype == w_dtype and gw.shape == (D,)
    rx, rw = _grads.rms_norm_torch((x, w), (eps,), gy, (True, True))
    rx64, rw64 = _rms_norm_grads64(x, w, gy, eps)
    _accurate(gx, rx, torch.bfloat16, "rms_norm gx vs the torch rule")
    _accurate(gx, rx64, torch.bfloat16, "rms_norm gx vs float64")
    _accurate(gw, rw, w_dtype, "rms_norm gw vs the torch rule")
    _accurate(gw, rw64, w_dtype, "rms_norm gw vs float64")
    gx2, gw2 = kt.rms_norm_grad(x, w, gy, eps, True, True)
    _same(gx2, gx, "rms_norm gx run to run")
    _same(gw2, gw, "rms_norm gw run to run")
    only_x, none_w = kt.rms_norm_grad(x, w, gy, eps, True, False)
    none_x, only_w = kt.rms_norm_grad(x, w, gy, eps, False, True)
    assert none_w is None and none_x is None
    _accurate(only_x, gx, torch.bfloat16, "rms_norm gx alone")
    _accurate(only_w, gw, w_dtype, "rms_norm gw alone")
    add = _randn(M, D, dtype=x.dtype, g=g)  # add_rms_norm's residual grad, added in the same pass
    gxa, gwa = kt.rms_norm_grad(x, w, gy, eps, True, True, add)
    _same(gxa, gx + add, "rms_norm gx + add vs torch's add of gx")
    _same(gwa, gw, "rms_norm gw with an add")
    _no_torch_rule("rms_norm", monkeypatch)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with mk.use_mode("invariant"):
        mk.rms_norm(xr, wr, eps).backward(gy)
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    _ref.rms_norm(x64, w64, eps).backward(gy.double())
    _accurate(xr.grad, x64.grad, torch.bfloat16, "mk.rms_norm x grad vs float64 autograd")
    _accurate(wr.grad, w64.grad, torch.bfloat16, "mk.rms_norm w grad vs float64 autograd")  # no xhat rounding there


def test_apply_rope_grad_kernel(kt, monkeypatch):
    """RoPE's backward kernel vs the torch rule and float64; mk.apply_rope's autograd vs float64
    autograd through _ref."""
    import miles_kernels as mk
    from miles_kernels import _grads, _ref

    g = _gen(8)
    T, H, D = 4096, 16, 128
    cos, sin = mk.rope_cos_sin(torch.arange(T, device="cuda"), 1.0 / 1e6 ** (torch.arange(0, D, 2, device="cuda") / D))
    x = _randn(T, H, D, dtype=torch.bfloat16, g=g)
    gy = _randn(T, H, D, dtype=torch.bfloat16, g=g)
    got = kt.apply_rope_grad(gy, cos, sin, x.dtype)
    assert got.dtype == x.dtype and got.shape == (T, H, D)
    _accurate(got, _grads.apply_rope_torch((x, cos, sin), (), gy, (True, False, False))[0], torch.bfloat16,
              "apply_rope grad vs the torch rule")
    g1, g2 = gy.double()[..., : D // 2], gy.double()[..., D // 2:]
    c, s = cos.double()[:, None], sin.double()[:, None]
    _accurate(got, torch.cat([g1 * c + g2 * s, g2 * c - g1 * s], -1), torch.bfloat16, "apply_rope grad vs float64")
    _same(kt.apply_rope_grad(gy, cos, sin, x.dtype), got, "apply_rope grad run to run")
    _no_torch_rule("apply_rope", monkeypatch)
    xr = x.clone().requires_grad_(True)
    with mk.use_mode("invariant"):
        mk.apply_rope(xr, cos, sin).backward(gy)
    x64 = x.double().requires_grad_(True)
    _ref.apply_rope(x64, cos.double(), sin.double()).backward(gy.double())
    _accurate(xr.grad, x64.grad, torch.bfloat16, "mk.apply_rope grad vs float64 autograd")


def test_silu_mul_grad_kernel(kt, monkeypatch):
    """silu_mul's backward kernel on column slices of a fused gate_up vs the torch rule and
    float64, each need flag alone; mk.silu_mul's autograd vs float64 autograd through _ref."""
    import miles_kernels as mk
    from miles_kernels import _grads, _ref

    g = _gen(9)
    M, F = 4096, 3072
    gate_up = _randn(M, 2 * F, dtype=torch.bfloat16, g=g, scale=3)
    a, u = gate_up[:, :F], gate_up[:, F:]
    gy = _randn(M, F, dtype=torch.bfloat16, g=g)
    ga, gu = kt.silu_mul_grad(a, u, gy, True, True)
    assert ga.dtype == gu.dtype == torch.bfloat16 and ga.shape == gu.shape == (M, F)
    ra, ru = _grads.silu_mul_torch((a, u), (), gy, (True, True))
    _accurate(ga, ra, torch.bfloat16, "silu_mul ga vs the torch rule")
    _accurate(gu, ru, torch.bfloat16, "silu_mul gu vs the torch rule")
    ad, ud, gd = a.double(), u.double(), gy.double()
    sig = torch.sigmoid(ad)
    _accurate(ga, gd * ud * sig * (1 + ad * (1 - sig)), torch.bfloat16, "silu_mul ga vs float64")
    _accurate(gu, gd * ad * sig, torch.bfloat16, "silu_mul gu vs float64")
    ga2, gu2 = kt.silu_mul_grad(a, u, gy, True, True)
    _same(ga2, ga, "silu_mul ga run to run")
    _same(gu2, gu, "silu_mul gu run to run")
    only_a, none_u = kt.silu_mul_grad(a, u, gy, True, False)
    none_a, only_u = kt.silu_mul_grad(a, u, gy, False, True)
    assert none_u is None and none_a is None
    _accurate(only_a, ga, torch.bfloat16, "silu_mul ga alone")
    _accurate(only_u, gu, torch.bfloat16, "silu_mul gu alone")
    _no_torch_rule("silu_mul", monkeypatch)
    gur = gate_up.clone().requires_grad_(True)
    with mk.use_mode("invariant"):
        mk.silu_mul(gur[:, :F], gur[:, F:]).backward(gy)
    gu64 = gate_up.double().requires_grad_(True)
    _ref.silu_mul(gu64[:, :F], gu64[:, F:]).backward(gy.double())
    _accurate(gur.grad, gu64.grad, torch.bfloat16, "mk.silu_mul grad vs float64 autograd")


def _logprobs_grad64(z64_TV, ids_T, g_logp_T, g_ent_T, temperature):
    """The logprobs backward rule in float64 on z = logits / T (masked tokens -inf): g_logp
    (onehot - p), no one-hot term at a masked id, - g_ent p (log p + H), then the chain rule's 1 / T."""
    lse = torch.logsumexp(z64_TV, -1, keepdim=True)
    p = (z64_TV - lse).exp()
    logp_all = torch.where(p > 0, z64_TV - lse, 0.0)
    ent = -(p * logp_all).sum(-1, keepdim=True)
    gl, ge = g_logp_T.double()[:, None], g_ent_T.double()[:, None]
    onehot = torch.zeros_like(p).scatter_(-1, ids_T[:, None], 1.0) * torch.isfinite(z64_TV.gather(-1, ids_T[:, None]))
    return (gl * (onehot - p) - ge * p * (logp_all + ent)) / temperature


def test_logprobs_grad_kernel(kt, monkeypatch):
    """_logprobs._logprobs_grad on CUDA (one kernel pass over bf16 logits, the grad in bf16) vs the
    rule in float64, unfiltered and top-k/top-p (the forward's mask, a masked id), entropy on;
    mk.linear_logprobs' autograd (one kernel launch for the chunk) vs float64 autograd through _ref."""
    import miles_kernels as mk
    from miles_kernels import _logprobs as ops
    from miles_kernels import _ref

    calls, kernel = [], kt.logprobs_grad
    monkeypatch.setattr(kt, "logprobs_grad", lambda *a: calls.append(a[0].shape[0]) or kernel(*a))
    g, temp, T, V = _gen(10), 0.7, 300, 151936
    logits = _randn(T, V, dtype=torch.bfloat16, g=g, scale=4)
    g_logp, g_ent = torch.randn(T, generator=g, device="cuda"), torch.randn(T, generator=g, device="cuda")
    for top_k, top_p in ((0, 1.0), (20, 0.9)):
        what = f"logprobs grad kernel top_k={top_k} top_p={top_p}"
        z = logits.float() / temp
        ids = torch.randint(0, V, (T,), generator=g, device="cuda")
        if top_k:
            z = kt.filter_logits(z, top_k, top_p)  # the mask of the forward (invariant mode)
            ids = z.argmax(-1)
            ids[0] = z[0].argmin()  # a masked id: no one-hot term
        _, ent, lse = kt.logprobs(logits, ids, temp, top_k, top_p)
        calls.clear()
        with mk.use_mode("invariant"):
            got = ops._logprobs_grad(logits, ids, lse, ent, g_logp, g_ent, temp, True, top_k, top_p)
            _same(ops._logprobs_grad(logits, ids, lse, ent, g_logp, g_ent, temp, True, top_k, top_p), got,
                  f"{what}: run to run")
        assert calls == [T, T], f"{what}: kernel calls {calls}"
        assert got.dtype == torch.bfloat16 and got.shape == (T, V), what
        z64 = (logits.double() / temp).masked_fill(torch.isinf(z), float("-inf"))
        _accurate(got, _logprobs_grad64(z64, ids, g_logp, g_ent, temp), torch.bfloat16, what)
        if top_k:
            assert got[0, ids[0]] == 0, f"{what}: masked id got {got[0, ids[0]].item()}"

    x = _randn(T, 1024, dtype=torch.bfloat16, g=g).requires_grad_(True)
    w = _randn(V, 1024, dtype=torch.bfloat16, g=g, scale=0.02).requires_grad_(True)
    ids = torch.randint(0, V, (T,), generator=g, device="cuda")
    calls.clear()
    with mk.use_mode("invariant"):
        lp, ent = mk.linear_logprobs(x, w, ids, temp, entropy=True)
        gx, gw = torch.autograd.grad((lp, ent), (x, w), (g_logp, g_ent))
    assert calls == [T], f"linear_logprobs backward: kernel calls {calls}, want one of {T} rows"
    x64, w64 = (t.detach().double().requires_grad_(True) for t in (x, w))
    rl, re = _ref.logprobs(x64 @ w64.T, ids, temp, entropy=True)
    rx, rw = torch.autograd.grad((rl, re), (x64, w64), (g_logp.double(), g_ent.double()))
    assert gx.dtype == gw.dtype == torch.bfloat16
    _accurate(gx, rx, torch.bfloat16, "linear_logprobs grad x vs float64 autograd")
    _accurate(gw, rw, torch.bfloat16, "linear_logprobs grad w vs float64 autograd")
    with mk.use_mode("invariant"):  # 3 chunks (the last partial): gw summed over chunks in fp32
        lp, ent = mk.linear_logprobs(x, w, ids, temp, entropy=True, chunk_rows=128)
        gx3, gw3 = torch.autograd.grad((lp, ent), (x, w), (g_logp, g_ent))
    _accurate(gx3, rx, torch.bfloat16, "linear_logprobs grad x in 3 chunks vs float64 autograd")
    _accurate(gw3, rw, torch.bfloat16, "linear_logprobs grad w in 3 chunks vs float64 autograd")
    with mk.use_mode("invariant"):  # the forward's logits recomputed (keep_bytes=0) vs kept (the default here)
        lp, ent = mk.linear_logprobs(x, w, ids, temp, entropy=True, chunk_rows=128, keep_bytes=0)
        gxr, gwr = torch.autograd.grad((lp, ent), (x, w), (g_logp, g_ent))
    _same(gxr, gx3, "linear_logprobs grad x, logits recomputed vs kept")
    _same(gwr, gw3, "linear_logprobs grad w, logits recomputed vs kept")
