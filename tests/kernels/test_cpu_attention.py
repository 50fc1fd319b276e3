"""CPU attention: prefill == chunked prefill == decode bitwise, any batch; accuracy; grads."""

import dataclasses

import pytest
import torch

import miles_kernels as mk
from miles_kernels import _ref


def _cache(num_pages, page, K, D, dtype):
    return torch.zeros(num_pages, page, K, D, dtype=dtype), torch.zeros(num_pages, page, K, D, dtype=dtype)


def _run_chunks(q_LHD, k_LKD, v_LKD, chunks, page, dtype, others=()):
    """Feed one sequence in the given chunks (plus unrelated sequences in the same batch)."""
    L, H, D = q_LHD.shape
    K = k_LKD.shape[1]
    pages = (L + page - 1) // page
    kc, vc = _cache(pages + 8, page, K, D, dtype)
    perm = torch.randperm(pages + 8, generator=torch.Generator().manual_seed(len(chunks)))
    table = perm[:pages].to(torch.int32)
    outs, pos = [], 0
    for n in chunks:
        slots = (table[torch.arange(pos, pos + n) // page].long() * page + torch.arange(pos, pos + n) % page)
        mk.write_kv(kc, vc, k_LKD[pos: pos + n], v_LKD[pos: pos + n], slots)
        q = q_LHD[pos: pos + n]
        cu, kv_lens, tables = [0, n], [pos + n], [table]
        for oq in others:  # unrelated sequence before ours: a one-token decode over its own pages
            q = torch.cat([oq, q])
            cu = [0, 1, 1 + n]
            kv_lens = [1] + kv_lens
            tables = [perm[pages: pages + 1].to(torch.int32)] + tables
        max_p = max(len(t) for t in tables)
        bt = torch.stack([torch.nn.functional.pad(t, (0, max_p - len(t))) for t in tables])
        meta = mk.AttnMeta(torch.tensor(cu, dtype=torch.int32), torch.tensor(kv_lens, dtype=torch.int32), bt, n)
        o = mk.attention(q, kc, vc, meta, D ** -0.5)
        outs.append(o[len(others):])
        pos += n
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("H,K", [(4, 2), (3, 1)])
def test_prefill_chunked_decode_identical(dtype, page, H, K):
    g = torch.Generator().manual_seed(page + H)
    L, D = 45, 16
    q = torch.randn(L, H, D, generator=g).to(dtype)
    k = torch.randn(L, K, D, generator=g).to(dtype)
    v = torch.randn(L, K, D, generator=g).to(dtype)
    prefill = _run_chunks(q, k, v, [L], page, dtype)
    chunked = _run_chunks(q, k, v, [16, 16, 13], page, dtype)
    ragged = _run_chunks(q, k, v, [5, 20, 3, 17], page, dtype)
    decode = _run_chunks(q, k, v, [1] * L, page, dtype)
    mixed = _run_chunks(q, k, v, [10] + [1] * 35, page, dtype, others=(torch.randn(1, H, D, generator=g).to(dtype),))
    for other in (chunked, ragged, decode, mixed):
        assert torch.equal(prefill, other)
    # accuracy vs float64 dense attention
    ref = _run_ref(q.double(), k.double(), v.double())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert ((prefill.double() - ref).norm() / ref.norm()) < tol


def _run_ref(q, k, v):
    L, H, D = q.shape
    kk = k.repeat_interleave(H // k.shape[1], dim=1)
    vv = v.repeat_interleave(H // v.shape[1], dim=1)
    s = torch.einsum("qhd,khd->hqk", q, kk) * D ** -0.5
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), vv)


def test_varlen_training_path_matches_and_has_grads():
    g = torch.Generator().manual_seed(7)
    lens = [5, 17, 33]
    H, K, D = 4, 2, 8
    cu = torch.tensor([0, 5, 22, 55])
    meta, slot, pages = mk.varlen_meta(cu, 16)
    T = int(cu[-1])
    q = torch.randn(T, H, D, generator=g, requires_grad=True)
    k = torch.randn(T, K, D, generator=g, requires_grad=True)
    v = torch.randn(T, K, D, generator=g, requires_grad=True)
    kc, vc = _cache(pages, 16, K, D, torch.float32)
    mk.write_kv(kc, vc, k, v, slot)
    o = mk.attention(q, kc, vc, meta, D ** -0.5)
    # each packed sequence equals the same sequence run alone
    start = 0
    for n in lens:
        alone = _run_chunks(q[start:start + n].detach(), k[start:start + n].detach(), v[start:start + n].detach(), [n], 16, torch.float32)
        assert torch.equal(alone, o[start:start + n].detach())
        start += n
    gq, gk, gv = torch.autograd.grad(o.square().sum(), (q, k, v))
    kc2, vc2 = _cache(pages, 16, K, D, torch.float32)
    mk.write_kv(kc2, vc2, k, v, slot)
    o2 = _ref.attention(q, kc2, vc2, meta, D ** -0.5)
    rq, rk, rv = torch.autograd.grad(o2.square().sum(), (q, k, v))
    for a, b in ((gq, rq), (gk, rk), (gv, rv)):
        assert torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(o, o2, atol=1e-5)
    # the host copy of the offsets (what the backward loops over without a device sync) is
    # the tensors', and the reference gives the same bits with or without it
    assert meta.host == (tuple(cu.tolist()), tuple(lens))
    no_host = dataclasses.replace(meta, host=None)
    assert torch.equal(_ref.attention(q, kc2, vc2, no_host, D ** -0.5), o2)


@pytest.mark.parametrize("mode", ["invariant", "fast"])
def test_kv_attention_packed_path_equals_the_cache_path(mode):
    """kv_attention on packed training sequences (backward from the packed K/V, the cache
    scratch space) gives the cache path's output bits and its grads; an empty sequence too."""
    g = torch.Generator().manual_seed(8)
    H, K, D = 4, 2, 8
    cu = torch.tensor([0, 5, 5, 22, 55])  # lengths 5, 0, 17, 33
    meta, slot, pages = mk.varlen_meta(cu, 16)
    assert meta.packed and not dataclasses.replace(meta, packed=False).packed
    T = int(cu[-1])
    leaves = [torch.randn(T, n, D, generator=g, requires_grad=True) for n in (H, K, K)]
    g_out = torch.randn(T, H, D, generator=g)
    outs, grads = [], []
    with mk.use_mode(mode):
        for m in (dataclasses.replace(meta, packed=False), meta):
            kc, vc = _cache(pages, 16, K, D, torch.float32)
            o = mk.kv_attention(*leaves, kc, vc, m, slot, D ** -0.5)
            outs.append(o.detach())
            grads.append(torch.autograd.grad(o, leaves, g_out))
            if m.packed and mode == "invariant":  # the cache got the K/V, but no grad path
                assert not kc.requires_grad and torch.equal(kc.view(-1, K, D)[slot], leaves[1].detach())
        with torch.no_grad():
            kc, vc = _cache(pages, 16, K, D, torch.float32)
            outs.append(mk.kv_attention(*leaves, kc, vc, meta, slot, D ** -0.5))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()


@pytest.mark.parametrize("rows", [1, 3])
def test_ref_batched_path_matches_the_per_sequence_loop(rows):
    """Fast mode's (_ref) attention with `rows` queries per sequence (decode; the padded
    speculative verify) takes the batched, graph-capturable path; it must agree with the
    per-sequence loop (query i of a sequence at position kv_len - rows + i)."""
    from miles_kernels.meta import AttnMeta

    g = torch.Generator().manual_seed(0)
    P, S, K, D, H, B = 20, 4, 2, 8, 6, 3
    k_cache, v_cache = torch.randn(P, S, K, D, generator=g), torch.randn(P, S, K, D, generator=g)
    kv = torch.tensor([5, 9, 3], dtype=torch.int32)
    table = torch.tensor([[1, 2, 0, 0], [3, 4, 5, 0], [6, 0, 0, 0]], dtype=torch.int32)
    q = torch.randn(B * rows, H, D, generator=g)
    cu = torch.arange(B + 1, dtype=torch.int32) * rows
    batched = _ref.attention(q, k_cache, v_cache, AttnMeta(cu, kv, table, rows), 0.3)
    loop = torch.cat([_ref.attention(q[b * rows:(b + 1) * rows], k_cache, v_cache,
                                     AttnMeta(cu[:2], kv[b:b + 1], table[b:b + 1], rows + 1), 0.3) for b in range(B)])
    torch.testing.assert_close(batched, loop, rtol=1e-5, atol=1e-5)


def test_kv_attention_flash_failure_falls_back_once_with_a_warning(monkeypatch, caplog):
    """A flash varlen call that raises (this torch's private signature moved, no flash in the
    build) is logged once and the SDPA path serves from then on, with the same grads; out of
    memory is not swallowed."""
    from miles_kernels import _train_attention as ta

    H, K, D = 4, 2, 8
    cu = torch.tensor([0, 7, 20])
    meta, slot, pages = mk.varlen_meta(cu, 16)
    g = torch.Generator().manual_seed(9)
    leaves = [torch.randn(20, n, D, generator=g, requires_grad=True) for n in (H, K, K)]

    def grads():
        kc, vc = _cache(pages, 16, K, D, torch.float32)
        return torch.autograd.grad(mk.kv_attention(*leaves, kc, vc, meta, slot, D ** -0.5).sum(), leaves)

    want = grads()
    monkeypatch.setattr(ta, "_FLASH_FAILED", [])
    monkeypatch.setattr(ta, "_flash_varlen_ok", lambda q, k, v: not ta._FLASH_FAILED)

    def boom(*a):
        raise TypeError("_flash_attention_forward() got an unexpected keyword argument 'scale'")

    monkeypatch.setattr(ta, "_flash_varlen_grads", boom)
    with caplog.at_level("WARNING", logger="miles_kernels._train_attention"):
        for _ in range(2):
            assert all(torch.equal(a, b) for a, b in zip(grads(), want))
    assert ta._FLASH_FAILED and caplog.text.count("flash varlen attention failed") == 1
    assert "unexpected keyword argument 'scale'" in caplog.text

    def oom(*a):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(ta, "_FLASH_FAILED", [])
    monkeypatch.setattr(ta, "_flash_varlen_grads", oom)
    with pytest.raises(torch.OutOfMemoryError):
        grads()


def test_attn_bwd_switch_is_checked_at_import_and_cpu_keeps_its_path():
    """MILES_ATTN_BWD: a value other than flash / triton fails the import with a message naming
    it; triton changes nothing on CPU (the Triton backward takes CUDA 16-bit tensors only)."""
    from import_switch import check_import_switch

    code = ("import torch, miles_kernels as mk; from miles_kernels import _train_attention as ta; "
            "q, k, v = (torch.randn(9, n, 16, requires_grad=True) for n in (4, 2, 2)); "
            "assert ta.ATTN_BWD == 'triton' and not ta._triton_bwd_ok(q, k, v); "
            "meta, slot, pages = mk.varlen_meta(torch.tensor([0, 4, 9]), 16); "
            "kc, vc = torch.zeros(pages, 16, 2, 16), torch.zeros(pages, 16, 2, 16); "
            "mk.kv_attention(q, k, v, kc, vc, meta, slot, 0.25).sum().backward(); "
            "assert q.grad is not None and k.grad is not None")
    check_import_switch("MILES_ATTN_BWD", code, "triton", "flash")