import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench"


@pytest.fixture
def bench_script():
    """Load tools/bench/NAME.py as a module of its own name (bench_NAME), with tools/bench on the
    path for its imports: a bare `import train` could find another test's module of that name."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(BENCH))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(BENCH))
        return module

    return load


@pytest.fixture
def bench_refusal(bench_script, monkeypatch):
    """Run tools/bench/NAME.py's main() with `--out x.json` and args; the message it exits with."""

    def run(name: str, *args: str) -> str:
        mod = bench_script(name)
        monkeypatch.setattr(sys, "argv", [f"{name}.py", "--out", "x.json", *args])
        with pytest.raises(SystemExit) as e:
            mod.main()
        return str(e.value)

    return run
