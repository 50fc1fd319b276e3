"""Peak extra host memory of a weight sync into the in-process engine: streamed buckets (what
the RL loop does) vs every bucket merged into one state dict first (what it did before).

    python tools/bench/weight_sync.py --out weight_sync.json         # CPU, a Qwen3-0.6B shape
    python tools/bench/weight_sync.py --model small --buckets 16 64  # quicker

The trainer (FSDP2, one process) holds fp32 masters; the engine a replica in the sync dtype.
A sampler thread reads the process RSS every millisecond during the sync; "extra" is its
peak minus the RSS before the sync. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import MODELS  # noqa: E402  (the trainer benchmark's model shapes)

from miles_fsdp.engine.config import EngineConfig  # noqa: E402
from miles_fsdp.engine.engine import Engine  # noqa: E402
from miles_fsdp.models import ModelArgs, Transformer  # noqa: E402
from miles_fsdp.train.optim import OptimConfig  # noqa: E402
from miles_fsdp.train.trainer import Trainer, TrainerConfig  # noqa: E402
from miles_fsdp.train.weight_sync import PolicyWeights  # noqa: E402


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra(fn) -> tuple[int, float]:
    """(peak RSS during fn minus RSS before, seconds)."""
    base, peak, done = rss(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    t = threading.Thread(target=watch)
    t.start()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    done.set()
    t.join()
    return max(peak[0], rss()) - base, dt


class Merged:
    """The old way: gather every bucket into one dict, then hand the engine the whole of it."""

    def __init__(self, weights: PolicyWeights):
        self.weights = weights

    def keys(self):
        self._all = {k: v for b in self.weights.buckets() for k, v in b.items()}
        return self._all.keys()

    def __getitem__(self, k):
        return self._all[k]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="qwen3-0.6b")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--buckets", type=int, nargs="+", default=[16, 64, 256], help="bucket sizes in MiB")
    p.add_argument("--out", default="")
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    args = ModelArgs.from_hf(MODELS[a.model])
    with torch.device("meta"):
        policy = Transformer(args)
    policy.init_weights(seed=0)
    trainer = Trainer(policy, TrainerConfig(optim=OptimConfig(lr=1e-6)))
    with torch.device("meta"):
        replica = Transformer(args)
    replica.init_weights(seed=1)
    engine = Engine(replica.to(dtype).eval(), None, EngineConfig(kv_memory_bytes=1 << 24, cuda_graphs=False),
                    eos_token_ids=[])
    model_bytes = sum(p.numel() * p.element_size() for p in replica.parameters())
    rows = []
    for mib in a.buckets:
        weights = PolicyWeights(trainer.model, dtype, bucket_bytes=mib << 20)
        for way, src in (("streamed", weights), ("merged", Merged(weights))):
            extra, dt = peak_extra(lambda: engine.update_weights(src, version=1))
            rows.append(dict(bucket_mib=mib, way=way, extra_mib=extra / 2**20, seconds=dt))
    print(f"{a.model}, {a.dtype} weights {model_bytes / 2**20:.0f} MiB; peak extra RSS during the sync")
    print(f"{'bucket MiB':>10} {'streamed MiB':>13} {'merged MiB':>11}")
    for mib in a.buckets:
        s, m = (next(r for r in rows if r["bucket_mib"] == mib and r["way"] == w) for w in ("streamed", "merged"))
        print(f"{mib:>10} {s['extra_mib']:>13.0f} {m['extra_mib']:>11.0f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "device": "cpu", "model": a.model, "dtype": a.dtype,
                       "model_mib": model_bytes / 2**20, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
