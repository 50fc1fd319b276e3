"""Prove an attention-kernel change keeps the bits: save the Triton attention forward's outputs
under the interpreter (CPU) for one kernels tree, then compare two saves as int32 patterns.

    git worktree add /tmp/old HEAD~1
    TRITON_INTERPRET=1 PYTHONPATH=/tmp/old/kernels:src python tools/attn_bits.py save /tmp/old.pt
    TRITON_INTERPRET=1 PYTHONPATH=kernels:src python tools/attn_bits.py save /tmp/new.pt
    python tools/attn_bits.py compare /tmp/old.pt /tmp/new.pt

Cases (tests/kernels/test_triton_checks.py's _walk_case, two seeds): packed sequences with the
LSE, paged prefill, a chunk, decode in the rows and swapped tiles; every ROW_SUM, both walks, K/V
by TMA and by pointers. The dot sums over K in a fixed order (test_triton_interp's), so the saves
do not depend on the host's BLAS. A few minutes on 2 cores.
"""

import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1] / "tests" / "kernels"


def save(out: str) -> None:
    sys.path.insert(0, str(TESTS))
    import test_triton_checks as C
    import test_triton_interp as I

    from miles_kernels._triton import paged_attention as A

    torch.set_num_threads(1)
    I._use_fixed_order_dot()
    kt = C._kt()
    res = {}
    A.KV_BLOCK, A.KV_SPLIT, A.DECODE_PROGRAMS = 16, 32, 1
    for seed in (11, 12):
        H, K, D, lens, T, q, k, v, cu, L, pages, caches, at = C._walk_case(seed)
        for rs in A.ROW_SUMS:
            for walk in ("one", "splits"):
                for tma in (False, True):
                    A.ROW_SUM, A.WALK, A.KV_TMA = rs, walk, tma
                    A.PAGED_KV_TMA = {"prefill": tma, "decode": tma}
                    key = f"{seed}-{rs}-{walk}-{tma}"
                    lse = torch.empty(H, T)
                    res[key + "-packed"] = kt.packed_attention(q, k, v, cu, max(lens), 0.3, lse_HT=lse)
                    res[key + "-lse"] = lse
                    res[key + "-prefill"] = C._run_attention(kt, q[:L], caches, [(L, L, pages)], 0.3)
                    res[key + "-chunk"] = C._run_attention(kt, q[40:L], caches, [(L - 40, L, pages)], 0.3)
                    for tile in ("rows",) if rs == "reduce" else ("rows", "swapped"):  # swapped: no "reduce"
                        A.DECODE_TILE = tile
                        res[f"{key}-decode-{tile}"] = C._run_attention(kt, q[at], caches,
                                                                       [(1, t + 1, pages) for t in at], 0.3)
                    A.DECODE_TILE = "auto"
    torch.save(res, out)
    print(f"{len(res)} outputs -> {out}")


def compare(a_path: str, b_path: str) -> int:
    a, b = torch.load(a_path), torch.load(b_path)
    if a.keys() != b.keys():
        print(f"different cases: {sorted(set(a) ^ set(b))[:10]}")
        return 1
    bad = [k for k in a if not torch.equal(a[k].view(torch.int32), b[k].view(torch.int32))]
    print(f"{len(a)} outputs compared as int32 patterns; {len(bad)} differ" + (f": {bad[:10]}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "save":
        save(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
