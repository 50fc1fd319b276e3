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
    from miles_kernels import _train_attention

    out, lse, rng, unused = _train_attention._flash_varlen_forward(q, k, v, meta, scale)
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
    from miles_kernels import _train_attention as ops

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

