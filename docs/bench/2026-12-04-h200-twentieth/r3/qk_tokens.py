"""qk_norm_rope at the trainer's 16k shape: programs of 1, 4, 8 tokens (bits compared), timed."""
import torch
from triton.testing import do_bench
from miles_kernels._triton import elementwise as E
T, H, K, D = 16384, 16, 8, 128
g = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(T, H, D, device="cuda", generator=g).bfloat16()
k = torch.randn(T, K, D, device="cuda", generator=g).bfloat16()
qw, kw = (1 + 0.1 * torch.randn(D, device="cuda", generator=g)).bfloat16(), (1 + 0.1 * torch.randn(D, device="cuda", generator=g)).bfloat16()
f = torch.arange(T, device="cuda")[:, None].float() * torch.rand(D // 2, device="cuda", generator=g)[None]
cos, sin = f.cos(), f.sin()
ref = None
for tok in (1, 4, 8):
    E._TOKENS_PER_PROGRAM = tok
    out = E.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)
    if ref is None:
        ref = out
    same = all(torch.equal(a, b) for a, b in zip(out, ref))
    ms = do_bench(lambda: E.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6), return_mode="median")
    print(f"tokens/program {tok}: {ms * 1e3:.1f} us, same bits as 1: {same}, {2 * (q.numel() + k.numel()) * 2 / ms / 1e6:.0f} GB/s")
