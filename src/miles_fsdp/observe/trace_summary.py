"""Where a profiled step's time went, read off its Chrome trace: is it host- or device-bound?

    python -m miles_fsdp.observe.trace_summary RUN_DIR/profile/step_00003_rank0.json

- device: the union of the intervals of kernels, copies and memsets (busy), against the span
  from the first to the last of them; a busy time far below the span means the GPU waits;
- host, per thread: the time of the top-level ops and annotations (the autograd engine's
  backward runs on a thread of its own on CUDA), and which of them took it;
- gaps: the longest times the device sat idle inside the span, each with the device work on
  either side and the host's top-level op that covered most of it (what the GPU waited for).
StepProfiler appends this to each step's table.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

_DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
_HOST_CATS = ("cpu_op", "user_annotation")


def _union_us(intervals: list[tuple[float, float]]) -> float:
    busy, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            busy += e - max(s, end)
            end = e
    return busy


def _top_level(events: list[dict]) -> list[dict]:
    """Events not nested in an earlier one of the same thread (they are sorted by start)."""
    out, end = [], float("-inf")
    for e in events:
        if e["ts"] >= end:
            out.append(e)
            end = e["ts"] + e["dur"]
    return out


def _gaps(dev: list[dict], host_top: list[dict], n: int) -> list[dict]:
    """The n longest idle intervals between device events (by start), longest first."""
    gaps, end, last, t0 = [], float("inf"), "", min((e["ts"] for e in dev), default=0.0)
    for e in sorted(dev, key=lambda e: e["ts"]):
        if e["ts"] > end:
            gaps.append({"start": end, "end": e["ts"], "before": last, "after": e["name"]})
        if end == float("inf") or e["ts"] + e["dur"] > end:
            end, last = e["ts"] + e["dur"], e["name"]
    gaps = sorted(gaps, key=lambda g: g["start"] - g["end"])[:n]
    out = []
    for g in gaps:
        overlap = lambda h: min(g["end"], h["ts"] + h["dur"]) - max(g["start"], h["ts"])  # noqa: E731
        host = max(host_top, key=overlap, default=None)
        out.append({"ms": (g["end"] - g["start"]) / 1e3, "at_ms": (g["start"] - t0) / 1e3, "before": g["before"],
                    "after": g["after"], "host": host["name"] if host is not None and overlap(host) > 0 else ""})
    return out


def summarize(trace: dict, top: int = 8, gaps: int = 5) -> dict:
    """{"device": {...} or None, "host": [{"thread", "ms", "ops": [(name, calls, ms)]}],
    "gaps": [{"ms", "at_ms" (from the span's start), "before", "after", "host"}]}."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    dev_events = [e for e in events if e.get("cat") in _DEVICE_CATS]
    dev = [(e["ts"], e["ts"] + e["dur"]) for e in dev_events]
    device = None
    if dev:
        span = max(e for _, e in dev) - min(s for s, _ in dev)
        device = {"busy_ms": _union_us(dev) / 1e3, "span_ms": span / 1e3,
                  "kernels": sum(e.get("cat") == "kernel" for e in events)}
    threads: dict[object, list[dict]] = collections.defaultdict(list)
    for e in events:
        if e.get("cat") in _HOST_CATS:
            threads[e["tid"]].append(e)
    host, host_top = [], []
    for tid, evs in threads.items():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
        for e in _top_level(evs):
            host_top.append(e)
            by_name[e["name"]][0] += 1
            by_name[e["name"]][1] += e["dur"]
        ops = sorted(((n, int(c), us / 1e3) for n, (c, us) in by_name.items()), key=lambda r: -r[2])
        host.append({"thread": tid, "ms": sum(ms for _, _, ms in ops), "ops": ops[:top]})
    host.sort(key=lambda h: -h["ms"])
    idle = _gaps(dev_events, host_top, gaps) if dev else []
    return {"device": device, "host": host, "gaps": idle}


def format_summary(s: dict, threads: int = 3) -> str:
    lines = []
    if s["device"]:
        d = s["device"]
        lines.append(f"device: busy {d['busy_ms']:.1f} ms of a {d['span_ms']:.1f} ms span "
                     f"({100 * d['busy_ms'] / max(d['span_ms'], 1e-9):.0f}%), {d['kernels']} kernels")
    for h in s["host"][:threads]:
        lines.append(f"host thread {h['thread']}: top-level ops {h['ms']:.1f} ms")
        lines += [f"  {ms:9.2f} ms {calls:6d}x  {name[:100]}" for name, calls, ms in h["ops"]]
    if s.get("gaps"):
        lines.append("device idle, longest gaps (ms from the span's start; the device work before -> after; the host op over most of it)")
        lines += [f"  {g['ms']:9.2f} ms at {g['at_ms']:8.2f}: {g['before'][:40]} -> {g['after'][:40]}; "
                  f"host: {g['host'][:60] or '-'}" for g in s["gaps"]]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace", help="a Chrome trace written by torch.profiler (StepProfiler's .json)")
    p.add_argument("--top", type=int, default=12, help="ops listed per thread")
    p.add_argument("--threads", type=int, default=3, help="threads listed, busiest first")
    p.add_argument("--gaps", type=int, default=5, help="longest device idle gaps listed")
    a = p.parse_args()
    path = Path(a.trace)
    try:
        trace = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: cannot read a Chrome trace ({e}); pass the .json a profiled step wrote")
    print(format_summary(summarize(trace, a.top, a.gaps), a.threads))


if __name__ == "__main__":
    main()
