"""ncu target: the 0.6B decode step's attention (B 64, ctx 257, 16 q / 8 kv heads, pages of 64) and its o / down
linears at M 64, each launched eagerly a few times."""
import sys
import torch
import miles_kernels as mk
from miles_kernels._triton import paged_attention as A

B, ctx, H, K, D, page = 64, 257, 16, 8, 128, 64
what = sys.argv[1] if len(sys.argv) > 1 else "attn"
g = torch.Generator(device="cuda").manual_seed(0)
if what == "attn":
    per = -(-ctx // page)
    kc = torch.randn(1 + B * per, page, K, D, generator=g, device="cuda").to(torch.bfloat16)
    vc = torch.randn_like(kc)
    bt = (1 + torch.randperm(B * per, generator=g, device="cuda")).view(B, per).to(torch.int32)
    q = torch.randn(B, H, D, generator=g, device="cuda").to(torch.bfloat16)
    cu = torch.arange(B + 1, dtype=torch.int32, device="cuda")
    kv = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    for _ in range(6):
        A.attention(q, kc, vc, cu, kv, bt, 1, D ** -0.5)
else:
    for n, k in ((1024, 2048), (1024, 3072)):
        x = torch.randn(B, k, generator=g, device="cuda").to(torch.bfloat16)
        ws = [torch.randn(n, k, generator=g, device="cuda").to(torch.bfloat16) for _ in range(8)]
        for w in ws:
            mk.linear(x, w)
torch.cuda.synchronize()
print("done", what)
