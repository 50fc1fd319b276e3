"""The benchmark scripts run with tools/bench first on sys.path, so a module there named like an
installed package or a standard-library module shadows it for every import, the dependencies'
too (transformers 5.25 imports the `kernels` package: tools/bench/kernels.py broke train.py)."""

import importlib.metadata
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench"


def test_no_bench_module_shadows_a_package():
    installed = importlib.metadata.packages_distributions()  # top-level import name -> distributions
    names = sorted(p.stem for p in BENCH.glob("*.py"))
    assert names, f"no scripts found under {BENCH}"
    clash = {n: installed.get(n, ["the standard library"]) for n in names
             if n in installed or n in sys.stdlib_module_names}
    assert not clash, f"tools/bench modules shadow these packages (rename the scripts): {clash}"
