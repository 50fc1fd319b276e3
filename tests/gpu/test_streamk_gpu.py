"""Stream-K (miles_kernels/_triton/streamk.py, MILES_STREAM_K) on a real GPU: linear and swiglu give the plain
persistent kernels' bits where stream-K takes the launch, launch after launch (the hand-off flags back at zero)
and replayed from a CUDA graph, with PDL as shipped; every TMA tile linear may pick.

Run on a CUDA machine (triton >= 3.6):  python -m pytest -q tests/gpu/test_streamk_gpu.py
"""

import pytest
import torch
from kernel_asserts import _gen, _randn, _same

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# M x N x K: 8B q|k|v and 0.6B gate|up at the decode batches (1.09-1.45 waves of 128x128 / 64x128), 8B o at
# chunked-prefill M (1.21-1.94 waves), 8B gate|up at M 512 (5.8), and a K that ends in a part step
SHAPES = [(256, 6144, 4096), (384, 6144, 1024), (512, 6144, 4096), (640, 4096, 4096), (1024, 4096, 4096),
          (512, 24576, 4096), (300, 6144, 1000), (1536, 6144, 4096)]


def _flags_clear():
    from miles_kernels._triton import streamk

    for key, (_, flags) in streamk._WORKSPACE.items():
        assert int(flags.abs().sum()) == 0, f"stream-K flags of {key} left set: {flags.nonzero().flatten().tolist()}"


def test_linear_streamk_same_bits(monkeypatch):
    """linear with stream-K == linear without at every shape where it applies (bias and none), three launches
    in a row each, and the stream-K kernel ran on every shape it should."""
    from miles_kernels._triton import matmul as lin
    from miles_kernels._triton import streamk

    g = _gen(71)
    sms = lin._num_programs(torch.device("cuda"))
    taken = 0
    for M, N, K in SHAPES:
        x = _randn(M, K, dtype=torch.bfloat16, g=g)
        w = _randn(N, K, dtype=torch.bfloat16, g=g, scale=K**-0.5)
        b = _randn(N, dtype=torch.bfloat16, g=g)
        t = lin.linear_tile(M, torch.bfloat16, N, x.device)
        tiles = -(-M // t.block_m) * -(-N // t.block_n)
        for bias in (None, b):
            monkeypatch.setattr(streamk, "STREAM_K", False)
            want = lin.linear(x, w, bias)
            monkeypatch.setattr(streamk, "STREAM_K", True)
            for i in range(3):
                _same(lin.linear(x, w, bias), want, f"stream-K linear M {M} N {N} K {K} ({t}), launch {i}")
        taken += t.tma and streamk.takes(tiles, sms, K)
    torch.cuda.synchronize()
    _flags_clear()
    assert taken >= 4 and lin._linear_streamk_kernel.kernels, f"stream-K took {taken} of {len(SHAPES)} shapes"


def test_linear_streamk_every_tma_tile(monkeypatch):
    """Each TMA tile linear may pick, launched by stream-K on a grid with a short last wave, == the plain
    persistent launch of the same tile."""
    from miles_kernels._triton import matmul as lin
    from miles_kernels._triton import streamk

    g = _gen(72)
    sms = lin._num_programs(torch.device("cuda"))
    K = 3000  # a part step at the end; 6,000-byte rows (TMA: 16-byte multiples)
    for t in {t._replace(max_m=0) for t in lin.all_linear_tiles(torch.bfloat16) if t.tma}:
        # about 1.4 waves of this tile
        M = 4 * t.block_m
        N = -(-int(1.4 * sms) // 4) * t.block_n
        if (M // t.block_m) * (N // t.block_n) % sms == 0:
            N += t.block_n
        x = _randn(M, K, dtype=torch.bfloat16, g=g)
        w = _randn(N, K, dtype=torch.bfloat16, g=g, scale=K**-0.5)
        want, got = (torch.empty(M, N, dtype=torch.bfloat16, device="cuda") for _ in range(2))
        monkeypatch.setattr(streamk, "STREAM_K", False)
        lin._launch_linear(x, w, None, want, t)
        monkeypatch.setattr(streamk, "STREAM_K", True)
        assert streamk.takes((M // t.block_m) * (N // t.block_n), sms, K), (t, M, N)
        lin._launch_linear(x, w, None, got, t)
        _same(got, want, f"stream-K tile {t} at M {M} N {N} K {K}")
    torch.cuda.synchronize()
    _flags_clear()


def test_swiglu_streamk_same_bits(monkeypatch):
    """swiglu with stream-K == without, on the 0.6B and 8B MLP shapes at M 128-512 (8B from M 65, 0.6B from
    M 257: grids of 1.09-5.8 waves)."""
    from miles_kernels._triton import fused_linears as fl
    from miles_kernels._triton import streamk

    g = _gen(73)
    for F, K in ((3072, 1024), (12288, 4096)):
        wg = _randn(F, K, dtype=torch.bfloat16, g=g, scale=K**-0.5)
        wu = _randn(F, K, dtype=torch.bfloat16, g=g, scale=K**-0.5)
        x = _randn(512, K, dtype=torch.bfloat16, g=g)
        for m in (128, 256, 300, 384, 512):
            monkeypatch.setattr(streamk, "STREAM_K", False)
            want = fl.swiglu(x[:m], wg, wu)
            monkeypatch.setattr(streamk, "STREAM_K", True)
            for i in range(3):
                _same(fl.swiglu(x[:m], wg, wu), want, f"stream-K swiglu F {F} M {m}, launch {i}")
    torch.cuda.synchronize()
    _flags_clear()
    assert fl._swiglu_streamk_kernel.kernels, "the stream-K swiglu kernel never ran"


def test_streamk_in_a_cuda_graph(monkeypatch):
    """A graph captured with stream-K (the workspace made by the eager call before) replays the plain kernels'
    bits with new inputs each replay, twenty replays back to back."""
    from miles_kernels._triton import fused_linears as fl
    from miles_kernels._triton import matmul as lin
    from miles_kernels._triton import streamk

    g = _gen(74)
    M, N, K, F = 512, 6144, 4096, 3072
    x = _randn(M, K, dtype=torch.bfloat16, g=g)
    x2 = _randn(M, 1024, dtype=torch.bfloat16, g=g)
    w = _randn(N, K, dtype=torch.bfloat16, g=g, scale=K**-0.5)
    wg, wu = (_randn(F, 1024, dtype=torch.bfloat16, g=g, scale=1024**-0.5) for _ in range(2))
    monkeypatch.setattr(streamk, "STREAM_K", True)
    step = lambda: (lin.linear(x, w), fl.swiglu(x2, wg, wu))  # noqa: E731
    step()  # the workspace, compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for i in range(20):
        x.copy_(_randn(M, K, dtype=torch.bfloat16, g=g))
        x2.copy_(_randn(M, 1024, dtype=torch.bfloat16, g=g))
        graph.replay()
        monkeypatch.setattr(streamk, "STREAM_K", False)
        want = step()
        monkeypatch.setattr(streamk, "STREAM_K", True)
        _same(outs[0], want[0], f"graphed stream-K linear, replay {i}")
        _same(outs[1], want[1], f"graphed stream-K swiglu, replay {i}")
    torch.cuda.synchronize()
    _flags_clear()
