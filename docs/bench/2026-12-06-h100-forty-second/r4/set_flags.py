"""python .devsteps42_set.py TMA(0/1) AHEAD(0/1) SCRIPT ARGS...: decode K/V by TMA and PAGE_AHEAD set, then SCRIPT (runpy)."""
import runpy
import sys

from miles_kernels._triton import paged_attention as A

A.PAGED_KV_TMA = {"prefill": True, "decode": sys.argv[1] == "1"}
A.PAGE_AHEAD = sys.argv[2] == "1"
print("set: PAGED_KV_TMA", A.PAGED_KV_TMA, "PAGE_AHEAD", A.PAGE_AHEAD, flush=True)
sys.argv = sys.argv[3:]
sys.path.insert(0, "tools/bench")
runpy.run_path(sys.argv[0], run_name="__main__")
