"""GPU: true on-policy through the real loop (`run_rl`) at the scale users run.

Every (temperature, top-k, top-p) in {0.6, 1.0, 1.3} x {0, 1, 20} x {1.0, 0.9}, for a dense
Qwen3 and a Qwen3-MoE (64 experts, top-8), both with the real 151,936-token vocabulary and
checkpoints written by transformers: 32 prompts x 8 samples = 256 rows per decode step,
512 new tokens, prompts longer than the prefill budget (chunked prefill), a KV cache too small
for the batch (preemption), bf16, decode from CUDA graphs (capture failure is an error), 3 RL
steps each. Asserted: train/logprob_abs_diff_max == 0.0 on every step, no NaN or inf in any
metric, no skipped optimizer step, graphs active, preemptions happened, responses long.

The model is narrow (hidden 128, 2 layers) so that 36 runs x 3 steps fit in a few minutes:
the vocabulary, the row count and the sequence lengths are what broke before, not the width.
Runs are spread over a few worker processes sharing the GPU (tests/gpu/scale_worker.py).

    python -m pytest -q tests/gpu/test_on_policy_at_scale.py
    python tests/gpu/test_on_policy_at_scale.py --points DIR   # each point's verdict from copied runs
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.timeout(900)]

VOCAB = 151_936
SIZE = dict(steps=3, prompts=32, n=8, max_new_tokens=512, max_prefill_tokens=128,
            kv_pages=8192)  # 16-token pages: 131k tokens of KV for 256 x ~800 tokens -> preemption
GRID = list(itertools.product((0.6, 1.0, 1.3), (0, 1, 20), (1.0, 0.9)))
WORKERS = 9  # 36 runs, 4 per worker: ~5 min on one H200 (3 workers ran 3 runs in 110 s)
WORKER_GIB = 12  # a worker's peak (H100, 2026-12-05: up to 11.4 GiB); 9 of them ran out of memory on 80 GB
MODEL = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=2048)
MOE = dict(num_experts=64, num_experts_per_tok=8, moe_intermediate_size=64)

REWARD = """
def reward(sample):
    # a dense signal (share of even token ids): groups get distinct rewards, so every step trains
    ids = sample.response_ids
    return sum(t % 2 == 0 for t in ids) / max(len(ids), 1)
"""


def _write_inputs(root: Path) -> dict[str, str]:
    from miles_fsdp.models.testing import build_tiny_checkpoint

    models = {"dense": str(build_tiny_checkpoint(root / "dense", "qwen3", seed=1, **MODEL)),
              "moe": str(build_tiny_checkpoint(root / "moe", "qwen3_moe", seed=2, **MODEL, **MOE))}
    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "sigma"]
    with open(root / "data.jsonl", "w") as f:
        for i in range(SIZE["prompts"] * SIZE["steps"]):
            n = 30 + int(torch.randint(0, 20, (1,), generator=g))  # ~200-300 byte tokens > max_prefill_tokens
            text = " ".join(words[int(j)] for j in torch.randint(0, len(words), (n,), generator=g))
            f.write(json.dumps({"prompt": f"{i}: {text}", "label": "x"}) + "\n")
    (root / "reward.py").write_text(REWARD)
    return models


def _workers(free_bytes: int) -> int:
    """As many workers as the free GPU memory holds, at most WORKERS (fewer only take longer)."""
    return max(1, min(WORKERS, free_bytes // (WORKER_GIB << 30)))


def _name(arch: str, t: float, k: int, p: float) -> str:
    return f"{arch}_T{t}_k{k}_p{p}"


@pytest.fixture(scope="module")
def results(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("scale")
    models = _write_inputs(root)
    # only the grid points selected (e.g. with -k) are run
    chosen = {item.callspec.params["arch"] + str((item.callspec.params["t"], item.callspec.params["k"],
                                                  item.callspec.params["p"]))
              for item in request.session.items if item.module is request.module}
    runs = [dict(name=_name(a, t, k, p), model=models[a], temperature=t, top_k=k, top_p=p)
            for a in ("moe", "dense") for t, k, p in GRID if a + str((t, k, p)) in chosen]
    workers = _workers(torch.cuda.mem_get_info()[0])
    threads = str(max(1, (os.cpu_count() or workers) // workers))  # workers share the host's cores
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
           "OMP_NUM_THREADS": threads}
    procs = []
    for w in range(workers):
        spec = root / f"spec{w}.json"
        spec.write_text(json.dumps(dict(root=str(root), runs=runs[w::workers], size=SIZE)))
        log = open(root / f"worker{w}.log", "w")
        procs.append((subprocess.Popen([sys.executable, str(Path(__file__).with_name("scale_worker.py")), str(spec)],
                                       stdout=log, stderr=subprocess.STDOUT, env=env), log))
    for p, log in procs:
        p.wait(timeout=900)
        log.close()
    return root, runs


def point_problems(run: Path, k: int) -> list[str]:
    """What fails at one grid point's run directory (none: it passes): the test's asserts, also read by
    `--points` from a run's copied metrics when pytest itself did not finish (a lent machine's budget)."""
    from miles_fsdp.observe.metrics import read_metrics

    err = run / "error.txt"
    if err.exists():
        return [err.read_text()[-4000:]]
    if not (run / "metrics.jsonl").is_file():
        return [f"{run.name}: no metrics.jsonl (the run did not start)"]
    rows = [r for r in read_metrics(run) if "train/loss" in r]
    out = [] if len(rows) == SIZE["steps"] else [f"{run.name}: {len(rows)} of {SIZE['steps']} training steps logged"]
    keys = ("train/logprob_abs_diff_max", "train/skipped_step", "rollout/samples", "engine/cuda_graphs_active",
            "rollout/response_len_mean", "engine/preemptions_total", "train/grad_norm")
    for r in rows:
        at = f"{run.name} step {r.get('step')}"
        if missing := [key for key in keys if key not in r]:
            out.append(f"{at}: metrics missing {missing}")
            continue
        # metrics.jsonl writes a non-finite value as the string "nan" / "inf" / "-inf"
        bad = {key: v for key, v in r.items() if v in ("nan", "inf", "-inf") or
               (isinstance(v, float) and not math.isfinite(v))}
        if bad:
            out.append(f"{at}: non-finite metrics {bad}")
        if r["train/logprob_abs_diff_max"] != 0.0:
            out.append(f"{at}: logprob_abs_diff_max {r['train/logprob_abs_diff_max']}")
        if r["train/skipped_step"] != 0.0 or r["rollout/samples"] != SIZE["prompts"] * SIZE["n"]:
            out.append(f"{at}: skipped_step {r['train/skipped_step']}, samples {r['rollout/samples']}")
        if r["engine/cuda_graphs_active"] != 1.0:
            out.append(f"{at}: CUDA graphs not active")
        if not float(r["rollout/response_len_mean"]) > 0.9 * SIZE["max_new_tokens"]:
            out.append(f"{at}: response_len_mean {r['rollout/response_len_mean']}")
    rows = [r for r in rows if all(key in r for key in keys)]  # "nan" / "inf" strings: float() reads them
    if rows and not float(rows[-1]["engine/preemptions_total"]) > 0:
        out.append(f"{run.name}: no preemption (the KV cache was meant to be too small for the batch)")
    if rows and k != 1 and not float(rows[-1]["train/grad_norm"]) > 0:  # top-k 1: a group's samples are identical
        out.append(f"{run.name}: grad_norm 0 (the policy must move, so later steps check new weights)")
    return out


@pytest.mark.parametrize("arch", ["moe", "dense"])
@pytest.mark.parametrize("t,k,p", GRID)
def test_run_rl_is_on_policy_at_scale(results, arch, t, k, p):
    root, _ = results
    problems = point_problems(root / _name(arch, t, k, p), k)
    assert not problems, "\n".join(problems)


def _points(folder: Path) -> int:
    """Each grid point's verdict from the run directories under `folder` (as gpu_checks.sh scale copies them)."""
    dirs = {d.name: d for d in folder.rglob("*_T*_k*_p*") if d.is_dir()}
    failed = 0
    for arch in ("moe", "dense"):
        for t, k, p in GRID:
            name = _name(arch, t, k, p)
            problems = point_problems(dirs[name], k) if name in dirs else [f"{name}: no run directory"]
            failed += bool(problems)
            print(f"{name:24} {'passed' if not problems else 'FAILED: ' + '; '.join(problems)[:300]}")
    print(f"{2 * len(GRID) - failed} of {2 * len(GRID)} points passed")
    return int(failed > 0)


if __name__ == "__main__":  # python tests/gpu/test_on_policy_at_scale.py --points OUT_DIR
    if len(sys.argv) != 3 or sys.argv[1] != "--points" or not Path(sys.argv[2]).is_dir():
        sys.exit("usage: python tests/gpu/test_on_policy_at_scale.py --points DIR  (DIR: the copied run directories)")
    sys.exit(_points(Path(sys.argv[2])))
