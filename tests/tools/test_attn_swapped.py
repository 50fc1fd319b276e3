"""tools/bench/attn_swapped.py, the swapped-operand decode candidate the GPU sweep times
(`attn_sweep.py --swapped`): its values vs float64 under the Triton interpreter, so the
candidate that gets measured computes attention (several splits, a short last block, GQA)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_swapped_decode_candidate_is_attention():
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "kernels")])}
    proc = subprocess.run([sys.executable, str(ROOT / "tools/bench/attn_swapped.py")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "swapped_decode: ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


_SAME_BITS = """
import sys, torch
sys.path[:0] = [sys.argv[1] + '/tests/kernels', sys.argv[1] + '/tools/bench']
from test_triton_interp import _use_fixed_order_dot
from miles_kernels._triton import paged_attention as A
from attn_swapped import swapped_decode
_use_fixed_order_dot()
A.ROW_SUM_DOT = True
g = torch.Generator().manual_seed(3)
for H, K, lens in ((4, 2, (1, 70, 300)), (8, 2, (130, 64))):
    D, S = 16, A.KV_BLOCK
    B, width = len(lens), -(-max(lens) // S)
    pages = torch.randperm(B * width + 2, generator=g)[: B * width].view(B, width).to(torch.int32)
    kc = torch.randn(B * width + 2, S, K, D, generator=g)
    vc = torch.randn(B * width + 2, S, K, D, generator=g)
    q = torch.randn(B, H, D, generator=g) * 3
    kv = torch.tensor(lens, dtype=torch.int32)
    want = A.attention(q, kc, vc, torch.arange(B + 1, dtype=torch.int32), kv, pages, 1, D**-0.5)
    got = swapped_decode(q, kc, vc, kv, pages, D**-0.5, l_dot=True)
    assert torch.equal(got, want), (H, K, lens, (got - want).abs().max().item())
print("same bits")
"""


def test_swapped_decode_with_dot_row_sums_is_the_kernel_bitwise():
    """With the row sums from an MMA (ROW_SUM_DOT) the swapped tile sums every product in the
    kernel's order: same bits under the interpreter's fixed-order dot (the GPU sweep checks wgmma)."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "kernels")])}
    proc = subprocess.run([sys.executable, "-c", _SAME_BITS, str(ROOT)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0 and "same bits" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
