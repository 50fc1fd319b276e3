"""Triton kernels under the Triton interpreter (CPU, fp32, tiny shapes).

TRITON_INTERPRET=1 must be set before triton is first imported, so the checks run in one
child process (this file run as a script); each pytest test asserts on its check's result.
Every check compares with a float64 torch reference and asserts the invariance property
bitwise (row alone == row in batch; prefill == chunked prefill == decode).

The interpreter runs `tl.dot` through numpy's matmul, i.e. the host's BLAS, which need not
be row-invariant (OpenBLAS with OPENBLAS_CORETYPE=Haswell: `A[3:7] @ B != (A @ B)[3:7]`).
The child replaces it with a dot that sums over K in ascending order, one fp32
multiply-add step at a time, as the GPU kernels' fixed tiles do: the checks then prove
the kernels' tiling and indexing on any CPU, whatever BLAS the host has.
"""

import json
import os
import subprocess
import sys
import traceback

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_triton_checks as checks_mod  # noqa: E402  (sibling module: torch only, no triton)


# Checks that take the interpreter longest (~1 min each on one core), started first so the children end together.
SLOW_FIRST = ("top_p_cutoff", "top_k_floor", "logprobs_filtered", "cut_snap", "top_p_narrow_start", "linears")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, str]:
    """All checks, in one child a CPU core (at most 4): each child claims the next unclaimed check
    (a file created exclusively), so the cores share the work; ~6 min on one core."""
    work = tmp_path_factory.mktemp("triton_interp")
    (work / "claims").mkdir()
    env = dict(os.environ, TRITON_INTERPRET="1")
    outs = [work / f"results{i}.json" for i in range(max(1, min(4, os.cpu_count() or 1)))]
    procs = [subprocess.Popen([sys.executable, __file__, str(out), str(work / "claims")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for out in outs]
    try:
        logs = [proc.communicate(timeout=540) for proc in procs]
    finally:  # a timeout or an interrupt leaves no child running
        for proc in procs:
            proc.kill()
    res = {}
    for proc, out, (stdout, stderr) in zip(procs, outs, logs):
        assert proc.returncode == 0 and out.exists(), f"interpreter child failed:\n{stdout}\n{stderr}"
        res.update(json.loads(out.read_text()))
    return res


@pytest.mark.parametrize("name", sorted(checks_mod.CHECKS))
def test_triton_interp(results, name):
    assert results[name] == "ok", results[name]


def test_fixed_order_dot_is_row_invariant_and_accurate():
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((9, 37)).astype(np.float32)
    b = rng.standard_normal((37, 11)).astype(np.float32)
    acc = rng.standard_normal((9, 11)).astype(np.float32)
    full = fixed_order_dot(a, b, acc)
    assert full.dtype == np.float32
    assert np.array_equal(fixed_order_dot(a[3:7], b, acc[3:7]), full[3:7])
    assert np.array_equal(fixed_order_dot(a[4:5], b[:, 2:9], acc[4:5, 2:9]), full[4:5, 2:9])
    ref = a.astype(np.float64) @ b.astype(np.float64) + acc
    assert np.abs(full - ref).max() < 1e-4


def fixed_order_dot(a, b, acc):
    """a [..., M, K] @ b [..., K, N] + acc, summed over k = 0, 1, ... in that order, in acc's dtype.

    Every output element gets the same sequence of roundings whatever M, N or the row's
    place in the tile: row-invariant by construction, independent of numpy's BLAS.
    """
    a, b = a.astype(acc.dtype, copy=False), b.astype(acc.dtype, copy=False)
    out = a[..., :, 0:1] * b[..., 0:1, :]
    for k in range(1, a.shape[-1]):
        out = out + a[..., :, k:k + 1] * b[..., k:k + 1, :]
    return out + acc


def _use_fixed_order_dot() -> None:
    from triton.runtime import interpreter

    def create_dot(self, a, b, d, *precision_args):
        if a.dtype.primitive_bitwidth == 8 or b.dtype.primitive_bitwidth == 8:
            raise TypeError("fixed_order_dot: miles_kernels has no 8-bit dot; extend the harness first")
        return interpreter.TensorHandle(fixed_order_dot(a.data, b.data, d.data), d.dtype.scalar)

    assert hasattr(interpreter.InterpreterBuilder, "create_dot"), "triton's interpreter has no create_dot to replace"
    interpreter.InterpreterBuilder.create_dot = create_dot


def _claim(claims: str, name: str) -> bool:
    """True for the one child whose exclusive create of claims/name succeeds."""
    try:
        os.close(os.open(os.path.join(claims, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _main(out_path: str, claims: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    _use_fixed_order_dot()
    res = {}
    order = [n for n in SLOW_FIRST if n in checks_mod.CHECKS] + [n for n in checks_mod.CHECKS if n not in SLOW_FIRST]
    for name in order:
        if not _claim(claims, name):
            continue
        fn = checks_mod.CHECKS[name]
        try:
            fn()
            res[name] = "ok"
        except Exception:  # record every failure; the parent test names the check
            res[name] = traceback.format_exc()
    with open(out_path, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
