"""Registers, spills and shared memory of the attention backward kernels compiled for sm_90 on
a machine without a GPU (triton's own ptxas -v), to compare tiles before a GPU run.

    python tools/bench/sm90_regs.py                       # the split and the fused kernels' tiles
    python tools/bench/sm90_regs.py _dkdvq_kernel 32,128,8,2 64,64,8,2 --ptx DIR

Use the GPU image's triton (3.6: `pip install triton==3.6.0` in a separate venv) for numbers that
carry over. No runtime specializations (equal-to-1 arguments, alignment of every integer) are
applied, so spills read higher than tools/bench/kernel_regs.py's on the GPU (the split dK/dV
tile: 332 B here, 82 B there): compare tiles with each other, not with the GPU's figures.
Operands q / dout (dK/dV kernels) or k / v (dQ kernel) by TMA, bf16, head dim 128, GQA 2.
"""

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from miles_kernels._triton import attention_bwd as AB

DEFAULT = {"_dkdv_kernel": ["64,64,4,2"], "_dq_kernel": ["128,64,8,3"],
           "_dkdvq_kernel": ["32,128,8,2", "32,128,8,3", "32,64,8,2", "64,64,8,2", "64,128,8,2"]}


def compile_one(name: str, tile: tuple, ptx_dir: str = "") -> dict:
    BM, BN, warps, stages = tile
    fn = getattr(AB, name)
    fn = getattr(fn, "fn", fn)  # FastKernel -> the JITFunction
    names = [p.name for p in fn.params]
    consts = dict(G=2, D=128, BLOCK_M=BM, BLOCK_N=BN, PRECISION="tf32", TMA=True, WAIT=True, NT=32 * warps)
    consts = {k: v for k, v in consts.items() if k in names}
    tma = ("k_ptr", "v_ptr") if name == "_dq_kernel" else ("q_ptr", "do_ptr")
    rows = BN if name == "_dq_kernel" else BM
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in tma:
            sig[n] = f"tensordesc<bf16[{rows}, 128]>"
        elif n.endswith("_ptr"):
            sig[n] = "*i32" if n in ("cu_ptr", "turn_ptr") else "*fp32" if n in ("lse_ptr", "delta_ptr", "acc_ptr") \
                else "*bf16"
        else:
            sig[n] = "fp32" if n in ("qk_scale", "scale") else "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n].startswith("*") or n.startswith("stride")}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.TemporaryDirectory() as d:
        open(f"{d}/k.ptx", "w").write(c.asm["ptx"])
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
        info = subprocess.run([ptxas, "-arch=sm_90a", "-v", f"{d}/k.ptx", "-o", f"{d}/k.o"],
                              capture_output=True, text=True, check=True).stderr
    if ptx_dir:
        os.makedirs(ptx_dir, exist_ok=True)
        open(os.path.join(ptx_dir, f"{name}_{BM}_{BN}_{warps}_{stages}.ptx"), "w").write(c.asm["ptx"])
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return dict(kernel=name, tile=tile, regs=int(re.search(r"Used (\d+) registers", info).group(1)),
                spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)), shared=c.metadata.shared)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kernel", nargs="?", help=f"one of {sorted(DEFAULT)} (default: all, their usual tiles)")
    ap.add_argument("tiles", nargs="*", help="BLOCK_M,BLOCK_N,warps,stages ...")
    ap.add_argument("--ptx", default="", help="also write each kernel's PTX to this folder")
    a = ap.parse_args()
    jobs = {a.kernel: a.tiles or DEFAULT[a.kernel]} if a.kernel else DEFAULT
    print(f"triton {triton.__version__}, sm_90, bf16, D 128, G 2, TMA operands")
    print(f"{'kernel':>14} {'tile':>16} {'regs':>5} {'spill st/ld B':>14} {'shared B':>9}")
    for name, tiles in jobs.items():
        for t in tiles:
            r = compile_one(name, tuple(int(x) for x in t.split(",")), a.ptx)
            print(f"{name:>14} {t:>16} {r['regs']:>5} {r['spill_stores']:>6} / {r['spill_loads']:<5} {r['shared']:>9}")


if __name__ == "__main__":
    main()
