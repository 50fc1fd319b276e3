"""Diagnostic (not committed): DQ_FUSED with and without its turn waits (WAIT off: dQ wrong, timing only)."""
import sys, torch
sys.path.insert(0, "tools/bench")
import attn_bwd as AB
from miles_kernels._triton import attention_bwd as B

real = B._dkdvq_kernel
class NoWait:
    def __getitem__(self, grid):
        f = real[grid]
        def g(*a, **kw):
            kw["WAIT"] = False
            return f(*a, **kw)
        return g

for L in (4096, 16384):
    c = AB.Case(16, 8, L)
    B.DQ_FUSED = False
    base = AB._graph_ms(c.ours) * 1e3
    flash = AB._graph_ms(c.flash) * 1e3
    row = [f"0.6b L={L}: split {base:.0f}us flash {flash:.0f}us"]
    B.DQ_FUSED = True
    for t in (B.Tile(32, 128, 8, 2), B.Tile(64, 128, 8, 2)):
        for name, kern in (("wait", real), ("nowait", NoWait())):
            B._dkdvq_kernel = kern
            us = AB._graph_ms(lambda: c.ours(dkdv_tile=t)) * 1e3
            row.append(f"{tuple(t)} {name} {us:.0f}us")
        B._dkdvq_kernel = real
    print(" | ".join(row), flush=True)
