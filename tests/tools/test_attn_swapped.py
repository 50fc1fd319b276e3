"""tools/bench/attn_swapped.py, the swapped-operand decode candidate the GPU sweep times
(`attn_sweep.py --swapped`): its values vs float64 under the Triton interpreter, so the
candidate that gets measured computes attention (several splits, a short last block, GQA)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
A.ROW_SUM = sys.argv[2]
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
    got = swapped_decode(q, kc, vc, kv, pages, D**-0.5, row_sum=sys.argv[2])
    assert torch.equal(got, want), (H, K, lens, (got - want).abs().max().item())
print("same bits")
"""


@pytest.mark.parametrize("row_sum", ["dot", "exact"])
def test_swapped_decode_with_shared_row_sums_is_the_kernel_bitwise(row_sum):
    """With row sums from an MMA ("dot") or order-free ("exact") the swapped tile sums every
    value in the kernel's order: same bits under the interpreter's fixed-order dot (the GPU
    sweep, attn_sweep.py --rowsum, checks wgmma)."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "kernels")])}
    proc = subprocess.run([sys.executable, "-c", _SAME_BITS, str(ROOT), row_sum], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0 and "same bits" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


_ORDER_FREE = """
import torch, triton, triton.language as tl
from miles_kernels._triton.paged_attention import _exact_sum

@triton.jit
def k(p_ptr, o_ptr):
    r = tl.arange(0, 64)
    p = tl.load(p_ptr + r[:, None] * 64 + tl.arange(0, 64)[None, :])
    tl.store(o_ptr + r, _exact_sum(p, 1))

g = torch.Generator().manual_seed(0)
# softmax-like rows: one 1, the rest spread over 40 binades (the sums a long context adds)
p = torch.exp2(-40 * torch.rand(64, 64, generator=g)); p[:, 0] = 1.0
outs = []
for perm in (torch.arange(64), torch.randperm(64, generator=g), torch.arange(63, -1, -1)):
    o = torch.empty(64)
    k[(1,)](p[:, perm].contiguous(), o)
    outs.append(o)
assert all(torch.equal(o, outs[0]) for o in outs), "order changed the sum"
err = (outs[0].double() - p.double().sum(1)).abs().max().item()
assert err <= 64 * 2.0**-37 + 2.0**-22, err
print("order-free", err)
"""


def test_exact_row_sum_is_order_free():
    """_exact_sum (ROW_SUM = "exact"): the same bits for any order of the terms, within
    64 * 2**-37 (+ one rounding) of the float64 sum."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "kernels")])}
    proc = subprocess.run([sys.executable, "-c", _ORDER_FREE], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "order-free" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
