# fast mode with every linear forced to the invariant kernel (an experiment, not shipped)
import runpy, sys
sys.path.insert(0, "tools/bench")
import miles_kernels._fast_pick as f
f.ours = lambda *a, **k: True
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("tools/bench/train.py", run_name="__main__")
