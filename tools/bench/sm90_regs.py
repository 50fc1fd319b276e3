"""Registers, spills, shared memory, SASS instruction counts and wgmma serialization of the
attention and linear kernels compiled for sm_90 on a machine without a GPU (triton's own ptxas and
cuobjdump), to compare tiles or two versions of a kernel before a GPU run. "waits" counts the
SASS waits for wgmma groups (WARPGROUP.DEPBAR) against the wgmma instructions (HGMMA): one wait
per HGMMA means ptxas serialized them, and its "Potential Performance Loss" note (C75xx) says why.

    python tools/bench/sm90_regs.py                       # every kernel below at its usual tiles
    python tools/bench/sm90_regs.py _dkdv_kernel 64,64,4,2 32,64,4,3 --ptx DIR
    python tools/bench/sm90_regs.py _linear_tma_kernel 128,128,8,5 64,128,4,8   # linear by TMA, BM,BN,warps,stages
    python tools/bench/sm90_regs.py wide_probe n2_128x128_w8_s4 m3_64x128_w8_s4  # wide_probe.py's configs
    python tools/bench/sm90_regs.py _linear_streamk_kernel 128,128,8,5           # linear's stream-K (streamk.py)
    python tools/bench/sm90_regs.py _swiglu_streamk_kernel 128,32,4,5            # swiglu's (BN: a weight's width)
    python tools/bench/sm90_regs.py _linears_tma_kernel 128,128,8,5 --linears-tma-store on   # q|k|v's (linears)

Kernels: the backward's `_dkdv_kernel`, `_dq_kernel` (q / dout, or k / v for dQ, by TMA, GQA 2), the training
forward `_attn_kernel` (packed K/V by TMA, ROW_SUM "fixed", one loop, the LSE) and the swapped-tile
`decode_kernel` (16 rows, pages of 64 by pointers); bf16, head dim 128. The persistent TMA linears (linear's and
swiglu's, plain and stream-K, and linears' q|k|v; with PDL as they run) and wide_probe's kernels: bf16,
BLOCK_K 64, 132 programs. Use the GPU image's triton (3.6: `pip install triton==3.6.0` in a separate venv) for
numbers that carry over. No runtime specializations (equal-to-1 arguments, alignment of every integer) are
applied, so spills read higher than tools/bench/kernel_regs.py's on the GPU (the split dK/dV tile: 332 B here, 82 B
there): compare tiles or versions, not with the GPU's figures.
"""

import argparse
import collections
import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from miles_kernels._triton import attention_bwd as AB
from miles_kernels._triton import decode_attention as DA
from miles_kernels._triton import fused_linears as FL
from miles_kernels._triton import matmul as MM
from miles_kernels._triton import paged_attention as A
from miles_kernels._triton import streamk as SK

DEFAULT = {"_dkdv_kernel": ["64,64,4,2"], "_dq_kernel": ["128,64,8,3"],
           "_attn_kernel": ["64,64,4,3"], "decode_kernel": ["16,64,4,3"]}
SHIPPED = ("_linear_tma_kernel", "_linear_streamk_kernel", "_swiglu_tma_kernel", "_swiglu_streamk_kernel",
           "_linears_tma_kernel")
LINEAR = SHIPPED + ("wide_probe",)  # not in the default run
LINEARS_TMA_STORE = FL.TMA_STORE  # _linears_tma_kernel's stores (main's --linears-tma-store)
OPS = ("HGMMA", "HMMA", "MUFU", "FMUL", "FFMA", "FADD", "FMNMX", "F2FP", "IADD3", "IMAD", "SEL", "FSEL", "SHFL", "BAR")
_FWD = dict(G=2, G_PAD=2, BLOCK_D=128, SPLIT_BLOCKS=4, SPLIT_PARALLEL=False, PART_ROWS=1, PRECISION="tf32",
            L_SUM="fixed", ONE_LOOP=True)


def _setup(name: str, tile: tuple):
    """(kernel, constexprs, TMA operand names, TMA block rows) for name at tile."""
    bm, bn = tile[:2]
    if name == "_attn_kernel":
        return A._attn_kernel, dict(_FWD, BLOCK_M=bm, ATTN_BLK=bn, PAGE=1, CONTIG=True, STORE_LSE=True, TMA=True), \
            ("k_ptr", "v_ptr"), bn
    if name == "decode_kernel":
        kernel = DA.decode_pairs_kernel if tile[4:] == (2,) else DA.decode_kernel  # a fifth field 2: two pairs
        return kernel, dict(_FWD, ROWS=bm, ATTN_BLK=bn, PAGE=64, STORE_LSE=False, TMA=False), (), bn
    consts = dict(G=2, D=128, BLOCK_M=bm, BLOCK_N=bn, PRECISION="tf32", TMA=True)
    if name == "_dq_kernel":
        return AB._dq_kernel, consts, ("k_ptr", "v_ptr"), bn
    return getattr(AB, name), consts, ("q_ptr", "do_ptr"), bm


def _attention_sig(name: str, tile: tuple) -> tuple:
    """(kernel, signature, constexprs) of an attention kernel at tile."""
    fn, consts, tma, rows = _setup(name, tile)
    fn = getattr(fn, "fn", fn)  # FastKernel -> the JITFunction
    names = [p.name for p in fn.params]
    sig = {}
    for n in names:
        if n in consts:
            continue
        elif n in tma:
            sig[n] = f"tensordesc<bf16[{rows}, 128]>"
        elif n.endswith("_ptr"):
            sig[n] = "*i32" if n in ("cu_ptr", "kv_lens_ptr", "bt_ptr") else \
                "*fp32" if n in ("lse_ptr", "delta_ptr", "pm_ptr", "pl_ptr", "pacc_ptr") else "*bf16"
        else:
            sig[n] = "fp32" if n in ("qk_scale", "scale") else "i32"
    return fn, sig, consts


def _linear_sig(name: str, tile) -> tuple:
    """(kernel, signature, constexprs, warps, stages) of a SHIPPED kernel (tile BM,BN,warps,stages) or a
    tools/bench/wide_probe.py config (tile: its CFGS name); bf16, BLOCK_K 64, 132 programs."""
    def desc(r, c):
        return f"tensordesc<bf16[{r}, {c}]>"
    dims = dict(M="i32", N="i32", K="i32")
    if name in SHIPPED:
        bm, bn, warps, stages = tile
        consts = dict(HAS_BIAS=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8, PRECISION="tf32",
                      NUM_PROGRAMS=132, SLOT=SK.SLOT, USE_GDC=True)  # PDL as they run (launch.PDL_TMA)
        ws = dict(ws_ptr="*fp32", flag_ptr="*i32") if "streamk" in name else {}
        if "swiglu" in name:  # tile: the halved width a weight
            sig = dict(x_desc=desc(bm, 64), wg_desc=desc(bn, 64), wu_desc=desc(bn, 64), y_desc=desc(bm, bn), **ws,
                       M="i32", F="i32", K="i32")
            return getattr(FL, name).fn, sig, consts, warps, stages
        if "linears" in name:  # q|k|v: three weights; the outputs by pointers, or by TMA (--linears-tma-store)
            y = desc(bm, bn) if LINEARS_TMA_STORE else "*bf16"
            sig = dict(x_desc=desc(bm, 64), **{f"w{i}_desc": desc(bn, 64) for i in range(3)},
                       **{f"b{i}_ptr": "*bf16" for i in range(3)}, **{f"y{i}": y for i in range(3)}, **ws, M="i32",
                       K="i32", **{n: "i32" for n in ("N0", "N1", "N2", "T1", "T2", "T3")})
            return getattr(FL, name).fn, sig, dict(consts, TMA_STORE=LINEARS_TMA_STORE), warps, stages
        sig = dict(x_desc=desc(bm, 64), w_desc=desc(bn, 64), y_desc=desc(bm, bn), b_ptr="*bf16", **ws, **dims)
        return getattr(MM, name).fn, sig, consts, warps, stages
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    import wide_probe as wp

    if tile not in wp.CFGS:
        raise SystemExit(f"sm90_regs: wide_probe config {tile!r}: pick from {sorted(wp.CFGS)}")
    split, bm, bn, warps, stages = wp.CFGS[tile]
    consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8, NUM_PROGRAMS=132)
    if split in ("n3", "m3"):
        sig = dict(x_desc=desc(bm, 64), w_desc=desc(bn, 64), y_desc=desc(bm, bn), **dims)
        return wp._wide_kernel, sig, dict(consts, SPLIT_M=split == "m3"), warps, stages
    hm, hn = (bm, bn // 2) if split == "n2" else (bm // 2, bn)
    sig = dict(x_desc=desc(bm, 64), xh_desc=desc(hm, 64), w_desc=desc(bn, 64), wh_desc=desc(hn, 64),
               y_desc=desc(bm, bn), yh_desc=desc(hm, hn), **dims)
    return wp._wide2_kernel, sig, dict(consts, ALONG_N=split == "n2"), warps, stages


def compile_one(name: str, tile: tuple, ptx_dir: str = "") -> dict:
    if name in LINEAR:
        fn, sig, consts, warps, stages = _linear_sig(name, tile)
    else:
        (fn, sig, consts), warps, stages = _attention_sig(name, tile), tile[2], tile[3]
    names = [p.name for p in fn.params]
    consts = {k: v for k, v in consts.items() if k in names}
    consts.update({p.name: p.default for p in fn.params  # constexprs left at their defaults (USE_GDC, ...)
                   if p.is_constexpr and p.name not in consts and p.default is not inspect.Parameter.empty})
    sig = {n: "constexpr" if n in consts else sig[n] for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n].startswith("*") or n.startswith("stride")}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    tools = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    with tempfile.TemporaryDirectory() as d:
        open(f"{d}/k.ptx", "w").write(c.asm["ptx"])
        info = subprocess.run([f"{tools}/ptxas", "-arch=sm_90a", "-v", f"{d}/k.ptx", "-o", f"{d}/k.o"],
                              capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([f"{tools}/cuobjdump", "-sass", f"{d}/k.o"], capture_output=True, text=True).stdout
    if ptx_dir:
        os.makedirs(ptx_dir, exist_ok=True)
        open(os.path.join(ptx_dir, f"{name}_{'_'.join(map(str, tile))}.ptx"), "w").write(c.asm["ptx"])
    ops = collections.Counter(m.group(1).split(".")[0] for m in re.finditer(
        r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass, re.M))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return dict(kernel=name, tile=tile, regs=int(re.search(r"Used (\d+) registers", info).group(1)),
                spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)), shared=c.metadata.shared,
                sass=sum(ops.values()), ops={k: ops[k] for k in OPS if ops[k]},
                waits=sass.count("WARPGROUP.DEPBAR"), notes=sorted(set(re.findall(r"\((C75\d\d)\)", info))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kernel", nargs="?", help=f"one of {sorted(DEFAULT)} (default: all, their usual tiles)")
    ap.add_argument("tiles", nargs="*",
                    help="BLOCK_M,BLOCK_N,warps,stages ... (decode: ROWS,ATTN_BLK,warps,stages[,2 pairs a program])")
    ap.add_argument("--ptx", default="", help="also write each kernel's PTX to this folder")
    ap.add_argument("--linears-tma-store", choices=("on", "off"), default=None,
                    help="_linears_tma_kernel with its outputs stored by TMA / by pointers (default: as shipped, "
                         "fused_linears.TMA_STORE)")
    a = ap.parse_args()
    global LINEARS_TMA_STORE
    if a.linears_tma_store:
        LINEARS_TMA_STORE = a.linears_tma_store == "on"
    if a.kernel and a.kernel not in DEFAULT and a.kernel not in LINEAR:
        raise SystemExit(f"sm90_regs: kernel {a.kernel!r}: pick from {sorted(DEFAULT) + list(LINEAR)}")
    if a.kernel in LINEAR and not a.tiles:
        raise SystemExit(f"sm90_regs: {a.kernel}: name its tiles (BM,BN,warps,stages, or wide_probe's config names)")
    jobs = {a.kernel: a.tiles or DEFAULT[a.kernel]} if a.kernel else DEFAULT
    print(f"triton {triton.__version__}, sm_90, bf16, head dim 128, GQA 2")
    print(f"{'kernel':>14} {'tile':>11} {'regs':>5} {'spill st/ld B':>14} {'shared B':>9} {'SASS':>6} "
          f"{'waits/HGMMA':>11}  ops")
    for name, tiles in jobs.items():
        for t in tiles:
            r = compile_one(name, t if name == "wide_probe" else tuple(int(x) for x in t.split(",")), a.ptx)
            waits = f"{r['waits']}/{r['ops'].get('HGMMA', 0)}" + (f" {','.join(r['notes'])}" if r["notes"] else "")
            print(f"{name:>14} {t:>11} {r['regs']:>5} {r['spill_stores']:>6} / {r['spill_loads']:<5} {r['shared']:>9} "
                  f"{r['sass']:>6} {waits:>11}  {r['ops']}")


if __name__ == "__main__":
    main()
