"""tools/gpu_checks.sh's budget and tar (GPU_CHECKS_BUDGET, GPU_CHECKS_TAR): runs that would start
too late are skipped and listed, OUT_DIR is tarred as it stands, and bad settings are refused with a
message naming the variable. No step runs here (each needs a GPU)."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools/gpu_checks.sh"


def _run(out: Path, *steps: str, **env):
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])  # python3: this one
    return subprocess.run(["bash", str(SCRIPT), str(out), *steps], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": path, **env})


def test_spent_budget_skips_every_run_and_tars_what_there_is(tmp_path):
    out, tgz = tmp_path / "r1", tmp_path / "r1.tgz"
    proc = _run(out, "kernels", "engine", GPU_CHECKS_BUDGET="0", GPU_CHECKS_TAR=str(tgz))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "bench_kernels: skipped" in proc.stdout and "bench_engine: skipped" in proc.stdout
    assert (out / "skipped.txt").read_text().split() == ["bench_kernels", "bench_engine"]
    assert not (out / "kernels.json").exists()
    with tarfile.open(tgz) as t:
        names = set(t.getnames())
    assert {"r1/skipped.txt", "r1/device.txt"} <= names, names


def test_bad_budget_or_tar_inside_out_dir_is_refused(tmp_path):
    out = tmp_path / "r2"
    proc = _run(out, "kernels", GPU_CHECKS_BUDGET="ten")
    assert proc.returncode == 2 and "GPU_CHECKS_BUDGET=ten: give whole seconds" in proc.stdout
    proc = _run(out, "kernels", GPU_CHECKS_TAR=str(out / "r2.tgz"))
    assert proc.returncode == 2 and "lies inside OUT_DIR" in proc.stdout
    assert not (out / "r2.tgz").exists() and not (out / "device.txt").exists()


def test_run_past_the_budget_is_killed_and_its_log_tarred(tmp_path):
    """A step that hangs (here a python3 that sleeps) is killed 5 s before GPU_CHECKS_BUDGET ends,
    listed in killed.txt, and its log is in the tar: a lent machine's call limit never takes the
    whole OUT_DIR with it."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").write_text(f'#!/bin/sh\nif [ "$1" = "-c" ]; then exec {sys.executable} "$@"; fi\n'
                                  'echo started; exec sleep 120\n')
    (shim / "python3").chmod(0o755)
    out, tgz = tmp_path / "r3", tmp_path / "r3.tgz"
    proc = _run(out, "kernels", "engine", GPU_CHECKS_BUDGET="36", GPU_CHECKS_TAR=str(tgz),
                PATH=os.pathsep.join([str(shim), os.environ.get("PATH", "")]))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (out / "killed.txt").read_text().split() == ["bench_kernels"]
    assert (out / "skipped.txt").read_text().split() == ["bench_engine"]
    with tarfile.open(tgz) as t:
        log = t.extractfile("r3/bench_kernels.log").read().decode()
    assert log.startswith("started") and "GPU_CHECKS_BUDGET=36s ran out" in log


def test_tests_step_runs_a_process_a_file_at_once(tmp_path):
    """`tests`: every tests/gpu file but the at-scale one in its own pytest process, all started
    together, a log each; one file failing fails the step, the others still run."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").write_text(f'#!/bin/sh\nif [ "$1" = "-c" ]; then exec {sys.executable} "$@"; fi\n'
                                  'for a in "$@"; do last=$a; done\necho "ran $last"; sleep 2\n'
                                  'case "$last" in *test_optim_gpu.py) exit 1 ;; esac\n')
    (shim / "python3").chmod(0o755)
    out, tgz = tmp_path / "r4", tmp_path / "r4.tgz"
    proc = _run(out, "tests", GPU_CHECKS_TAR=str(tgz), PATH=os.pathsep.join([str(shim), os.environ.get("PATH", "")]))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    files = sorted(p.name for p in (ROOT / "tests/gpu").glob("test_*.py") if "at_scale" not in p.name)
    assert len(files) >= 5
    for f in files:
        log = (out / f"gpu_tests_{f[:-3]}.log").read_text()
        assert log.startswith(f"ran tests/gpu/{f}"), log
    assert not list(out.glob(".*.rc"))
    with tarfile.open(tgz) as t:  # one tar after them all
        assert {f"r4/gpu_tests_{f[:-3]}.log" for f in files} <= set(t.getnames())


def test_scale_step_keeps_logs_and_metrics_not_checkpoints(tmp_path):
    """`scale`: the runs' checkpoints (tens of MB with the real vocabulary) stay out of OUT_DIR, so
    the tar fits what a lent machine sends back; the workers' logs, metrics and errors are copied in."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").write_text(
        f'#!/bin/sh\ncase "$1" in -c|*.py) exec {sys.executable} "$@" ;; esac\n'  # the points' summary runs
        'while [ $# -gt 0 ]; do [ "$1" = "--basetemp" ] && base=$2; shift; done\n'
        'mkdir -p "$base/scale0/dense" "$base/scale0/moe_T1.0_k1_p0.9"\n'
        'echo w0 > "$base/scale0/worker0.log"; echo "{}" > "$base/scale0/moe_T1.0_k1_p0.9/metrics.jsonl"\n'
        'echo boom > "$base/scale0/moe_T1.0_k1_p0.9/error.txt"; head -c 4096 /dev/zero > "$base/scale0/dense/w.bin"\n'
        'echo "$base" > "$TMPDIR/base.txt"\n')
    (shim / "python3").chmod(0o755)
    out, tgz = tmp_path / "r5", tmp_path / "r5.tgz"
    proc = _run(out, "scale", GPU_CHECKS_TAR=str(tgz), TMPDIR=str(tmp_path),
                PATH=os.pathsep.join([str(shim), os.environ.get("PATH", "")]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "scale0/worker0.log").read_text() == "w0\n"
    assert (out / "scale0/moe_T1.0_k1_p0.9/error.txt").read_text() == "boom\n"
    assert (out / "scale0/moe_T1.0_k1_p0.9/metrics.jsonl").exists()
    assert not list(out.rglob("w.bin"))
    points = (out / "scale_points.txt").read_text()  # each point's verdict from the copied metrics
    assert "moe_T1.0_k1_p0.9         FAILED: boom" in points and points.endswith("0 of 36 points passed\n")
    assert not Path((tmp_path / "base.txt").read_text().strip()).exists()  # the run's temp dir is removed
    with tarfile.open(tgz) as t:
        assert "r5/scale0/worker0.log" in t.getnames()


def test_pdlrows_step_runs_the_tests_then_each_limit_by_turns(tmp_path):
    """The pdlrows step's runs, in order (all skipped here: a spent budget)."""
    out = tmp_path / "r4"
    proc = _run(out, "pdlrows", GPU_CHECKS_BUDGET="0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (out / "skipped.txt").read_text().split() == [
        "pdl_tests", "step_pdlrows_641", "step_pdlrows_norm641", "step_pdlrows_all1", "step_pdlrows_off1",
        "step_pdlrows_642", "step_pdlrows_norm642", "step_pdlrows_all2", "step_pdlrows_off2", "engine_pdlrows_64",
        "engine_pdlrows_norm64", "engine_pdlrows_all", "engine_pdlrows_off"]
