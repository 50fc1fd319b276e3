"""Probe: dK/dV of the packed causal GQA attention backward as a Gluon kernel for Hopper (sm_90),
FlashAttention-3 style, against our Triton `_dkdv_kernel` (kernels/miles_kernels/_triton/attention_bwd.py).

Same math, grid and masks as `_dkdv_kernel`: one program per (KV block, kv head), looping over its
G query heads and the query blocks at or after the KV block; dV = P^T dout, dK = scale * dS^T q with
P recomputed from the LSE in log2 units and dS = P * (dout v^T - delta). What is Hopper-specific:

    K, V       one TMA load each into shared memory, resident for the program
    q, dout    TMA loads (descriptors over [T, H * D]) into a STAGES-deep shared-memory ring, one
               mbarrier per slot; the (query head, query block) steps run as one flat loop, so the
               ring prefetches across heads
    MMAs       warpgroup_mma (wgmma), issued async: S^T = k q^T and dP^T = v dout^T together, then
               dV += P^T dout and dK += dS^T q with P^T / dS^T from registers
    dK, dV     fp32 accumulators in registers (NVMMADistributedLayout v3), masked stores at the end

Three kernels: `_dkdv_tma_kernel` (one partition: the compute warps also issue the loads,
STAGES - 1 steps ahead), `_dkdv_ws_kernel` (gl.warp_specialize: a 1-warp partition issues the TMA
loads, the num_warps compute warps consume; empty/ready mbarrier pairs per ring slot) and the
`ws2` configs' `_dkdv_kernel` (kernels/miles_kernels/_triton/gluon_attention_bwd.py, which the
backward runs on Hopper: a producer warp, two 4-warp consumers of BLOCK_N keys each sharing every
q / dout tile).

    PYTHONPATH=kernels python tools/bench/gluon_dkdv.py --compile-only   # CPU: sm_90 regs/spills
    PYTHONPATH=kernels python tools/bench/gluon_dkdv.py --out OUT.json   # GPU: check, then time

--compile-only needs no GPU (triton 3.6's ptxas, -arch=sm_90a). GPU mode checks both kernels'
dK/dV against the Triton path (packed_attention_bwd) on lengths 4096, 16384 and a packed
[1000, 3000, 77, 4096] (0.6B heads: H = 16, K = 8, D = 128, bf16), and on 4096 against an fp32
torch reference, then times the Triton dK/dV kernel alone against each Gluon kernel (medians of
triton.testing.do_bench of CUDA graph replays) over CONFIGS (--configs picks some). Exits nonzero
when a Gluon result is wrong. Run it under `timeout` (a barrier bug hangs). The references are the
Triton kernels' (GLUON_DKDV off).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

from miles_kernels._triton.gluon_attention import _mma_layout, _slot_barriers  # noqa: F401 (gluon_dq takes them here)
from miles_kernels._triton.gluon_attention_bwd import (_alloc_pair, _dkdv_consume, _dkdv_kernel,  # noqa: F401
                                                      _load_q_do, _program, _ring_q_do, _rows, _start, _step,
                                                      _store_dkdv)

LOAD_REGS = 24  # the warp-specialized kernel's load partition: registers a thread


@gluon.jit
def _ws_load(q_desc, do_desc, k_desc, v_desc, k_smem, v_smem, q_smem, do_smem, ready, empty, kv_bar, n0, kvh, q_lo,
             i_lo, n_i, G: gl.constexpr):
    """Producer partition (1 warp): K, V once, then each step's q, dout into the ring as slots free up."""
    D: gl.constexpr = q_desc.block_type.shape[1]
    mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [q_lo + n0, kvh * D], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [q_lo + n0, kvh * D], kv_bar, v_smem)
    _ring_q_do(q_desc, do_desc, q_smem, do_smem, ready, empty, i_lo, n_i, q_lo, kvh, G)


@gluon.jit
def _dkdv_ws_kernel(q_desc, do_desc, k_desc, v_desc, dk_ptr, dv_ptr, lse_ptr, delta_ptr, cu_ptr, qk_scale, scale,
                    n_kv_heads, n_bk, stride_kt, stride_lh, stride_dh, G: gl.constexpr, STAGES: gl.constexpr,
                    LOAD_REGS: gl.constexpr):
    """Warp specialized: a 1-warp partition (LOAD_REGS registers) issues the TMA loads, the
    num_warps warps of the default partition compute."""
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    n0, kvh, q_lo, q_len = _program(cu_ptr, n_kv_heads, n_bk, BLOCK_N)
    if n0 >= q_len:
        return
    k_smem, v_smem, q_smem, do_smem, ready, kv_bar = _alloc(k_desc, v_desc, q_desc, do_desc, STAGES)
    empty = _slot_barriers(STAGES)
    i_lo = n0 // q_desc.block_type.shape[0]
    n_i = gl.cdiv(q_len, q_desc.block_type.shape[0]) - i_lo
    gl.warp_specialize([
        (_dkdv_consume, (k_smem, v_smem, q_smem, do_smem, ready, empty, kv_bar, dk_ptr, dv_ptr, lse_ptr, delta_ptr, n0,
                       kvh, q_lo, q_len, i_lo, n_i, qk_scale, scale, stride_kt, stride_lh, stride_dh, G)),
        (_ws_load, (q_desc, do_desc, k_desc, v_desc, k_smem, v_smem, q_smem, do_smem, ready, empty, kv_bar, n0, kvh,
                    q_lo, i_lo, n_i, G)),
    ], [1], [LOAD_REGS])


@gluon.jit
def _alloc(a_desc, b_desc, ring_a_desc, ring_b_desc, STAGES: gl.constexpr):
    """Shared memory of a program: two resident tiles (a, b: K and V for dK/dV, q and dout for
    dQ), a STAGES-slot ring of the other two, the ring's ready mbarriers and the resident tiles'
    (initialised, count 1)."""
    a_smem = gl.allocate_shared_memory(a_desc.dtype, a_desc.block_type.shape, a_desc.layout)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, b_desc.block_type.shape, b_desc.layout)
    ring_shape: gl.constexpr = [STAGES, ring_a_desc.block_type.shape[0], ring_a_desc.block_type.shape[1]]
    ring_a = gl.allocate_shared_memory(ring_a_desc.dtype, ring_shape, ring_a_desc.layout)
    ring_b = gl.allocate_shared_memory(ring_b_desc.dtype, ring_shape, ring_b_desc.layout)
    bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar, count=1)
    return a_smem, b_smem, ring_a, ring_b, _slot_barriers(STAGES), bar


@gluon.jit
def _dkdv_tma_kernel(q_desc, do_desc, k_desc, v_desc, dk_ptr, dv_ptr, lse_ptr, delta_ptr, cu_ptr, qk_scale, scale,
                     n_kv_heads, n_bk, stride_kt, stride_lh, stride_dh, G: gl.constexpr, STAGES: gl.constexpr):
    """One program a (KV block, sequence, kv head): its G heads' query blocks from the diagonal on,
    the compute warps issuing each step's q / dout TMA loads STAGES - 1 steps ahead."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    n0, kvh, q_lo, q_len = _program(cu_ptr, n_kv_heads, n_bk, BLOCK_N)
    if n0 >= q_len:
        return
    k_smem, v_smem, q_smem, do_smem, ready, kv_bar = _alloc(k_desc, v_desc, q_desc, do_desc, STAGES)

    mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [q_lo + n0, kvh * D], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [q_lo + n0, kvh * D], kv_bar, v_smem)
    i_lo = n0 // BLOCK_M
    n_i = gl.cdiv(q_len, BLOCK_M) - i_lo  # query blocks a head: the diagonal's to the sequence's last
    n_steps = G * n_i
    for s in gl.static_range(STAGES - 1):
        _load_q_do(q_desc, do_desc, q_smem.index(s), do_smem.index(s), ready.index(s), s, i_lo, n_i, q_lo, kvh,
                   s < n_steps, G)
    i_full, n_q_full, kpos, dk, dv, lse2, delta = _start(kv_bar, lse_ptr, delta_ptr, n0, i_lo, n_i, q_lo, q_len, kvh,
                                                         stride_lh, stride_dh, BLOCK_M, BLOCK_N, D, G)
    for t in range(n_steps):
        # the slot step t - 1 used is free (its wgmmas were waited): step t + STAGES - 1 goes there.
        # The barrier: every warp is past those waits before one thread issues the copy.
        gl.thread_barrier()
        nxt = t + STAGES - 1
        _load_q_do(q_desc, do_desc, q_smem.index(nxt % STAGES), do_smem.index(nxt % STAGES),
                   ready.index(nxt % STAGES), nxt, i_lo, n_i, q_lo, kvh, nxt < n_steps, G)
        lse2_n, delta_n = _rows(lse_ptr, delta_ptr, t + 1, i_lo, n_i, q_lo, q_len, kvh, stride_lh, stride_dh,
                                t + 1 < n_steps, BLOCK_M, BLOCK_N, G)
        slot = t % STAGES
        mbarrier.wait(ready.index(slot), (t // STAGES) & 1)
        dk, dv = _step(dk, dv, k_smem, v_smem, q_smem.index(slot), do_smem.index(slot), lse2, delta, t, i_lo, n_i,
                       i_full, n_q_full, kpos, q_len, qk_scale)
        lse2, delta = lse2_n, delta_n
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))
    mbarrier.invalidate(kv_bar)
    _store_dkdv(dk, dv, dk_ptr, dv_ptr, n0, q_lo, q_len, kvh, scale, stride_kt)


# ---- compile only (CPU) ----

def desc_sig(rows: int, D: int) -> str:
    """The signature type of a bf16 TMA descriptor with [rows, D] blocks, as the launchers make it."""
    layout = gl.NVMMASharedLayout.get_default_for([rows, D], gl.bfloat16)
    return f"tensordesc<bf16[{rows}, {D}],{layout!r}>"


def compile_sm90(kernel, block_m: int, block_n: int, num_warps: int, stages: int, G: int = 2, D: int = 128,
                 maxnreg: int | None = None, ptx_dir: str = "", page: int = 0) -> dict:
    """Compile kernel for sm_90 without a GPU (bf16, descriptors as the GPU run makes them; page: the
    forward's PAGE, 0 packed); its registers, spills and shared memory from ptxas -v."""
    fn = kernel
    names = [p.name for p in fn.params]
    consts = {k: v for k, v in dict(G=G, STAGES=stages, LOAD_REGS=LOAD_REGS, BLOCK_M=block_m, G_PAD=G,
                                    SPLIT_BLOCKS=4, STORE_LSE=True, CONSUMER_REGS=240, PAGE=page).items()
              if k in names}
    sig = {}
    for n in (n for n in names if n not in consts):
        if n in ("q_desc", "do_desc"):
            sig[n] = desc_sig(block_m, D)
        elif n in ("k_desc", "v_desc"):
            sig[n] = desc_sig(block_n, D)
        elif n.endswith("_ptr"):
            sig[n] = "*i32" if n in ("cu_ptr", "kv_ptr", "bt_ptr") else "*fp32" if n in ("lse_ptr", "delta_ptr") \
                else "*bf16"
        else:
            sig[n] = "fp32" if n in ("qk_scale", "scale") else "i32"
    return dict(ptxas_report(fn, sig, consts, num_warps, maxnreg, ptx_dir), tile=[block_m, block_n, num_warps, stages])


def ptxas_report(fn, sig: dict, consts: dict, num_warps: int, maxnreg: int | None, ptx_dir: str = "") -> dict:
    """Compile the Gluon kernel fn for sm_90 without a GPU (sig: each non-constexpr parameter's
    type; pointers 16-byte aligned, stride_qt / stride_kt multiples of 16) and read ptxas -v / the
    SASS: registers, spills, shared memory, HGMMA and wgmma waits."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    names = [p.name for p in fn.params]
    sig = {**sig, **{k: "constexpr" for k in consts}}
    # as the launch specializes them: pointers 16-byte aligned, the row strides of [T, heads * D]
    attrs = {(i, ): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n.endswith("_ptr") or n in ("stride_qt", "stride_kt")}
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(names.index(k), ): v for k, v in consts.items()},
                         attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "maxnreg": maxnreg})
    tools = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    with tempfile.TemporaryDirectory() as d:
        open(f"{d}/k.ptx", "w").write(c.asm["ptx"])
        r = subprocess.run([f"{tools}/ptxas", "-arch=sm_90a", "-v", f"{d}/k.ptx", "-o", f"{d}/k.o"],
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"ptxas failed:\n{r.stderr}")
        sass = subprocess.run([f"{tools}/cuobjdump", "-sass", f"{d}/k.o"], capture_output=True, text=True).stdout
    if ptx_dir:
        os.makedirs(ptx_dir, exist_ok=True)
        for ext in ("ttgir", "ptx"):
            open(os.path.join(ptx_dir, f"{fn.__name__}.{ext}"), "w").write(c.asm[ext])
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    return dict(kernel=fn.__name__, regs=int(re.search(r"Used (\d+) registers", r.stderr).group(1)),
                spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)), shared=c.metadata.shared,
                hgmma=sass.count("HGMMA"), waits=sass.count("WARPGROUP.DEPBAR"),
                ptxas=" ".join(l.strip() for l in r.stderr.splitlines() if "registers" in l or "spill" in l))


# (name, kernel, BLOCK_M, BLOCK_N, num_warps, STAGES, maxnreg). Warps (and the wgmma tile) stack
# over the keys: 64 keys a warpgroup. A warp-specialized kernel runs num_warps + 4 warps (the load
# warp's group); maxnreg caps the launch: 168 x 12 warps fills an SM (compute warps then get 240),
# 128 x 8 lets two CTAs share one (compute 232: ptxas spills ~100 B).
CONFIGS = [
    ("tma 64x64 w4 s2", "_dkdv_tma_kernel", 64, 64, 4, 2, None),
    ("tma 64x64 w4 s3", "_dkdv_tma_kernel", 64, 64, 4, 3, None),
    ("tma 64x128 w8 s2", "_dkdv_tma_kernel", 64, 128, 8, 2, None),
    ("ws 64x128 w8 s2 r168", "_dkdv_ws_kernel", 64, 128, 8, 2, 168),
    ("ws 64x128 w8 s3 r168", "_dkdv_ws_kernel", 64, 128, 8, 3, 168),
    ("ws 64x64 w4 s2 r128", "_dkdv_ws_kernel", 64, 64, 4, 2, 128),
    ("ws 64x64 w4 s3", "_dkdv_ws_kernel", 64, 64, 4, 3, None),
    ("ws2 64x128 s2", "_dkdv_kernel", 64, 64, 4, 2, 168),
    ("ws2 64x128 s3", "_dkdv_kernel", 64, 64, 4, 3, 168),
    ("ws2 64x128 s4", "_dkdv_kernel", 64, 64, 4, 4, 168),
]


def compile_configs(configs: list, kernels: dict, ptx_dir: str) -> list:
    """Compile each config's kernel (kernels: name -> Gluon function) for sm_90 and print its
    registers, spills, shared memory, wgmma count and waits; the names of those that failed."""
    print(f"triton {triton.__version__}, sm_90a, bf16, D 128, G 2 (ptxas -v: the kernel's count; a warp-specialized "
          f"kernel's compute warps get setmaxnreg's)")
    print(f"{'config':>22} {'regs':>5} {'spill st/ld B':>14} {'shared B':>9} {'HGMMA':>6} {'waits':>6}")
    failed = []
    for name, kernel, bm, bn, nw, stages, maxnreg, *page in configs:  # page: the forward's PAGE (0: packed)
        try:
            r = compile_sm90(kernels[kernel], bm, bn, nw, stages, maxnreg=maxnreg, ptx_dir=ptx_dir,
                             page=page[0] if page else 0)
        except Exception as e:  # reported, the other configs still compiled
            print(f"{name:>22} FAILED: {type(e).__name__}: {str(e)[:500]}")
            failed.append(name)
            continue
        print(f"{name:>22} {r['regs']:>5} {r['spill_stores']:>6} / {r['spill_loads']:<5} {r['shared']:>9} "
              f"{r['hgmma']:>6} {r['waits']:>6}   {r['ptxas']}")
    return failed


def compile_only(ptx_dir: str, configs: list) -> list:
    return compile_configs(configs, globals(), ptx_dir)


# ---- GPU: check and time ----

H, K, D = 16, 8, 128  # Qwen3-0.6B
CASES = {"4096": [4096], "16384": [16384], "packed": [1000, 3000, 77, 4096]}
TOL = 2e-2  # max |diff| / max |ref| allowed (bf16 outputs)


class Case:
    """Random packed sequences, our forward's output and LSE, delta, the Triton dK/dV launch."""

    def __init__(self, lens: list[int]):
        import torch
        from miles_kernels._triton import attention_bwd as AB
        from miles_kernels._triton.paged_attention import packed_attention

        self.lens, T = lens, sum(lens)
        g = torch.Generator(device="cuda").manual_seed(T)
        bf = torch.bfloat16
        self.q, self.do = (torch.randn(T, H, D, generator=g, device="cuda").to(bf) for _ in range(2))
        self.k, self.v = (torch.randn(T, K, D, generator=g, device="cuda").to(bf) for _ in range(2))
        self.cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32, device="cuda")
        self.max_len, self.scale, self.T = max(lens), D**-0.5, T
        self.lse = torch.empty(H, T, device="cuda")
        self.o = packed_attention(self.q, self.k, self.v, self.cu, self.max_len, self.scale, lse_HT=self.lse)
        self.delta = torch.empty(H, T, device="cuda")
        rows = AB._DELTA_ROWS[bf]
        AB._delta_kernel[(triton.cdiv(T, rows), H)](self.o, self.do, self.delta, T, H * D, T, D=D, BLOCK_T=rows,
                                                    num_warps=4)
        # TFLOP: 4 MMAs of 2 * D flops per causal (query, key) pair, L^2 / 2 pairs per query head
        self.tflop = 4 * 2 * D * H * sum(L * L / 2 for L in lens) / 1e12

    def triton_bwd(self):
        """(dk, dv) of the whole Triton backward (packed_attention_bwd, GLUON_DKDV off)."""
        from miles_kernels._triton import attention_bwd as AB
        AB.GLUON_DKDV = False
        try:
            _, dk, dv = AB.packed_attention_bwd(self.q, self.k, self.v, self.o, self.do, self.lse, self.cu,
                                                self.max_len, self.scale)
        finally:
            AB.GLUON_DKDV = True
        return dk, dv

    def triton_dkdv(self, dk, dv):
        """A launcher of the Triton `_dkdv_kernel` alone, as packed_attention_bwd launches it."""
        import torch
        from miles_kernels._triton import attention_bwd as AB
        T, B = self.T, len(self.lens)
        t = AB._pick(AB.DKDV_TILES[torch.bfloat16], lambda t: triton.cdiv(T, t.block_n) * K)
        q_in, do_in = AB.tma_descriptors((self.q, self.do), t.block_m, AB.DKDV_TMA) or (self.q, self.do)
        grid = (triton.cdiv(self.max_len, t.block_n) * B * K, )
        args = (q_in, self.k, self.v, do_in, dk, dv, self.lse, self.delta, self.cu, self.scale * 1.4426950408889634,
                self.scale, K, B * K, H * D, K * D, self.lse.stride(0), T)
        meta = dict(G=H // K, D=D, BLOCK_M=t.block_m, BLOCK_N=t.block_n, PRECISION="tf32", TMA=q_in is not self.q,
                    num_warps=t.num_warps, num_stages=t.num_stages)
        return lambda: AB._dkdv_kernel[grid](*args, **meta)

    def gluon_dkdv(self, config, dk, dv):
        """A launcher of one Gluon config."""
        B = len(self.lens)
        keys = config[3] * (2 if config[1] == "_dkdv_kernel" else 1)  # ws2: two KV tiles a program
        grid = (triton.cdiv(self.max_len, keys) * B * K, )
        return self.gluon_launch(globals()[config[1]], config, grid, (dk, dv), (K, B * K, K * D))

    def gluon_launch(self, fn, config, grid, outs, ints):
        """A launcher of the Gluon kernel fn at config over grid, with both probes' argument order:
        q, dout by descriptors of BLOCK_M rows, k, v of BLOCK_N, the outputs, the LSE, delta,
        offsets and scales, the kernel's integers (ints), then the LSE's and delta's row strides."""
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
        _, kernel, bm, bn, nw, stages, maxnreg = config

        def desc(x, rows):
            x2 = x.view(self.T, -1)
            layout = gl.NVMMASharedLayout.get_default_for([rows, D], gl.bfloat16)
            return TensorDescriptor(x2, list(x2.shape), [x2.stride(0), 1], [rows, D], layout)

        args = (desc(self.q, bm), desc(self.do, bm), desc(self.k, bn), desc(self.v, bn), *outs, self.lse, self.delta,
                self.cu, self.scale * 1.4426950408889634, self.scale, *ints, self.lse.stride(0), self.T)
        meta = dict(G=H // K, STAGES=stages, num_warps=nw)
        params = [p.name for p in fn.params]
        if "LOAD_REGS" in params:
            meta["LOAD_REGS"] = LOAD_REGS
        if "CONSUMER_REGS" in params:
            meta["CONSUMER_REGS"] = 240
        if maxnreg:
            meta["maxnreg"] = maxnreg
        return lambda: fn[grid](*args, **meta)


def fp32_reference(c: Case):
    """(dq, dk, dv) of causal GQA attention in fp32 torch, one sequence at a time."""
    import torch
    grads = []
    for lo, hi in zip(c.cu[:-1].tolist(), c.cu[1:].tolist()):
        q, k, v, do = (x[lo:hi].float().requires_grad_(True) for x in (c.q, c.k, c.v, c.do))
        kk, vv = (x.repeat_interleave(H // K, dim=1) for x in (k, v))
        s = torch.einsum("thd,shd->hts", q, kk) * c.scale
        s = s.masked_fill(torch.ones(hi - lo, hi - lo, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        o = torch.einsum("hts,shd->thd", s.softmax(-1), vv)
        grads.append(torch.autograd.grad(o, (q, k, v), do))
    return tuple(torch.cat(g) for g in zip(*grads))


def rel_err(x, ref) -> float:
    return float((x.float() - ref.float()).abs().max() / ref.float().abs().max())


def _bench_us(fn) -> float:
    """Median us of fn replayed from a CUDA graph (the kernel's time, not the launch's)."""
    import torch
    from triton.testing import do_bench
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench(g.replay, warmup=10, rep=100, return_mode="median") * 1e3


def gpu_run(out: str, configs: list) -> int:
    import torch
    dev = torch.cuda.get_device_name()
    print(f"{dev}, triton {triton.__version__}, bf16, H {H}, K {K}, D {D}; TFLOP/s = 4 * 2 * D * H * sum(L^2 / 2) "
          f"/ time (the dK/dV kernel's 4 MMAs over the causal half)")
    results, failed = dict(device=dev, triton=triton.__version__, tol=TOL, cases={}), []
    for case_name, lens in CASES.items():
        c = Case(lens)
        ref_dk, ref_dv = c.triton_bwd()
        dk, dv = torch.empty_like(c.k), torch.empty_like(c.v)
        run_triton = c.triton_dkdv(dk, dv)
        run_triton()
        r = dict(lens=lens, tflop=c.tflop, triton_split_vs_bwd=[rel_err(dk, ref_dk), rel_err(dv, ref_dv)])
        if case_name == "4096":
            _, f_dk, f_dv = fp32_reference(c)
            r["triton_vs_fp32"] = [rel_err(ref_dk, f_dk), rel_err(ref_dv, f_dv)]
        r["triton_us"] = _bench_us(run_triton)
        r["gluon"] = {}
        print(f"\n{case_name} {lens}: Triton _dkdv_kernel {r['triton_us']:.1f} us, "
              f"{c.tflop / r['triton_us'] * 1e6:.0f} TFLOP/s" + (
                  f"; Triton vs fp32 dk {r['triton_vs_fp32'][0]:.2e} dv {r['triton_vs_fp32'][1]:.2e}"
                  if "triton_vs_fp32" in r else ""))
        print(f"{'config':>22} {'err dk, dv':>19} {'vs fp32':>19} {'us':>9} {'x Triton':>8} {'TFLOP/s':>8} "
              f"{'regs':>5} {'spills':>6}")
        fp32s = (f_dk, f_dv) if case_name == "4096" else None
        for cfg in configs:
            nan = (torch.full_like(c.k, float("nan")), torch.full_like(c.v, float("nan")))
            r["gluon"][cfg[0]] = run_config(case_name, cfg, c.gluon_dkdv, nan, (ref_dk, ref_dv), fp32s, r, c.tflop,
                                            failed)
        results["cases"][case_name] = r
        del c
        torch.cuda.empty_cache()
    return finish(results, failed, out)


def launch(case_name: str, cfg, make_run, outs, failed: list):
    """(the launcher make_run(cfg, *outs) returns, the config's row) after one launch; (None, the
    row with its error) where the config does not compile or launch (added to failed)."""
    import torch
    row = dict(config=cfg[0])
    try:
        run = make_run(cfg, *outs)
        compiled = run()
        torch.cuda.synchronize()
        row.update(regs=compiled.n_regs, spills=compiled.n_spills)
    except Exception as e:  # a config that does not compile or launch: recorded, counted as failed
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
        print(f"{cfg[0]:>22} FAILED: {row['error'][:300]}")
        failed.append(f"{case_name} {cfg[0]}: {row['error'][:200]}")
        return None, row
    return run, row


def run_config(case_name: str, cfg, make_run, outs, refs, fp32s, r: dict, tflop: float, failed: list) -> dict:
    """One Gluon config on one case: launch make_run(cfg, *outs) (outs start as NaN: a row left
    unwritten fails), compare outs with the Triton backward's refs (and fp32s where given), time
    it against r["triton_us"]; print the table row, add any failure to failed; the row."""
    run, row = launch(case_name, cfg, make_run, outs, failed)
    if run is None:
        return row
    row["err"] = [rel_err(o, ref) for o, ref in zip(outs, refs)]
    ok = all(e <= TOL for e in row["err"])  # (nan compares false)
    if fp32s is not None:
        row["vs_fp32"] = [rel_err(o, ref) for o, ref in zip(outs, fp32s)]
        ok = ok and all(e <= TOL for e in row["vs_fp32"])
    row["ok"] = ok
    if not ok:
        failed.append(f"{case_name} {cfg[0]}: err {row['err']} vs_fp32 {row.get('vs_fp32')}")
    row["us"] = _bench_us(run)
    row["x_triton"] = r["triton_us"] / row["us"]
    row["tflops"] = tflop / row["us"] * 1e6
    errs = " ".join(f"{e:.2e}" for e in row["err"])
    fp = " ".join(f"{e:.2e}" for e in row.get("vs_fp32", []))
    print(f"{cfg[0]:>22} {errs:>19} {fp:>19} {row['us']:>9.1f} {row['x_triton']:>8.3f} {row['tflops']:>8.0f} "
          f"{row['regs']:>5} {row['spills']:>6}" + ("" if ok else "  WRONG"))
    return row


def finish(results: dict, failed: list, out: str) -> int:
    """Write the JSON; 1 (and the failures on stderr) where a config was wrong or did not run."""
    results["failed"] = failed
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {out}")
    if failed:
        print("FAILED:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


def cli(doc: str, configs: list, compile_only_fn, gpu_run_fn) -> None:
    """The probes' command line: --compile-only (CPU) or --out (GPU) over the configs --configs /
    --match / --exclude pick."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile-only", action="store_true", help="compile for sm_90 on the CPU, print regs/spills")
    ap.add_argument("--ptx", default="", help="with --compile-only: also write each kernel's ttgir and PTX here")
    ap.add_argument("--out", default="", help="GPU mode: write the results here")
    ap.add_argument("--configs", default="", help="comma-separated config names (default: all)")
    ap.add_argument("--match", default="", help="only the configs whose name contains this")
    ap.add_argument("--exclude", default="", help="not the configs whose name contains this")
    a = ap.parse_args()
    if not (a.compile_only or a.out):
        ap.error("give --compile-only or --out OUT.json")
    names = [n.strip() for n in a.configs.split(",") if n.strip()]
    picked = [c for c in configs if (not names or c[0] in names) and a.match in c[0]
              and not (a.exclude and a.exclude in c[0])]
    if not picked:
        ap.error(f"no config matches (--configs {a.configs!r} --match {a.match!r} --exclude {a.exclude!r}); "
                 f"the configs: {[c[0] for c in configs]}")
    if a.compile_only:
        sys.exit(1 if compile_only_fn(a.ptx, picked) else 0)
    sys.exit(gpu_run_fn(a.out, picked))

if __name__ == "__main__":
    cli(__doc__, CONFIGS, compile_only, gpu_run)
