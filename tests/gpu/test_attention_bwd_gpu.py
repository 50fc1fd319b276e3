"""The Triton backward of the packed training attention (_triton/attention_bwd.py) on a GPU.

Run on a CUDA machine (triton >= 3.6):  python -m pytest -q tests/gpu/test_attention_bwd_gpu.py
Its grads must be as close to an fp32 reference as flash's backward is (both round P and dS to
bf16 before their matmuls), for Qwen3's head layouts and several packed sequences.
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

HEADS = {"0.6b": (16, 8), "8b": (32, 8)}
LENS = [4096, 1000, 1, 333, 77]  # a long sequence, a lone token, lengths off every block size
D = 128


def _case(H: int, K: int, lens: list[int], seed: int):
    """bf16 q, k, v, dout of packed sequences and varlen_meta's (meta, slots, pages)."""
    import miles_kernels as mk

    g = torch.Generator(device="cuda").manual_seed(seed)
    T = sum(lens)
    q, k, v, dout = (torch.randn(T, n, D, generator=g, device="cuda").to(torch.bfloat16) for n in (H, K, K, H))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    return (q, k, v, dout), mk.varlen_meta(cu, mk.ATTN_BLOCK, "cuda")


def _flash(q, k, v, dout, meta, scale):
    """(dq, dk, dv) of flash's varlen backward from flash's own forward (what ops runs when
    our LSE is not used), called directly: no ops state shared with other tests."""
    from miles_kernels import ops

    out, lse, rng, unused = ops._flash_varlen_forward(q, k, v, meta, scale)
    cu, L = meta.cu_seqlens_q, meta.max_q_len
    return torch.ops.aten._flash_attention_backward(dout, q, k, v, out, lse, cu, cu, L, L, 0.0, True, rng, unused,
                                                    scale=scale)[:3]


def _reference(q, k, v, dout, lens, scale):
    """(dq, dk, dv) by fp32 autograd through causal attention, one sequence at a time."""
    G = q.shape[1] // k.shape[1]
    ins = [t.detach().float().requires_grad_() for t in (q, k, v)]
    lo = 0
    for L in lens:
        qs, ks, vs = (t[lo:lo + L] for t in ins)
        s = torch.einsum("thd,lhd->htl", qs, ks.repeat_interleave(G, 1)) * scale
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device="cuda").triu(1)[None], float("-inf"))
        o = torch.einsum("htl,lhd->thd", s.softmax(-1), vs.repeat_interleave(G, 1))
        o.backward(dout[lo:lo + L].float())
        lo += L
    return [t.grad for t in ins]


def _errs(got, ref):
    """(max, mean) |got - ref| of each grad."""
    return [((a.double() - r.double()).abs().max().item(), (a.double() - r.double()).abs().mean().item())
            for a, r in zip(got, ref)]


@pytest.mark.parametrize("model", sorted(HEADS))
def test_grads_as_accurate_as_flash(model):
    """Ours (from our forward's output and LSE) vs flash's varlen backward (from its own
    forward) vs an fp32 reference: ours within 2x flash's max error and 1.5x its mean error,
    within bf16 rounding of flash's, and deterministic (two runs, the same bits)."""
    from miles_kernels import _triton as kt

    H, K = HEADS[model]
    scale = D**-0.5
    (q, k, v, dout), (meta, _, _) = _case(H, K, LENS, seed=1)
    lse = torch.empty(H, q.shape[0], device="cuda")
    out = kt.packed_attention(q, k, v, meta.cu_seqlens_q, meta.max_q_len, scale, lse_HT=lse)
    ours = kt.packed_attention_bwd(q, k, v, out, dout, lse, meta.cu_seqlens_q, meta.max_q_len, scale)
    again = kt.packed_attention_bwd(q, k, v, out, dout, lse, meta.cu_seqlens_q, meta.max_q_len, scale)
    flash = _flash(q, k, v, dout, meta, scale)
    ref = _reference(q, k, v, dout, LENS, scale)
    for name, a, b, f, r, (e_max, e_mean), (f_max, f_mean) in zip(
            ("dq", "dk", "dv"), ours, again, flash, ref, _errs(ours, ref), _errs(flash, ref)):
        assert a.dtype == torch.bfloat16 and a.shape == f.shape, f"{name}: {a.dtype} {list(a.shape)}"
        assert torch.equal(a, b), f"{model} {name}: two runs differ"
        what = f"{model} {name}: ours max {e_max:.3g} mean {e_mean:.3g}, flash max {f_max:.3g} mean {f_mean:.3g}"
        assert e_max <= 2 * f_max + 1e-6 and e_mean <= 1.5 * f_mean + 1e-7, what
        diff = (a.double() - f.double()).abs().max().item()  # within bf16 rounding of flash's
        assert diff <= 2e-2 * f.double().abs().max().item(), f"{what}; ours vs flash max {diff:.3g}"


def test_kv_attention_backward_switch(monkeypatch):
    """ops with ATTN_BWD = "triton" (what MILES_ATTN_BWD=triton sets at import): the training
    attention's grads are packed_attention_bwd's, from the forward's own output and LSE."""
    import miles_kernels as mk
    from miles_kernels import _triton as kt
    from miles_kernels import ops

    H, K = HEADS["0.6b"]
    lens = [700, 1, 300]
    (q, k, v, dout), (meta, slot, pages) = _case(H, K, lens, seed=2)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    monkeypatch.setattr(ops, "ATTN_BWD", "triton")
    with mk.use_mode("invariant"):
        kc = torch.zeros(pages, mk.ATTN_BLOCK, K, D, device="cuda", dtype=torch.bfloat16)
        o = mk.kv_attention(*leaves, kc, torch.zeros_like(kc), meta, slot, D**-0.5)
        got = torch.autograd.grad(o, leaves, dout)
    lse = torch.empty(H, q.shape[0], device="cuda")
    out = kt.packed_attention(q, k, v, meta.cu_seqlens_q, meta.max_q_len, D**-0.5, lse_HT=lse)
    assert torch.equal(out, o.detach())
    want = kt.packed_attention_bwd(q, k, v, out, dout, lse, meta.cu_seqlens_q, meta.max_q_len, D**-0.5)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert torch.equal(a, b), f"{name}: ops' triton backward differs from packed_attention_bwd"


@pytest.mark.parametrize("model", sorted(HEADS))
def test_fused_dq(model, monkeypatch):
    """DQ_FUSED: dQ made in the dK/dV kernel, summed per query block in KV-block order. At each
    fused tile: as accurate as the split kernels (within 1.5x their max and 1.2x their mean
    error vs the fp32 reference, within bf16 rounding of them), deterministic, and a sequence's
    grads do not depend on what is packed beside it (alone vs in the pack: the same bits)."""
    from miles_kernels import _triton as kt
    from miles_kernels._triton import attention_bwd as B

    H, K = HEADS[model]
    scale = D**-0.5
    (q, k, v, dout), (meta, _, _) = _case(H, K, LENS, seed=3)
    lse = torch.empty(H, q.shape[0], device="cuda")
    out = kt.packed_attention(q, k, v, meta.cu_seqlens_q, meta.max_q_len, scale, lse_HT=lse)
    args = (q, k, v, out, dout, lse, meta.cu_seqlens_q, meta.max_q_len, scale)
    split = kt.packed_attention_bwd(*args)
    ref = _reference(q, k, v, dout, LENS, scale)
    monkeypatch.setattr(B, "DQ_FUSED", True)
    lo, n = LENS[0], LENS[1]  # the second sequence alone
    rows = slice(lo, lo + n)
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    alone_lse = torch.empty(H, n, device="cuda")
    alone_out = kt.packed_attention(q[rows], k[rows], v[rows], cu, n, scale, lse_HT=alone_lse)
    for tile in sorted(set(B.FUSED_TILES[torch.bfloat16])):
        fused = kt.packed_attention_bwd(*args, dkdv_tile=tile)
        again = kt.packed_attention_bwd(*args, dkdv_tile=tile)
        alone = kt.packed_attention_bwd(q[rows], k[rows], v[rows], alone_out, dout[rows], alone_lse, cu, n, scale,
                                        dkdv_tile=tile)
        for name, f, s, a, b, (f_max, f_mean), (s_max, s_mean) in zip(
                ("dq", "dk", "dv"), fused, split, again, alone, _errs(fused, ref), _errs(split, ref)):
            what = f"{model} {tile} {name}: fused max {f_max:.3g} mean {f_mean:.3g}, split max {s_max:.3g} mean {s_mean:.3g}"
            assert f_max <= 1.5 * s_max + 1e-6 and f_mean <= 1.2 * s_mean + 1e-7, what
            diff = (f.double() - s.double()).abs().max().item()
            assert diff <= 2e-2 * s.double().abs().max().item(), f"{what}; fused vs split max {diff:.3g}"
            assert torch.equal(f, a), f"{model} {tile} {name}: two fused runs differ"
            assert torch.equal(b, f[rows]), f"{model} {tile} {name}: a sequence alone differs from it in the pack"


def test_fused_dq_long_sequence(monkeypatch):
    """DQ_FUSED at 32k tokens (0.6B heads): 256 KV blocks a head wait in turn on one another, more
    programs than the GPU holds at once; the grads agree with the split kernels' (bf16 rounding)
    and two runs give the same bits."""
    from miles_kernels import _triton as kt
    from miles_kernels._triton import attention_bwd as B

    H, K = HEADS["0.6b"]
    scale = D**-0.5
    lens = [32768, 100]
    (q, k, v, dout), (meta, _, _) = _case(H, K, lens, seed=4)
    lse = torch.empty(H, q.shape[0], device="cuda")
    out = kt.packed_attention(q, k, v, meta.cu_seqlens_q, meta.max_q_len, scale, lse_HT=lse)
    args = (q, k, v, out, dout, lse, meta.cu_seqlens_q, meta.max_q_len, scale)
    split = kt.packed_attention_bwd(*args)
    monkeypatch.setattr(B, "DQ_FUSED", True)
    fused = kt.packed_attention_bwd(*args)
    again = kt.packed_attention_bwd(*args)
    for name, f, s, a in zip(("dq", "dk", "dv"), fused, split, again):
        diff = (f.double() - s.double()).abs().max().item()
        assert f.isfinite().all() and diff <= 2e-2 * s.double().abs().max().item(), f"{name}: fused vs split {diff:.3g}"
        assert torch.equal(f, a), f"{name}: two fused runs differ"


GLUON_CASES = [
    ((16, 8), 128, torch.bfloat16, [4096]),
    ((16, 8), 128, torch.bfloat16, [1000, 3000, 77, 4096, 1]),
    ((32, 8), 128, torch.float16, [2500]),
    ((12, 4), 128, torch.bfloat16, [3000, 1290]),
    ((8, 8), 64, torch.bfloat16, [2500, 63]),
    ((16, 8), 128, torch.bfloat16, [2048, 65, 130, 191, 64]),  # a program's second half partial or empty
]


def _gluon_case(heads, hd, dtype, lens):
    """(packed_attention_bwd's arguments) of random packed sequences, the forward's own output and LSE."""
    from miles_kernels import _triton as kt
    from miles_kernels._triton import gluon_attention as GA

    if torch.cuda.get_device_capability() != (9, 0) or not GA.usable():
        pytest.skip("the Gluon kernels run on sm_90 with the Triton releases in GA.TESTED_TRITON")
    (H, K), T = heads, sum(lens)
    g = torch.Generator(device="cuda").manual_seed(T)
    q, dout = (torch.randn(T, H, hd, generator=g, device="cuda").to(dtype) for _ in range(2))
    k, v = (torch.randn(T, K, hd, generator=g, device="cuda").to(dtype) for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    scale = hd**-0.5
    lse = torch.empty(H, T, device="cuda")
    out = kt.packed_attention(q, k, v, cu, max(lens), scale, lse_HT=lse)
    return q, k, v, out, dout, lse, cu, max(lens), scale


def _same_grads(got, again, ref, what):
    for name, a, b, c in zip(("dq", "dk", "dv"), got, again, ref):
        assert torch.equal(a, b), f"{name}: two {what} runs differ"
        assert torch.equal(a, c), f"{name}: {what} vs Triton, max diff {(a.float() - c.float()).abs().max()}"


@pytest.mark.parametrize("heads,hd,dtype,lens", GLUON_CASES)
def test_gluon_dkdv_bitwise(monkeypatch, heads, hd, dtype, lens):
    """On Hopper the backward's dK/dV comes from gluon_attention_bwd's kernel: dq, dk, dv bitwise ==
    the Triton kernels' (GLUON_DKDV off), GQA groups of 1 to 4 (3 too), head dims 64 and 128, bf16
    and fp16, packs with 1-token and 63-token sequences; two runs the same bits."""
    from miles_kernels import _triton as kt
    from miles_kernels._triton import attention_bwd as AB
    from miles_kernels._triton import gluon_attention_bwd as GB

    monkeypatch.setattr(AB, "GLUON_DQ", False)  # dQ by the Triton kernel throughout
    args = _gluon_case(heads, hd, dtype, lens)
    calls = []
    real = GB.dkdv
    monkeypatch.setattr(GB, "dkdv", lambda *a: calls.append(1) or real(*a))
    gluon, again = kt.packed_attention_bwd(*args), kt.packed_attention_bwd(*args)
    assert len(calls) == 2, "packed_attention_bwd did not take the Gluon dK/dV kernel"
    monkeypatch.setattr(AB, "GLUON_DKDV", False)
    ref = kt.packed_attention_bwd(*args)
    assert len(calls) == 2
    _same_grads(gluon, again, ref, "Gluon dK/dV")


@pytest.mark.parametrize("heads,hd,dtype,lens", GLUON_CASES)
def test_gluon_dq_bitwise(monkeypatch, heads, hd, dtype, lens):
    """On Hopper dQ comes from gluon_attention_bwd's dQ kernel: dq, dk, dv bitwise == with
    GLUON_DQ off, two runs the same bits (the cases of test_gluon_dkdv_bitwise)."""
    from miles_kernels import _triton as kt
    from miles_kernels._triton import attention_bwd as AB
    from miles_kernels._triton import gluon_attention_bwd as GB

    args = _gluon_case(heads, hd, dtype, lens)
    calls = []
    real = GB.dq
    monkeypatch.setattr(GB, "dq", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(AB, "GLUON_DQ", True)
    gluon, again = kt.packed_attention_bwd(*args), kt.packed_attention_bwd(*args)
    assert len(calls) == 2, "packed_attention_bwd did not take the Gluon dQ kernel"
    monkeypatch.setattr(AB, "GLUON_DQ", False)
    _same_grads(gluon, again, kt.packed_attention_bwd(*args), "Gluon dQ")


# one small launch of gluon_dkdvq's kernel in each diagonal variant: two sequences, the first with
# 3 KV blocks (turns passed on twice), partial query and KV blocks
_GLUON_DKDVQ_PROBE = """
import torch
from miles_kernels import _triton as kt
from miles_kernels._triton import attention_bwd as AB
from miles_kernels._triton import gluon_dkdvq as GF
AB.DQ_FUSED = True
lens, H, K, D = [300, 77], 4, 2, 128
T = sum(lens)
q, do = (torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
k, v = (torch.randn(T, K, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
cu = torch.tensor([0, 300, 377], dtype=torch.int32, device="cuda")
lse = torch.empty(H, T, device="cuda")
out = kt.packed_attention(q, k, v, cu, 300, D**-0.5, lse_HT=lse)
for GF.DIAGONAL_IN_CONSUMER in (True, False):
    kt.packed_attention_bwd(q, k, v, out, do, lse, cu, 300, D**-0.5)
    torch.cuda.synchronize()
"""
_probed = []


@pytest.mark.parametrize("diag", [True, False], ids=["consumers_diagonal", "writers_diagonal"])
@pytest.mark.parametrize("heads,hd,dtype,lens", GLUON_CASES + [((16, 8), 128, torch.bfloat16, [16384])])
def test_gluon_fused_dkdvq_bitwise(monkeypatch, heads, hd, dtype, lens, diag):
    """DQ_FUSED on Hopper runs gluon_dkdvq's kernel: dq, dk, dv bitwise == the Triton fused kernel's
    at its tile (FUSED_TILES), two runs the same bits, in a CUDA graph too; the cases of
    test_gluon_dkdv_bitwise and one 16k sequence (128 KV blocks a head in turn), with the diagonal's
    sums finished by the consumers or by the writers (DIAGONAL_IN_CONSUMER)."""
    from test_kernels_gpu import _launches_in_a_child

    from miles_kernels import _triton as kt
    from miles_kernels._triton import attention_bwd as AB
    from miles_kernels._triton import gluon_dkdvq as GF

    args = _gluon_case(heads, hd, dtype, lens)
    if not _probed:  # a hang (a turn or barrier protocol gone wrong) fails here, in a child
        _launches_in_a_child(_GLUON_DKDVQ_PROBE, "gluon_dkdvq's kernel")
        _probed.append(1)
    monkeypatch.setattr(AB, "DQ_FUSED", True)
    monkeypatch.setattr(GF, "DIAGONAL_IN_CONSUMER", diag)
    calls = []
    real = GF.dkdvq
    monkeypatch.setattr(GF, "dkdvq", lambda *a: calls.append(1) or real(*a))
    gluon, again = kt.packed_attention_bwd(*args), kt.packed_attention_bwd(*args)
    assert len(calls) == 2, "packed_attention_bwd did not take the Gluon fused kernel"
    ref = kt.packed_attention_bwd(*args, dkdv_tile=AB.FUSED_TILES[dtype][0])  # the Triton fused kernel
    assert len(calls) == 2
    _same_grads(gluon, again, ref, "Gluon fused dK/dV/dQ")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = kt.packed_attention_bwd(*args)
    graph.replay()
    _same_grads(replayed, gluon, ref, "Gluon fused dK/dV/dQ in a CUDA graph")
