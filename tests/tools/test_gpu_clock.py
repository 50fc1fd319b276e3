"""tools/bench/gpu_clock.py: nvidia-smi's samples parsed, and the sampler's subprocess run
against a stand-in nvidia-smi (no GPU needed)."""

import os
import stat
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "bench"))

import gpu_clock  # noqa: E402


def test_parse_means_and_skips_bad_lines():
    r = gpu_clock.parse("1755, 613.05\n[N/A], [N/A]\nNo devices were found\n1905, 690.95\n\n")
    assert r == {"sm_mhz": 1830.0, "sm_mhz_min": 1755.0, "sm_mhz_max": 1905.0, "power_w": 652.0, "samples": 2}
    assert gpu_clock.parse("") is None
    assert gpu_clock.parse("Failed to initialize NVML: Unknown Error\n") is None


def test_sampler_without_gpu_gives_none(monkeypatch):
    monkeypatch.setattr(gpu_clock.torch.cuda, "is_available", lambda: False)
    with gpu_clock.ClockSampler() as clock:
        pass
    assert clock.result is None


@pytest.mark.skipif(os.name != "posix", reason="the stand-in nvidia-smi is a shell script")
def test_sampler_reads_a_stand_in_nvidia_smi(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    args = tmp_path / "args"
    smi.write_text(f'#!/bin/sh\necho "$@" > {args}\necho "1500, 600.5"\necho "1700, 650.5"\nexec sleep 60\n')
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(gpu_clock.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_clock, "_device_id", lambda: "GPU-1234")
    t = time.monotonic()
    with gpu_clock.ClockSampler(period_ms=50) as clock:
        time.sleep(0.5)  # the stand-in prints its two samples, then sleeps until terminated
    assert time.monotonic() - t < 10  # terminated, not waited out
    assert clock.result == {"sm_mhz": 1600.0, "sm_mhz_min": 1500.0, "sm_mhz_max": 1700.0, "power_w": 625.5,
                            "samples": 2}
    assert args.read_text().split() == ["-i", "GPU-1234", f"--query-gpu={gpu_clock.QUERY}",
                                        "--format=csv,noheader,nounits", "-lms", "50"]
