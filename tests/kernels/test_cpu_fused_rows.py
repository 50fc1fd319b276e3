"""CPU: the fused row ops (mk.add_rms_norm, mk.qk_norm_rope) give the bits of the ops they fuse,
forward and backward, in both modes, with and without autograd; rows stay batch-invariant."""

import dataclasses

import pytest
import torch

import miles_kernels as mk

DTYPES = [torch.float32, torch.bfloat16]
EPS = 1e-6


def _same(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype} {list(a.shape)} vs {b.dtype} {list(b.shape)}"
    assert torch.equal(a, b), f"{what}: not bitwise equal, max diff {(a.double() - b.double()).abs().max().item()}"


def _qk_inputs(T, H, K, D, dtype, w_dtype, g):
    """(q, k, q_w, k_w), q and k views of one fused [T, H + 2K, D] projection, and (cos, sin)
    of scattered positions."""
    qkv = (torch.randn(T, H + 2 * K, D, generator=g) * 3).to(dtype)
    q_w = (1 + 0.1 * torch.randn(D, generator=g)).to(w_dtype)
    k_w = (1 + 0.1 * torch.randn(D, generator=g)).to(w_dtype)
    pos = torch.randint(0, 5000, (T,), generator=g)
    tables = mk.rope_cos_sin(pos, 1.0 / (1e6 ** (torch.arange(0, D, 2).float() / D)))
    return (qkv[:, :H], qkv[:, H: H + K], q_w, k_w), tables


def unfused_qk(q, k, q_w, k_w, cos, sin):
    return mk.apply_rope(mk.rms_norm(q, q_w, EPS), cos, sin), mk.apply_rope(mk.rms_norm(k, k_w, EPS), cos, sin)


def fused_qk(q, k, q_w, k_w, cos, sin):
    return mk.qk_norm_rope(q, k, q_w, k_w, cos, sin, EPS)


def unfused_add(x, r, w):
    h = x + r
    return h, mk.rms_norm(h, w, EPS)


def fused_add(x, r, w):
    return mk.add_rms_norm(x, r, w, EPS)


def _check_fused(fused, unfused, ins, consts, g, what):
    """Forward without and with autograd, and the grads of every input: bitwise equal."""
    with torch.no_grad():
        for a, b in zip(fused(*ins, *consts), unfused(*ins, *consts)):
            _same(a, b, f"{what}: forward without autograd")
    leaves = [[t.detach().clone().requires_grad_(True) for t in ins] for _ in range(2)]
    outs = fused(*leaves[0], *consts), unfused(*leaves[1], *consts)
    for a, b in zip(*outs):
        _same(a.detach(), b.detach(), f"{what}: forward with autograd")
    gs = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs[0]]
    ga, gb = (torch.autograd.grad(o, lv, gs) for o, lv in zip(outs, leaves))
    for i, (a, b) in enumerate(zip(ga, gb)):
        _same(a, b, f"{what}: grad of input {i}")


@pytest.mark.parametrize("mode", ["invariant", "fast"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,K,D", [(37, 6, 2, 40), (5, 3, 3, 16), (1, 4, 1, 72), (70, 16, 8, 128)])
def test_qk_norm_rope_equals_rms_norm_then_apply_rope(mode, dtype, T, H, K, D):
    g = torch.Generator().manual_seed(T * H + D)
    ins, tables = _qk_inputs(T, H, K, D, dtype, dtype, g)
    with mk.use_mode(mode):
        _check_fused(fused_qk, unfused_qk, ins, tables, g, f"qk_norm_rope {mode} {dtype} T={T} H={H} K={K} D={D}")
        # contiguous q and k (the model's: separate projections) and only k differentiable
        q, k = (t.contiguous() for t in ins[:2])
        _check_fused(lambda k_, *r: fused_qk(q, k_, *r), lambda k_, *r: unfused_qk(q, k_, *r), (k, *ins[2:]),
                     tables, g, f"qk_norm_rope {mode} {dtype}, k alone")


@pytest.mark.parametrize("mode", ["invariant", "fast"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,D", [(37, 72), (1, 40), (90, 1024)])
def test_add_rms_norm_equals_add_then_rms_norm(mode, dtype, M, D):
    g = torch.Generator().manual_seed(M + D)
    x, r = ((torch.randn(M, D, generator=g) * s).to(dtype) for s in (1.0, 3.0))
    w = (1 + 0.1 * torch.randn(D, generator=g)).to(dtype)
    with mk.use_mode(mode):
        _check_fused(fused_add, unfused_add, (x, r, w), (), g, f"add_rms_norm {mode} {dtype} M={M} D={D}")
        x3, r3 = x.view(1, M, D), r.view(1, M, D)  # any leading dims, as rms_norm takes
        for a, b in zip(fused_add(x3, r3, w), unfused_add(x3, r3, w)):
            _same(a, b, "add_rms_norm on [1, M, D]")


def test_fused_rows_mixed_dtypes_and_invariance():
    """fp32 weights with bf16 activations: outputs in torch's promotion (fp32), as the unfused
    ops give them; an add of two dtypes runs the two ops. Each row alone equals it in a batch."""
    g = torch.Generator().manual_seed(9)
    ins, tables = _qk_inputs(29, 4, 2, 48, torch.bfloat16, torch.float32, g)
    _check_fused(fused_qk, unfused_qk, ins, tables, g, "qk_norm_rope bf16 x, fp32 w")
    x, r = torch.randn(29, 48, generator=g).bfloat16(), torch.randn(29, 48, generator=g)
    for a, b in zip(fused_add(x, r, ins[2]), unfused_add(x, r, ins[2])):
        _same(a, b, "add_rms_norm bf16 + fp32")
    x = x.float()
    q, k = ins[0], ins[1]
    qo, ko = fused_qk(*ins, *tables)
    h, y = fused_add(x, r, ins[2])
    for i in (0, 13, 28):
        one = fused_qk(q[i: i + 1], k[i: i + 1], *ins[2:], tables[0][i: i + 1], tables[1][i: i + 1])
        _same(one[0][0], qo[i], f"qk_norm_rope q row {i} alone")
        _same(one[1][0], ko[i], f"qk_norm_rope k row {i} alone")
        h1, y1 = fused_add(x[i: i + 1], r[i: i + 1], ins[2])
        _same(y1[0], y[i], f"add_rms_norm row {i} alone")


def test_fused_rows_reject_bad_shapes():
    (q, k, q_w, k_w), (cos, sin) = _qk_inputs(4, 2, 1, 16, torch.float32, torch.float32, torch.Generator())
    for call, word in ((lambda: mk.qk_norm_rope(q, k[:3], q_w, k_w, cos, sin, EPS), "one T"),
                       (lambda: mk.qk_norm_rope(q, k, q_w[:8], k_w, cos, sin, EPS), "weights"),
                       (lambda: mk.qk_norm_rope(q, k, q_w, k_w, cos[:, :4], sin, EPS), "cos/sin"),
                       (lambda: mk.qk_norm_rope(q, k, q_w, k_w, cos.double(), sin, EPS), "fp32"),
                       (lambda: mk.add_rms_norm(q, k, q_w, EPS), "differ"),
                       (lambda: mk.add_rms_norm(q[0], q[0], q_w[:8], EPS), "weight shape")):
        with pytest.raises((ValueError, TypeError), match=word):
            call()
    assert [t.shape for t in mk.qk_norm_rope(q[:0], k[:0], q_w, k_w, cos[:0], sin[:0], EPS)] == [(0, 2, 16), (0, 1, 16)]
    assert [t.shape for t in mk.add_rms_norm(q[:0, 0], q[:0, 0], q_w, EPS)] == [(0, 16), (0, 16)]


@pytest.mark.parametrize("mode", ["invariant", "fast"])
def test_qk_norm_rope_kv_attention_is_the_two_ops(mode):
    """mk.qk_norm_rope_kv_attention = kv_attention(*qk_norm_rope(...), v, ...): output, cache and
    grads, for a paged meta (the engine's) and packed training sequences; it checks shapes as
    qk_norm_rope does. (On CUDA the engine's path is one kernel: tests/gpu checks its bits.)"""
    g = torch.Generator().manual_seed(9)
    H, K, D, page = 4, 2, 16, 16
    cu = torch.tensor([0, 5, 22, 30])
    meta, slot, pages = mk.varlen_meta(cu, page)
    T = int(cu[-1])
    (q, k, q_w, k_w), (cos, sin) = _qk_inputs(T, H, K, D, torch.float32, torch.float32, g)
    v = torch.randn(T, K, D, generator=g)
    with mk.use_mode(mode):
        for m in (meta, dataclasses.replace(meta, packed=False)):
            assert m.packed == (m is meta)
            outs, caches, grads = [], [], []
            for fused in (True, False):
                leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
                kc, vc = (torch.zeros(pages, page, K, D) for _ in range(2))
                if fused:
                    o = mk.qk_norm_rope_kv_attention(*leaves, q_w, k_w, cos, sin, EPS, kc, vc, m, slot, D**-0.5)
                else:
                    qn, kn = mk.qk_norm_rope(leaves[0], leaves[1], q_w, k_w, cos, sin, EPS)
                    o = mk.kv_attention(qn, kn, leaves[2], kc, vc, m, slot, D**-0.5)
                outs.append(o.detach())
                caches.append((kc.detach(), vc.detach()))
                grads.append(torch.autograd.grad(o.sum(), leaves))
            what = f"{mode}, packed={m.packed}"
            _same(outs[0], outs[1], f"{what}: output")
            for a, b in zip(caches[0] + grads[0], caches[1] + grads[1]):
                _same(a, b, f"{what}: cache or grad")
        with pytest.raises(ValueError, match="one T"):
            mk.qk_norm_rope_kv_attention(q, k[:3], v, q_w, k_w, cos, sin, EPS, kc, vc, meta, slot, D**-0.5)
