"""Probe: dQ of the packed causal GQA attention backward as a Gluon kernel for Hopper (sm_90),
the other half of tools/bench/gluon_dkdv.py, against our Triton `_dq_kernel`
(kernels/miles_kernels/_triton/attention_bwd.py).

Same math, grid and masks as `_dq_kernel`: one program per (query block, query head), the last
query blocks first, looping over the KV blocks from the sequence's start up to the diagonal;
dQ = scale * dS k with P recomputed from the LSE in log2 units and dS = P * (dout v^T - delta).
What is Hopper-specific:

    q, dout    one TMA load each into shared memory, resident for the program
    K, V       TMA loads (descriptors over [T, K * D]) into a STAGES-deep shared-memory ring, one
               mbarrier per slot
    MMAs       warpgroup_mma (wgmma), issued async: S = q k^T and dP = dout v^T together, then
               dQ += dS k with dS from registers
    dQ         fp32 accumulator in registers (NVMMADistributedLayout v3), a masked store at the end

Three kernels: `_dq_tma_kernel` (one partition: the compute warps also issue the loads, STAGES - 1
steps ahead), `_dq_ws_kernel` (gl.warp_specialize: a 1-warp partition issues the TMA loads, the
num_warps compute warps consume; empty/ready mbarrier pairs per ring slot) and the `ws2` configs'
`_dq_kernel` (kernels/miles_kernels/_triton/gluon_attention_bwd.py, which the backward runs on
Hopper: a producer warp, two 4-warp consumers of BLOCK_M rows each sharing every K/V block).

    PYTHONPATH=kernels python tools/bench/gluon_dq.py --compile-only   # CPU: sm_90 regs/spills
    PYTHONPATH=kernels python tools/bench/gluon_dq.py --out OUT.json   # GPU: check, then time

--compile-only needs no GPU (triton 3.6's ptxas, -arch=sm_90a). GPU mode checks each config's dQ
against the Triton path (packed_attention_bwd) on gluon_dkdv's CASES and, on 4096, against an fp32
torch reference, then times the Triton dQ kernel alone (as packed_attention_bwd launches it)
against each Gluon config (medians of CUDA graph replays) over CONFIGS (--configs picks some).
Exits nonzero when a Gluon result is wrong or does not compile / launch. Run it under `timeout`
(a barrier bug hangs). The reference is the Triton kernel's (GLUON_DQ off).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

from miles_kernels._triton.gluon_attention import _load_kv
from miles_kernels._triton.gluon_attention_bwd import (_dq_consume, _dq_kernel, _dq_rows, _dq_step,  # noqa: F401
                                                      _store_rows)
from gluon_dkdv import (CASES, D, H, K, TOL, Case, _alloc, _bench_us, _mma_layout, _program,
                        _slot_barriers, cli, compile_configs, finish, fp32_reference, rel_err, run_config)

@gluon.jit
def _ws_load(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, ready, empty, q_bar, m0, h, q_lo,
             q_len, G: gl.constexpr):
    """Producer partition (1 warp): q, dout once, then each KV block's k, v into the ring as slots free up."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    STAGES: gl.constexpr = k_smem.type.shape[0]
    _load_q_do_once(q_desc, do_desc, q_smem, do_smem, q_bar, m0, q_lo, h)
    for j in range(gl.cdiv(gl.minimum(m0 + BLOCK_M, q_len), BLOCK_N)):
        slot = j % STAGES
        # empty barriers start with phase 1 complete: the first round of waits passes at once
        mbarrier.wait(empty.index(slot), ((j // STAGES) & 1) ^ 1)
        _load_kv(k_desc, v_desc, k_smem.index(slot), v_smem.index(slot), ready.index(slot), j, q_lo, h // G, True)


@gluon.jit
def _dq_ws_kernel(q_desc, do_desc, k_desc, v_desc, dq_ptr, lse_ptr, delta_ptr, cu_ptr, qk_scale, scale, n_heads,
                  n_bh, n_blocks, stride_qt, stride_lh, stride_dh, G: gl.constexpr, STAGES: gl.constexpr,
                  LOAD_REGS: gl.constexpr):
    """Warp specialized: a 1-warp partition (LOAD_REGS registers) issues the TMA loads, the
    num_warps warps of the default partition compute."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    r0, h, q_lo, q_len = _program(cu_ptr, n_heads, n_bh, BLOCK_M)
    m0 = (n_blocks - 1) * BLOCK_M - r0
    if m0 >= q_len:
        return
    q_smem, do_smem, k_smem, v_smem, ready, q_bar = _alloc(q_desc, do_desc, k_desc, v_desc, STAGES)
    empty = _slot_barriers(STAGES)
    gl.warp_specialize([
        (_dq_consume, (q_smem, do_smem, k_smem, v_smem, ready, empty, q_bar, dq_ptr, lse_ptr, delta_ptr, m0, h, q_lo,
                       q_len, 0, qk_scale, scale, stride_qt, stride_lh, stride_dh)),
        (_ws_load, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, ready, empty, q_bar, m0, h,
                    q_lo, q_len, G)),
    ], [1], [LOAD_REGS])


@gluon.jit
def _load_q_do_once(q_desc, do_desc, q_smem, do_smem, q_bar, m0, q_lo, h):
    """The query block's q and dout tiles, once (rows past the sequence: ignored, never stored)."""
    D: gl.constexpr = q_desc.block_type.shape[1]
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_lo + m0, h * D], q_bar, q_smem)
    tma.async_copy_global_to_shared(do_desc, [q_lo + m0, h * D], q_bar, do_smem)


@gluon.jit
def _dq_tma_kernel(q_desc, do_desc, k_desc, v_desc, dq_ptr, lse_ptr, delta_ptr, cu_ptr, qk_scale, scale, n_heads,
                   n_bh, n_blocks, stride_qt, stride_lh, stride_dh, G: gl.constexpr, STAGES: gl.constexpr):
    """One program a (query block, sequence, query head), the last query blocks first: its q and
    dout resident, the KV blocks up to the diagonal through a TMA ring the compute warps fill
    STAGES - 1 steps ahead."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    NW: gl.constexpr = gl.num_warps()
    # grid rank-major over (rank, sequence, query head) as _dq_kernel; rank r is query block
    # n_blocks - 1 - r: the last (most KV blocks) start first
    r0, h, q_lo, q_len = _program(cu_ptr, n_heads, n_bh, BLOCK_M)
    m0 = (n_blocks - 1) * BLOCK_M - r0
    if m0 >= q_len:
        return
    kvh = h // G
    q_smem, do_smem, k_smem, v_smem, ready, q_bar = _alloc(q_desc, do_desc, k_desc, v_desc, STAGES)
    _load_q_do_once(q_desc, do_desc, q_smem, do_smem, q_bar, m0, q_lo, h)
    qpos, lse2, delta, n_full, n_kv = _dq_rows(lse_ptr, delta_ptr, h, q_lo, q_len, m0, stride_lh, stride_dh,
                                            BLOCK_M, BLOCK_N)
    for s in gl.static_range(STAGES - 1):
        _load_kv(k_desc, v_desc, k_smem.index(s), v_smem.index(s), ready.index(s), s, q_lo, kvh, s < n_kv)

    dq = gl.zeros([BLOCK_M, D], gl.float32, _mma_layout(D, NW))
    mbarrier.wait(q_bar, 0)
    for j in range(n_kv):
        # the slot step j - 1 used is free (its wgmmas were waited): step j + STAGES - 1 goes there.
        # The barrier: every warp is past those waits before one thread issues the copy.
        gl.thread_barrier()
        nxt = j + STAGES - 1
        _load_kv(k_desc, v_desc, k_smem.index(nxt % STAGES), v_smem.index(nxt % STAGES), ready.index(nxt % STAGES),
                 nxt, q_lo, kvh, nxt < n_kv)
        slot = j % STAGES
        mbarrier.wait(ready.index(slot), (j // STAGES) & 1)
        dq = _dq_step(dq, q_smem, do_smem, k_smem.index(slot), v_smem.index(slot), lse2, delta, qpos, j, n_full,
                   qk_scale)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))
    mbarrier.invalidate(q_bar)
    _store_rows(dq, dq_ptr, m0, q_lo, q_len, h, scale, stride_qt)


# (name, kernel, BLOCK_M, BLOCK_N, num_warps, STAGES, maxnreg). Warps (and the wgmma tiles) stack
# over the query rows: 64 rows a warpgroup. 128 x 64 with 8 warps is the Triton kernel's default
# tile (DQ_TILES), 64 x 64 with 4 warps its small-grid one. A warp-specialized kernel runs
# num_warps + 4 warps (the load warp's group); 128 x 64 is one CTA an SM by shared memory (128 KB
# at 2 stages) whatever its registers; 64 x 64 at 2 stages (106 KB) fits two, which r128 allows
# by registers (its compute warps then get 232).
CONFIGS = [
    ("tma 128x64 w8 s2", "_dq_tma_kernel", 128, 64, 8, 2, None),
    ("tma 128x64 w8 s3", "_dq_tma_kernel", 128, 64, 8, 3, None),
    ("tma 64x64 w4 s2", "_dq_tma_kernel", 64, 64, 4, 2, None),
    ("tma 64x64 w4 s3", "_dq_tma_kernel", 64, 64, 4, 3, None),
    ("ws 128x64 w8 s2", "_dq_ws_kernel", 128, 64, 8, 2, None),
    ("ws 128x64 w8 s3", "_dq_ws_kernel", 128, 64, 8, 3, None),
    ("ws 64x64 w4 s2", "_dq_ws_kernel", 64, 64, 4, 2, None),
    ("ws 64x64 w4 s2 r128", "_dq_ws_kernel", 64, 64, 4, 2, 128),
    ("ws 64x64 w4 s3", "_dq_ws_kernel", 64, 64, 4, 3, None),
    ("ws2 128x64 s2", "_dq_kernel", 64, 64, 4, 2, 168),
    ("ws2 128x64 s3", "_dq_kernel", 64, 64, 4, 3, 168),
    ("ws2 128x64 s4", "_dq_kernel", 64, 64, 4, 4, 168),
]


def compile_only(ptx_dir: str, configs: list) -> list:
    return compile_configs(configs, globals(), ptx_dir)


# ---- GPU: check and time ----

class DqCase(Case):
    """gluon_dkdv's Case (inputs, forward, LSE, delta) with dQ's references and launchers."""

    def __init__(self, lens: list[int]):
        super().__init__(lens)
        # TFLOP: 3 MMAs (S, dP, dQ) of 2 * D flops per causal (query, key) pair, L^2 / 2 pairs per query head
        self.tflop = 3 * 2 * D * H * sum(L * L / 2 for L in lens) / 1e12

    def triton_dq_bwd(self):
        """dq of the whole Triton backward (packed_attention_bwd, GLUON_DQ off)."""
        from miles_kernels._triton import attention_bwd as AB
        was, AB.GLUON_DQ = AB.GLUON_DQ, False
        try:
            dq, _, _ = AB.packed_attention_bwd(self.q, self.k, self.v, self.o, self.do, self.lse, self.cu,
                                               self.max_len, self.scale)
        finally:
            AB.GLUON_DQ = was
        return dq

    def triton_dq(self, dq):
        """A launcher of the Triton `_dq_kernel` alone, as packed_attention_bwd launches it."""
        import torch
        from miles_kernels._triton import attention_bwd as AB
        T, B = self.T, len(self.lens)
        t = AB._pick(AB.DQ_TILES[torch.bfloat16], lambda t: triton.cdiv(T, t.block_m) * H)
        n_blocks = triton.cdiv(self.max_len, t.block_m)
        k_in, v_in = AB.tma_descriptors((self.k, self.v), t.block_n, AB.DQ_TMA) or (self.k, self.v)
        grid = (n_blocks * B * H, )
        args = (self.q, k_in, v_in, self.do, dq, self.lse, self.delta, self.cu, self.scale * 1.4426950408889634,
                self.scale, H, B * H, n_blocks, H * D, K * D, self.lse.stride(0), T)
        meta = dict(G=H // K, D=D, BLOCK_M=t.block_m, BLOCK_N=t.block_n, PRECISION="tf32", TMA=k_in is not self.k,
                    num_warps=t.num_warps, num_stages=t.num_stages)
        return lambda: AB._dq_kernel[grid](*args, **meta)

    def gluon_dq(self, config, dq):
        """A launcher of one Gluon config."""
        rows = config[2] * (2 if config[1] == "_dq_kernel" else 1)  # ws2: two q tiles a program
        B, n_blocks = len(self.lens), triton.cdiv(self.max_len, rows)
        return self.gluon_launch(globals()[config[1]], config, (n_blocks * B * H, ), (dq, ),
                                 (H, B * H, n_blocks, H * D))


def gpu_run(out: str, configs: list) -> int:
    import torch
    dev = torch.cuda.get_device_name()
    print(f"{dev}, triton {triton.__version__}, bf16, H {H}, K {K}, D {D}; TFLOP/s = 3 * 2 * D * H * sum(L^2 / 2) "
          f"/ time (the dQ kernel's 3 MMAs over the causal half)")
    results, failed = dict(device=dev, triton=triton.__version__, tol=TOL, cases={}), []
    for case_name, lens in CASES.items():
        c = DqCase(lens)
        ref = c.triton_dq_bwd()
        dq = torch.full_like(c.q, float("nan"))
        run_triton = c.triton_dq(dq)
        run_triton()
        r = dict(lens=lens, tflop=c.tflop, triton_split_vs_bwd=rel_err(dq, ref))
        if case_name == "4096":
            f_dq = fp32_reference(c)[0]
            r["triton_vs_fp32"] = rel_err(ref, f_dq)
        r["triton_us"] = _bench_us(run_triton)
        r["gluon"] = {}
        print(f"\n{case_name} {lens}: Triton _dq_kernel {r['triton_us']:.1f} us, "
              f"{c.tflop / r['triton_us'] * 1e6:.0f} TFLOP/s" +
              (f"; Triton vs fp32 dq {r['triton_vs_fp32']:.2e}" if "triton_vs_fp32" in r else ""))
        print(f"{'config':>22} {'err dq':>19} {'vs fp32':>19} {'us':>9} {'x Triton':>8} {'TFLOP/s':>8} {'regs':>5} "
              f"{'spills':>6}")
        fp32s = (f_dq, ) if case_name == "4096" else None
        for cfg in configs:
            r["gluon"][cfg[0]] = run_config(case_name, cfg, c.gluon_dq, (torch.full_like(c.q, float("nan")), ), (ref, ),
                                            fp32s, r, c.tflop, failed)
        results["cases"][case_name] = r
        del c
        torch.cuda.empty_cache()
    return finish(results, failed, out)


if __name__ == "__main__":
    cli(__doc__, CONFIGS, compile_only, gpu_run)
