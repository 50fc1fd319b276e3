"""Probe: the Gluon forward of the packed training attention
(kernels/miles_kernels/_triton/gluon_attention.py) against our Triton `_attn_kernel` as
`packed_attention` launches it, and SDPA's flash path, per kernel and tile.

Configs: `_fwd_ws_kernel` (what packed_attention runs on Hopper: a producer warp, two consumer
warpgroups of 64 rows sharing each K/V block) at several ring depths, and `_fwd_kernel` (one
partition that also issues the loads) at 64 and 128 rows. Measured and dropped on 2026-12-04
(twenty-first run): waiting each wgmma where it is issued (no overlap: 0.97-1.03x Triton) and
FA3's ping-pong between the two consumers (turns by mbarriers: 1.01-1.10x, below the free-running
consumers' 1.05-1.11x).

    PYTHONPATH=kernels python tools/bench/gluon_fwd.py --compile-only   # CPU: sm_90 regs/spills
    PYTHONPATH=kernels python tools/bench/gluon_fwd.py --out OUT.json   # GPU: check, then time

GPU mode: the output and LSE of each config against the Triton kernel's, bitwise (exits nonzero
on any differing element), on 0.6B heads (H 16, K 8) at 4096, 16384 and packed [1000, 3000, 77,
4096] and 8B heads (H 32, K 8) at 4096; then times (medians of CUDA graph replays) against the
Triton kernel and SDPA's flash path.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import triton
from triton.experimental.gluon import language as gl

from gluon_dkdv import _bench_us, cli, compile_configs, finish, launch
from miles_kernels._triton import gluon_attention as GA
from miles_kernels._triton.gluon_attention import _fwd_kernel, _fwd_ws_kernel  # noqa: F401 (configs name them)

# (name, kernel, BLOCK_M, BLOCK_N, num_warps, STAGES, maxnreg): BLOCK_N is the walk's KV_BLOCK (64),
# fixed by the bits; 16 rows a warp. The warp-specialized kernel runs 4 + 4 + 1 warps (num_warps is
# its default partition's); maxnreg 168 x 12 warps fills an SM (consumers then get 240).
CONFIGS = [
    ("ws 128 s3", "_fwd_ws_kernel", 128, 64, 4, 3, 168),
    ("ws 128 s4", "_fwd_ws_kernel", 128, 64, 4, 4, 168),
    ("one 64 w4 s3", "_fwd_kernel", 64, 64, 4, 3, None),
    ("one 128 w8 s3", "_fwd_kernel", 128, 64, 8, 3, None),
]


def compile_only(ptx_dir: str, configs: list) -> list:
    """The configs as the packed forward, then over a paged cache (pages of 64: the engine's prefill)."""
    return compile_configs(configs + [(f"{c[0]} paged", *c[1:], 64) for c in configs], globals(), ptx_dir)


# ---- GPU: check and time ----

CASES = {"0.6B 4096": (16, [4096]), "0.6B 16384": (16, [16384]), "0.6B packed": (16, [1000, 3000, 77, 4096]),
         "8B 4096": (32, [4096])}
K, D = 8, 128
KV_BLOCK, KV_SPLIT = 64, 256


class FwdCase:
    """Random packed q, k, v and the Triton kernel's output and LSE (the bits to equal)."""

    def __init__(self, H: int, lens: list[int]):
        import torch
        from miles_kernels._triton import paged_attention as PA

        assert (PA.KV_BLOCK, PA.KV_SPLIT, PA.ROW_SUM) == (KV_BLOCK, KV_SPLIT, "fixed"), "the probe follows these"
        self.H, self.lens, self.T = H, lens, sum(lens)
        g = torch.Generator(device="cuda").manual_seed(self.T + H)
        bf = torch.bfloat16
        self.q = torch.randn(self.T, H, D, generator=g, device="cuda").to(bf)
        self.k, self.v = (torch.randn(self.T, K, D, generator=g, device="cuda").to(bf) for _ in range(2))
        self.cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32, device="cuda")
        self.max_len, self.scale = max(lens), D**-0.5
        self.lse = torch.empty(H, self.T, device="cuda")
        self.o = self.triton(self.lse)()
        # TFLOP: 2 MMAs of 2 * D flops per causal (query, key) pair, L^2 / 2 pairs per query head
        self.tflop = 2 * 2 * D * H * sum(L * L / 2 for L in lens) / 1e12

    def triton(self, lse):
        """A launcher of the Triton kernel as packed_attention runs it with GLUON_FWD off."""
        from miles_kernels._triton import paged_attention as PA

        def run():
            PA.GLUON_FWD = False
            try:
                return PA.packed_attention(self.q, self.k, self.v, self.cu, self.max_len, self.scale, lse_HT=lse)
            finally:
                PA.GLUON_FWD = True
        return run

    def flash(self):
        """SDPA's flash path on each sequence (GQA by repeat: what a plain transformers user runs)."""
        import torch
        import torch.nn.functional as F
        seqs = [(lo, hi) for lo, hi in zip(self.cu[:-1].tolist(), self.cu[1:].tolist())]
        qs = [self.q[lo:hi].transpose(0, 1)[None] for lo, hi in seqs]
        ks = [self.k[lo:hi].transpose(0, 1)[None] for lo, hi in seqs]
        vs = [self.v[lo:hi].transpose(0, 1)[None] for lo, hi in seqs]

        def run():
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                for q, k, v in zip(qs, ks, vs):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return run

    def gluon(self, config, o, lse):
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
        _, kernel, bm, bn, nw, stages, maxnreg = config
        G = self.H // K
        g_pad = triton.next_power_of_2(G)
        kv2 = [x.view(self.T, K * D) for x in (self.k, self.v)]
        layout = gl.NVMMASharedLayout.get_default_for([bn, D], gl.bfloat16)
        k_desc, v_desc = (TensorDescriptor(x, list(x.shape), [x.stride(0), 1], [bn, D], layout) for x in kv2)
        grid = (triton.cdiv(self.max_len, bm // g_pad), len(self.lens) * K)
        meta = dict(BLOCK_M=bm, G=G, G_PAD=g_pad, SPLIT_BLOCKS=KV_SPLIT // KV_BLOCK, STAGES=stages, STORE_LSE=True,
                    PAGE=0, num_warps=nw)
        if kernel == "_fwd_ws_kernel":
            meta.update(LOAD_REGS=GA.LOAD_REGS, CONSUMER_REGS=GA.CONSUMER_REGS)
        if maxnreg:
            meta["maxnreg"] = maxnreg
        fn = globals()[kernel]
        args = (self.q, k_desc, v_desc, o, lse, self.cu, self.cu, self.cu, self.scale * 1.4426950408889634, K,
                self.q.stride(0), o.stride(0), lse.stride(0), 0)  # packed: kv lens, table and its stride unused
        return lambda: fn[grid](*args, **meta)


def _differ(x, ref) -> int:
    """Elements whose bits differ (NaN where ref has a number counts)."""
    import torch
    return int((x.view(torch.int16 if x.element_size() == 2 else torch.int32) !=
                ref.view(torch.int16 if ref.element_size() == 2 else torch.int32)).sum())


def gpu_run(out: str, configs: list) -> int:
    import torch
    dev = torch.cuda.get_device_name()
    print(f"{dev}, triton {triton.__version__}, bf16, K {K}, D {D}; TFLOP/s = 2 * 2 * D * H * sum(L^2 / 2) / time; "
          f"'differ': elements of o / lse whose bits are not the Triton kernel's")
    results, failed = dict(device=dev, triton=triton.__version__, cases={}), []
    for case_name, (H, lens) in CASES.items():
        c = FwdCase(H, lens)
        r = dict(H=H, lens=lens, tflop=c.tflop, triton_us=_bench_us(c.triton(torch.empty_like(c.lse))), gluon={})
        r["flash_us"] = _bench_us(c.flash())
        print(f"\n{case_name} {lens}: Triton _attn_kernel {r['triton_us']:.1f} us ({c.tflop / r['triton_us'] * 1e6:.0f} "
              f"TFLOP/s), SDPA flash {r['flash_us']:.1f} us ({c.tflop / r['flash_us'] * 1e6:.0f})")
        print(f"{'config':>18} {'differ o':>9} {'lse':>6} {'us':>9} {'x Triton':>8} {'x flash':>8} {'TFLOP/s':>8} "
              f"{'regs':>5} {'spills':>6}")
        for cfg in configs:
            o, lse = torch.full_like(c.o, float("nan")), torch.full_like(c.lse, float("nan"))
            run, row = launch(case_name, cfg, c.gluon, (o, lse), failed)
            r["gluon"][cfg[0]] = row
            if run is None:
                continue
            row["differ"] = [_differ(o, c.o), _differ(lse, c.lse)]
            row["max_abs"] = float((o.float() - c.o.float()).abs().nan_to_num(1e9).max())
            if any(row["differ"]):
                failed.append(f"{case_name} {cfg[0]}: differ {row['differ']} max |diff| {row['max_abs']:.3e}")
            row["us"] = _bench_us(run)
            row["x_triton"], row["x_flash"] = r["triton_us"] / row["us"], r["flash_us"] / row["us"]
            row["tflops"] = c.tflop / row["us"] * 1e6
            print(f"{cfg[0]:>18} {row['differ'][0]:>9} {row['differ'][1]:>6} {row['us']:>9.1f} {row['x_triton']:>8.3f} "
                  f"{row['x_flash']:>8.3f} {row['tflops']:>8.0f} {row['regs']:>5} {row['spills']:>6}" +
                  ("" if not any(row["differ"]) else f"  DIFFERS (max |diff| {row['max_abs']:.2e})"))
        results["cases"][case_name] = r
        del c
        torch.cuda.empty_cache()
    return finish(results, failed, out)


if __name__ == "__main__":
    cli(__doc__, CONFIGS, compile_only, gpu_run)
