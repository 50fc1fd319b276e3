"""observe/trace_summary.py: device busy as a union of intervals, host time per thread by
top-level op, and the command's message for a file that is not a trace."""

import json
import subprocess
import sys
from pathlib import Path

from miles_fsdp.observe.trace_summary import format_summary, summarize

ROOT = Path(__file__).resolve().parents[2]


def _x(name, cat, ts, dur, tid=1):
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "tid": tid, "pid": 1}


TRACE = {"traceEvents": [
    # host, thread 1: two top-level ops, the second with a nested op that must not count twice
    _x("forward", "user_annotation", 0, 50), _x("aten::mm", "cpu_op", 10, 5),
    _x("backward", "cpu_op", 60, 100), _x("aten::mul", "cpu_op", 70, 20), _x("forward", "user_annotation", 200, 30),
    _x("AccumulateGrad", "cpu_op", 0, 7, tid=2),  # thread 2: less host time, listed second
    # device: kernels [100, 130) and [120, 150) overlap, a copy at [300, 310): busy 60 of a 210 span
    _x("k1", "kernel", 100, 30), _x("k2", "kernel", 120, 30), _x("memcpy", "gpu_memcpy", 300, 10),
    {"ph": "i", "name": "instant", "ts": 5},  # not a complete event: ignored
]}


def test_summary_counts_overlaps_once_and_top_level_ops_only():
    s = summarize(TRACE)
    assert s["device"] == {"busy_ms": 0.06, "span_ms": 0.21, "kernels": 2}
    assert [h["thread"] for h in s["host"]] == [1, 2]
    assert s["host"][0]["ops"] == [("backward", 1, 0.1), ("forward", 2, 0.08)]
    assert abs(s["host"][0]["ms"] - 0.18) < 1e-12
    text = format_summary(s)
    assert "device: busy 0.1 ms of a 0.2 ms span (29%), 2 kernels" in text
    assert "host thread 1: top-level ops 0.2 ms" in text.splitlines()[1]


def test_gaps_name_the_device_work_around_them_and_the_host_op_over_them():
    trace = {"traceEvents": TRACE["traceEvents"] + [_x("k0", "kernel", 80, 5)]}
    gaps = summarize(trace)["gaps"]
    # [150, 300) idle between k2 and the copy; the host's forward [200, 230) covers more of it than
    # backward [60, 160); then [85, 100) between k0 and k1 (k1 ends before k2: k2 is "before")
    assert gaps == [{"ms": 0.15, "at_ms": 0.07, "before": "k2", "after": "memcpy", "host": "forward"},
                    {"ms": 0.015, "at_ms": 0.005, "before": "k0", "after": "k1", "host": "backward"}]
    assert summarize(trace, gaps=1)["gaps"] == gaps[:1]
    assert "0.15 ms at     0.07: k2 -> memcpy; host: forward" in format_summary(summarize(trace))


def test_cpu_only_trace_has_no_device_line(tmp_path):
    cpu = {"traceEvents": [e for e in TRACE["traceEvents"] if e.get("cat") not in ("kernel", "gpu_memcpy")]}
    assert summarize(cpu)["device"] is None and not format_summary(summarize(cpu)).startswith("device")


def test_command_reads_a_trace_and_names_a_bad_file(tmp_path):
    good, bad = tmp_path / "t.json", tmp_path / "bad.json"
    good.write_text(json.dumps(TRACE))
    bad.write_text("{not json")
    env_cmd = [sys.executable, "-m", "miles_fsdp.observe.trace_summary"]
    ok = subprocess.run(env_cmd + [str(good)], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and "host thread 1" in ok.stdout, ok.stderr
    err = subprocess.run(env_cmd + [str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert err.returncode != 0 and f"{bad}: cannot read a Chrome trace" in err.stderr
