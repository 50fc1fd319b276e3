#!/usr/bin/env bash
# All GPU checks and benchmarks in one go, for a CUDA machine (one device is enough):
#   bash tools/gpu_checks.sh OUT_DIR [quick]
# Runs tests/gpu (kernel invariance, engine on-policy with CUDA graphs) and the benchmarks
# of tools/bench, writing logs and JSON under OUT_DIR. Needs torch + triton; the project is
# used from the source tree (no install), so it also runs on air-gapped images.
set -uo pipefail
out=${1:?usage: tools/gpu_checks.sh OUT_DIR [quick]}
quick=${2:-}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/device.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$out/device.txt"
status=0
run() {  # name, command...
    local name=$1; shift
    echo "=== $name: $*"
    local t0=$SECONDS
    "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "    rc=$rc in $((SECONDS - t0))s"; tail -n 25 "$out/$name.log"
    [ $rc -eq 0 ] || status=1
}
run gpu_tests python3 -m pytest -q -o addopts="" -o timeout=150 tests/gpu
q=""; [ -n "$quick" ] && q="--quick"
run bench_kernels python3 tools/bench/kernels.py --out "$out/kernels.json" $q
run bench_engine python3 tools/bench/engine.py --out "$out/engine.json" $q
run bench_engine_host python3 tools/bench/engine_host.py --out "$out/engine_host.json"
run bench_train python3 tools/bench/train.py --logprobs fused unfused --out "$out/train.json"
run bench_rl_step python3 tools/bench/rl_step.py --out "$out/rl_step.json"
exit $status
