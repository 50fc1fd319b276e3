"""The GPU's SM clock and power draw while a benchmark runs, sampled by nvidia-smi.

An H200 at its 700 W cap clocks down under load: a 16k trainer step ran at a mean SM clock of
1,758 MHz (max 1,980) while the transformers peer ran at 1,911 (2026-12-04), so the same kernels
time 3-11% apart between calls and runs. A row's mean clock says how much of a difference is
the clock's.

    with ClockSampler() as clock:
        ...timed work...
    clock.result  # {"sm_mhz": mean, "sm_mhz_min": ..., "sm_mhz_max": ..., "power_w": mean, "samples": n} or None

None where there is no CUDA device, no nvidia-smi, or no sample came back (the work took less
than a period, or nvidia-smi failed): the benchmark runs the same, its table shows "-".
"""

from __future__ import annotations

import shutil
import subprocess

import torch

QUERY = "clocks.sm,power.draw"


def parse(text: str) -> dict | None:
    """nvidia-smi's `--format=csv,noheader,nounits` lines of QUERY ("1755, 613.05") as the mean,
    min and max SM clock (MHz), the mean power (W) and the sample count; lines that are not two
    numbers ([N/A], errors) are skipped. None without a sample."""
    clocks, powers = [], []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2:
            continue
        try:
            clock, power = float(parts[0]), float(parts[1])
        except ValueError:
            continue
        clocks.append(clock)
        powers.append(power)
    if not clocks:
        return None
    return {"sm_mhz": sum(clocks) / len(clocks), "sm_mhz_min": min(clocks), "sm_mhz_max": max(clocks),
            "power_w": sum(powers) / len(powers), "samples": len(clocks)}


def _device_id() -> str | None:
    """nvidia-smi's -i for torch's current CUDA device (its UUID), or None where torch does not
    give one (then nvidia-smi would sample every GPU: no sampling)."""
    uuid = str(getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "uuid", "") or "")
    if not uuid:
        return None
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


class ClockSampler:
    """nvidia-smi sampling every period_ms while the block runs; `result` after it (see parse)."""

    def __init__(self, period_ms: int = 100):
        self.period_ms = period_ms
        self.result: dict | None = None
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "ClockSampler":
        smi = shutil.which("nvidia-smi")
        device = _device_id() if smi and torch.cuda.is_available() else None
        if device is not None:
            self._proc = subprocess.Popen(
                [smi, "-i", device, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "-lms", str(self.period_ms)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            out, _ = self._proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            out, _ = self._proc.communicate()
        self.result = parse(out)
