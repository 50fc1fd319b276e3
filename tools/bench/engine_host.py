"""Host (Python) work per engine decode step, with the model and GPU taken out.

On the GPU the decode step is a graph replay plus host work: scheduling, filling the graph's
input buffer, the sampler's launches and its one copy out, and postprocessing (append, stop
checks, step outputs). Without overlap scheduling the GPU waits for all of it; with it
(the default) it runs while the GPU computes the next step, and must stay shorter than that.
This measures that host work on any machine: a tiny model prefills real requests, then
decode steps run through the real scheduler, the real graph-input fill (DecodeGraphs
without capture, the model faked) and the real sampler on small logits.

    python tools/bench/engine_host.py --batch 64,256 --out engine_host.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import miles_kernels as mk
import torch

sys.path.insert(0, os.path.dirname(__file__))
from engine import build, prompts  # noqa: E402

from miles_fsdp.engine import Engine, EngineConfig  # noqa: E402
from miles_fsdp.engine.cuda_graph import DecodeGraphs, batch_buckets  # noqa: E402
from miles_fsdp.engine.sequence import Request, SamplingParams  # noqa: E402

VOCAB_OUT = 32  # logits width the fake replay returns: keeps the sampler's tensor math tiny


def fake_graphs(max_batch: int, max_pages: int) -> DecodeGraphs:
    """The real DecodeGraphs (buffers, padding, upload) on CPU without capture; its forward
    returns zero logits instead of running the model."""
    zeros = torch.zeros(batch_buckets(max_batch)[-1], VOCAB_OUT)
    return DecodeGraphs(lambda ids, *_: (zeros[: ids.shape[0]],), None, max_batch, max_pages, torch.device("cpu"),
                        capture=False)


def _timed(obj, name: str, acc: dict) -> None:
    fn = getattr(obj, name)

    def timed(*a, **k):
        t = time.perf_counter()
        out = fn(*a, **k)
        acc[name] += time.perf_counter() - t
        return out

    setattr(obj, name, timed)


def measure(batch: int, new: int = 128, plen: int = 128) -> dict:
    model = build("tiny", "cpu").float()
    with mk.use_mode("fast"):
        eng = Engine(model, config=EngineConfig(page_size=64, max_model_len=4096, kv_memory_bytes=1 << 28,
                                                max_num_seqs=max(256, batch)), kernel_mode="fast")
        params = SamplingParams(temperature=1.0, max_new_tokens=new, ignore_eos=True, seed=0)
        for ids in prompts(batch, plen, model.args.vocab_size, seed=0):
            eng.add_request(Request(ids, params))
        while eng.scheduler.waiting or any(q.num_uncomputed > 1 for q in eng.scheduler.running):
            eng.step()  # prefill with the real model
        eng.runner.graphs = fake_graphs(max(256, batch), eng.runner.max_pages_per_seq)
        acc: dict[str, float] = collections.defaultdict(float)
        for obj, name in ((eng.scheduler, "schedule"), (eng.runner, "logits"), (eng.runner, "sample_launch"),
                          (eng.scheduler, "postprocess"), (eng, "step")):
            _timed(obj, name, acc)
        steps = 0
        while eng.has_unfinished():
            eng.step()
            steps += 1
    ms = {k: 1e3 * v / steps for k, v in acc.items()}
    return dict(batch=batch, steps=steps, step_ms=ms.pop("step"), schedule_ms=ms["schedule"],
                fill_inputs_ms=ms["logits"], sample_ms=ms["sample_launch"], postprocess_ms=ms["postprocess"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="64,256", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=3, help="runs per batch size; the fastest is kept")
    ap.add_argument("--out", default="engine_host.json", help="JSON results file")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for b in map(int, a.batch.split(",")):
        rows.append(min((measure(b) for _ in range(a.repeats)), key=lambda r: r["step_ms"]))
    cols = ["batch", "step_ms", "schedule_ms", "fill_inputs_ms", "sample_ms", "postprocess_ms"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    with open(a.out, "w") as f:
        json.dump(dict(device="cpu", torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
