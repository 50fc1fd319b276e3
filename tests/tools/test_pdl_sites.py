"""tools/bench/pdl_sites.py: a gdc_rows call gets its launcher's site limit (others the default) and is counted
per site; a bad --limits item is refused naming the sites. That each kernel's launcher is found as its site is
checked in tests/kernels (check_pdl_rows_reach_each_row_kernel)."""

import pytest

pytest.importorskip("triton")


class _Tensor:  # gdc_rows only reads is_cuda
    def __init__(self, is_cuda: bool):
        self.is_cuda = is_cuda


def _launcher(gdc_rows, stem: str, name: str, limit: int | None = None):
    """A function named `name` in a file named `stem`.py that asks gdc_rows, as a kernel launcher does
    (passing `limit` as the norms do)."""
    ns = {"gdc_rows": gdc_rows, "limit": limit}
    exec(compile(f"def {name}(x, rows):\n    return gdc_rows(x, rows, limit)\n", f"/k/{stem}.py", "exec"), ns)
    return ns[name]


def test_site_limits(bench_script):
    p = bench_script("pdl_sites")
    asked = {}
    g = p.site_rows(p.parse_limits(["rms_norm=all", "linear=8", "default=0"]), asked)
    cuda, cpu = _Tensor(True), _Tensor(False)
    norm, lin = _launcher(g, "elementwise", "rms_norm", 256), _launcher(g, "matmul", "_launch_linear")
    other = _launcher(g, "elementwise", "add_rms_norm", 256)
    assert norm(cuda, 10**6) and not norm(cpu, 1)
    assert lin(cuda, 8) and not lin(cuda, 9)
    assert not other(cuda, 1)  # the default given, 0 rows, over its shipped 256
    assert not _launcher(g, "other", "rms_norm")(cuda, 1)  # same name in another file: the default
    assert asked == {"rms_norm": 2, "linear": 2, "add_rms_norm": 1, "default": 1}


def test_sites_not_named_keep_their_shipped_limit(bench_script):
    p = bench_script("pdl_sites")
    g, cuda = p.site_rows(p.parse_limits(["attention=all"]), {}), _Tensor(True)
    rows = p.launch.PDL_MAX_ROWS
    lin, norm = _launcher(g, "matmul", "_launch_linear"), _launcher(g, "elementwise", "rms_norm", 2 * rows)
    assert lin(cuda, rows) and not lin(cuda, rows + 1)
    assert norm(cuda, 2 * rows) and not norm(cuda, 2 * rows + 1)
    assert _launcher(g, "paged_attention", "_launch")(cuda, 10**6)


def test_bad_limits_refused(bench_script):
    p = bench_script("pdl_sites")
    for bad in (["norm=64"], ["linear=-1"], ["linear"]):
        with pytest.raises(SystemExit, match="SITE one of .*qk_norm_rope"):
            p.parse_limits(bad)
    assert p.parse_limits([]) == {} and p.parse_limits(["swiglu=all"]) == {"swiglu": p.launch.ALL_ROWS}
