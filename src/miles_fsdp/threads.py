"""CPU threads that behave on a shared machine.

torch's CPU wheels run intra-op work on an OpenMP pool (GNU libgomp). A libgomp thread
that waits, at the barrier closing a parallel region or for the next region, first spins
for GOMP_SPINCOUNT iterations (300,000 by default: milliseconds) before it sleeps. On free
cores that is harmless. When another process holds a core, the thread a barrier waits for
sits in the run queue while its partner spins on the core it needs, so each of the many
small parallel regions of a step costs a scheduler time slice: on a 2-core machine with
one busy process, quickstart SFT steps went from 0.2 s to 15 s.

``configure_env`` therefore bounds the spin (``GOMP_SPINCOUNT``, about 0.2 ms here):
long enough to keep back-to-back regions fast on idle cores, short enough that a waiting
thread gives its core up when the machine is busy. OMP_WAIT_POLICY=PASSIVE (no spin) was
measured too and cost ~25% idle. The runtime reads the variable once, when it loads
(``import torch``), so this must run before that: ``miles_fsdp.cli`` calls it first, and
worker processes inherit it. ``fit_torch_threads`` then caps torch's thread count by a
container's CPU quota, which torch does not read (it does read the affinity mask).

Both only fill in defaults: a value the user set (OMP_WAIT_POLICY, GOMP_SPINCOUNT,
OMP_NUM_THREADS, ``--threads``) is kept. The thread count is not chosen from the current
load: it changes the float summation order, so the same seed would give a different run.
"""

from __future__ import annotations

import math
import os

SPIN_COUNT = "10000"
"""libgomp spin iterations before a waiting thread sleeps (its default: 300000)."""

_USER_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCH_NUM_THREADS")


def configure_env(environ=os.environ) -> dict[str, str]:
    """Default the OpenMP wait settings in `environ`; returns what it set. Call before `import torch`."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return {}  # the user chose a policy
    environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return {"GOMP_SPINCOUNT": SPIN_COUNT}


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
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read())
        return None if quota <= 0 else quota / int(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read())
    except (OSError, ValueError):
        return None
