"""Worker of test_on_policy_at_scale.py: runs `run_rl` for a list of sampling settings.

    python tests/gpu/scale_worker.py SPEC.json

SPEC: {"root": dir with data.jsonl and reward.py, "runs": [{"name", "model", "temperature",
"top_k", "top_p"}, ...], "size": {...}}. Each run writes its metrics to root/<name>/metrics.jsonl
and, if run_rl raised, root/<name>/error.txt (the parent asserts on both). Several workers
share one GPU: the tiny model leaves it mostly idle, so they overlap each other's host work.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

from miles_fsdp.data.datasets import DataConfig
from miles_fsdp.engine.config import EngineConfig
from miles_fsdp.rl.config import RLConfig, RolloutConfig
from miles_fsdp.rl.loop import run_rl
from miles_fsdp.train.optim import OptimConfig
from miles_fsdp.train.trainer import TrainerConfig


def config(root: Path, run: dict, size: dict) -> RLConfig:
    return RLConfig(
        model=run["model"], run_dir=str(root / run["name"]), steps=size["steps"], export_hf=False,
        data=DataConfig(path=str(root / "data.jsonl"), prompts_per_batch=size["prompts"]),
        rollout=RolloutConfig(n_samples_per_prompt=size["n"], temperature=run["temperature"], top_k=run["top_k"],
                              top_p=run["top_p"], max_new_tokens=size["max_new_tokens"],
                              reward=f"{root}/reward.py:reward"),
        engine=EngineConfig(page_size=16, num_pages=size["kv_pages"], max_num_seqs=size["prompts"] * size["n"],
                            max_prefill_tokens=size["max_prefill_tokens"], cuda_graph_max_batch=size["prompts"] * size["n"],
                            cuda_graphs_required=True),
        trainer=TrainerConfig(optim=OptimConfig(lr=1e-3, warmup_steps=0), max_tokens_per_micro_batch=16384),
    )


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    root = Path(spec["root"])
    for run in spec["runs"]:
        t0 = time.perf_counter()
        try:
            run_rl(config(root, run, spec["size"]))
        except Exception:  # recorded for the parent, which names the setting that failed
            (root / run["name"]).mkdir(parents=True, exist_ok=True)
            (root / run["name"] / "error.txt").write_text(traceback.format_exc())
        print(f"{run['name']}: {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
