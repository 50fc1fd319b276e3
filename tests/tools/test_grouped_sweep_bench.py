"""tools/bench/grouped_sweep.py's roofline: the routed experts' weights, x and y at the copy peak, or
the FLOPs at the matmul peak, whichever is longer (the dense peer reads one weight, not 128)."""

import torch


def test_roofline_counts_routed_experts_bytes(bench_script):
    gs = bench_script("grouped_sweep")
    peak = {"tflops": 800.0, "hbm_gbps": 3000.0}
    sizes = torch.full((128,), 256)  # 30B-A3B down at 4,096 tokens, top-8, routed evenly
    N, K, R = 2048, 768, 32768
    bytes_ = 2 * (128 * N * K + R * K + R * N)
    assert gs.roof_ms(sizes, N, K, peak) == bytes_ / 3000.0 / 1e6  # bytes bound: ~196 us
    sizes[1:] = 0  # one expert routed: that weight alone is read, and the FLOPs bound
    sizes[0] = R
    assert gs.roof_ms(sizes, N, K, peak) == 2 * R * N * K / 800.0 / 1e9
