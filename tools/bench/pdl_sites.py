"""Run a bench script with PDL's row limit chosen per launch site: which kernels gain from PDL past
launch.PDL_MAX_ROWS and which lose.

    PYTHONPATH=src:kernels python tools/bench/pdl_sites.py --limits default=64 attention=all -- \\
        tools/bench/step_peer.py --shapes 128x256 --out step.json

Sites (the kernels that ask launch.gdc_rows): rms_norm, add_rms_norm, qk_norm_rope, linear (the pointer
linears), linears (q|k|v), swiglu, attention (decode attention). A limit is a row count or `all`; a site not
named keeps its shipped limit (launch.PDL_MAX_ROWS; launch.PDL_NORM_MAX_ROWS for the norms), or takes
`default` where that is given. The script runs in this process (runpy) after launch.gdc_rows is replaced.
"""

import argparse
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT / "src", ROOT / "kernels"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from miles_kernels._triton import launch  # noqa: E402

SITES = {  # (module file stem, launching function) -> site name
    ("elementwise", "rms_norm"): "rms_norm", ("elementwise", "add_rms_norm"): "add_rms_norm",
    ("elementwise", "_launch_qk_norm_rope"): "qk_norm_rope", ("matmul", "_launch_linear"): "linear",
    ("fused_linears", "linears"): "linears", ("fused_linears", "swiglu"): "swiglu",
    ("paged_attention", "_launch"): "attention",
}
NAMES = sorted(set(SITES.values()) | {"default"})


def parse_limits(items: list[str]) -> dict[str, int]:
    """The limits given ({site: rows}); a site not given keeps its shipped limit, unless `default` is given."""
    limits = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in NAMES or not (value == "all" or value.isdigit()):
            raise SystemExit(f"--limits {item!r}: give SITE=ROWS or SITE=all, SITE one of {', '.join(NAMES)}")
        limits[name] = launch.ALL_ROWS if value == "all" else int(value)
    return limits


def site_of(frame) -> str:
    """The site of a gdc_rows call from its caller's frame ("default" for a launcher not in SITES)."""
    f = frame.f_code
    return SITES.get((Path(f.co_filename).stem, f.co_name), "default")


def site_rows(limits: dict[str, int], asked: dict[str, int]):
    """A gdc_rows that applies the caller's site limit; `asked` counts the calls per site."""

    def gdc_rows(x, rows: int, limit: int | None = None) -> bool:
        site = site_of(sys._getframe(1))
        asked[site] = asked.get(site, 0) + 1
        shipped = launch.PDL_MAX_ROWS if limit is None else limit
        return x.is_cuda and rows <= limits.get(site, limits.get("default", shipped))

    return gdc_rows


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv:
        raise SystemExit("usage: pdl_sites.py --limits SITE=ROWS ... -- SCRIPT [ARGS]")
    cut = argv.index("--")
    ap = argparse.ArgumentParser()
    ap.add_argument("--limits", nargs="*", default=[], metavar="SITE=ROWS")
    args = ap.parse_args(argv[:cut])
    script = argv[cut + 1:]
    if not script:
        raise SystemExit("pdl_sites.py: name the script to run after --")
    limits, asked = parse_limits(args.limits), {}
    launch.gdc_rows = site_rows(limits, asked)
    print("pdl_sites limits (the rest as shipped):", {k: ("all" if v >= launch.ALL_ROWS else v)
                                                       for k, v in limits.items()}, flush=True)
    sys.argv = script
    try:
        runpy.run_path(script[0], run_name="__main__")
    finally:
        print("pdl_sites calls per site:", asked, flush=True)


if __name__ == "__main__":
    main()
