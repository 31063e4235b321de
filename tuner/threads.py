"""How many cores a tuning process may use, and the OpenMP settings it runs with (`tav-bench threads` measured
them; docs/ARCHITECTURE.md, "Runtime details")."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def cpu_budget(cgroup: Path = CGROUP) -> int:
    """The cores this process may use: its CPU affinity, bounded by its cgroup's CPU quota (a Kubernetes CPU
    limit; cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`), rounded up; at least 1."""
    cores = len(os.sched_getaffinity(0))
    quota = _cgroup_quota(cgroup)
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def _cgroup_quota(cgroup: Path) -> float | None:
    """The cgroup's CPU quota in cores, or None where there is none (or it cannot be read)."""
    try:
        limit, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        pass
    try:
        limit = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return None if limit <= 0 else limit / period
    except (OSError, ValueError):
        return None
