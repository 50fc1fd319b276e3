"""Shared by the GPU kernel tests (tests/gpu/test_kernels_gpu.py, test_matmul_gpu.py): seeded CUDA
generators and the bitwise / accuracy asserts."""

import torch

DTYPES = [torch.bfloat16, torch.float32]
REL_TOL = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3, torch.float32: 2e-5}


def _gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def _randn(*shape, dtype, g, scale=1.0):
    return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)


def _accurate(got, ref, dtype, what):
    err = (got.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item() or 1.0
    assert err <= REL_TOL[dtype] * scale, f"{what} ({dtype}): max err {err:.3g} vs max |ref| {scale:.3g}"


def _same(a, b, what):
    assert torch.equal(a, b), f"{what}: not bitwise equal, max diff {(a.double() - b.double()).abs().max().item():.3g}"
