"""CPU threads that behave on a shared machine.

torch's CPU wheels run intra-op work on an OpenMP pool (GNU libgomp). A libgomp thread
that waits, at the barrier closing a parallel region or for the next region, first spins
for GOMP_SPINCOUNT iterations before it sleeps: 300,000 by default, ~5 ms on the 2-core
test machine. On free cores that is harmless. When another process holds a core, the
thread a barrier waits for sits in the run queue while its partner spins on the core it
needs, so each of the thousands of small parallel regions of a step (MKL matmuls) can cost
those 5 ms: with one busy process beside it, quickstart SFT steps went from 0.2 s to 15 s.

``configure_env`` bounds the spin at 3,000 iterations (~50 us there): long enough that
back-to-back regions on idle cores find the thread still awake, short enough that a waiting
thread soon gives up a core the machine needs. Measured on the quickstart (--short, 2 cores):
no spin (OMP_WAIT_POLICY=PASSIVE) cost ~40% idle; 1,000 cost ~15% idle; 10,000 was still
4x slower than idle beside one busy process. The runtime reads the variable once, when it
loads (``import torch``), so this must run before that: ``miles_fsdp.cli`` calls it first,
and processes it starts inherit it. ``fit_torch_threads`` caps torch's thread count by a
container's CPU quota, which torch does not read (it does read the affinity mask).

Both only fill in defaults: what the user set (OMP_WAIT_POLICY, GOMP_SPINCOUNT,
KMP_BLOCKTIME, OMP_NUM_THREADS, ``--threads``) is kept. The thread count is not chosen from
the current load: it changes float summation order, so one seed would give different runs.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

WAIT_DEFAULTS = {
    "GOMP_SPINCOUNT": "3000",  # libgomp (torch's Linux wheels): spins before sleeping, default 300000
    "KMP_BLOCKTIME": "1",  # LLVM/Intel OpenMP (macOS wheels, Intel builds): ms before sleeping, default 200
}
_USER_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # torch takes its count from these


def configure_env(environ=os.environ) -> dict[str, str]:
    """Default the OpenMP wait settings in `environ`; returns what it set. Call before `import torch`."""
    if "OMP_WAIT_POLICY" in environ:
        return {}  # the user chose a policy; a spin count would override it
    added = {k: v for k, v in WAIT_DEFAULTS.items() if k not in environ}
    environ.update(added)
    return added


def available_cpus() -> int:
    """Cores this process may use: its affinity mask, capped by a cgroup CPU quota."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(n, math.ceil(quota))) if quota else n


def fit_torch_threads() -> int:
    """Cap torch's intra-op threads at available_cpus() unless the user set a count; returns it."""
    import torch

    if not any(v in os.environ for v in _USER_THREAD_VARS) and torch.get_num_threads() > available_cpus():
        torch.set_num_threads(available_cpus())
    return torch.get_num_threads()


def _cgroup_quota() -> float | None:
    """CPUs allowed by a cgroup v2 (cpu.max) or v1 (cfs quota) limit; None when unlimited."""
    root = Path("/sys/fs/cgroup")
    try:
        quota, period = (root / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        return None if quota <= 0 else quota / int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
