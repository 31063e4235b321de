"""The OpenMP settings every tuning process runs with (`tav-tune`, `tav-tune-worker`, the server's local worker),
in one place, and the cores it may use.

OpenMP reads its settings once, when torch loads, so they must be in the environment before that: the two
commands set them here before they import anything else (this module and the `tuner` package import no torch);
the server sets them in its environment before it spawns its local worker. `tav-bench threads` measured the
choices (benchmarks/README.md); docs/ARCHITECTURE.md, "Runtime details", says why this one.
"""

from __future__ import annotations

import math
import os
from collections.abc import MutableMapping
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
# The choice of `tav-bench threads` on 2 shared cores: idle OpenMP threads sleep at once. Any spin (OpenMP's
# default of ~300k, or 10000) made a step 2-8x slower beside one busy process, and 3-10x slower than passive under
# the machine's ordinary load; passive kept its speed beside the busy process (x1.1). A short spin (3000) did as
# well in one round and worse in others; one thread fewer than the cores doubled the step beside the busy process.
OPENMP = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None}  # None: unset (a value inherited is dropped)


def tuning_environment(environ: MutableMapping[str, str] = os.environ) -> None:
    """Put the tuning processes' OpenMP settings into `environ` (this process's, by default): the wait policy
    `OPENMP` (replacing what a parent set, such as the server's), and `OMP_NUM_THREADS` from `cpu_budget` where
    the operator has not set it."""
    for name, value in OPENMP.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    environ.setdefault("OMP_NUM_THREADS", str(cpu_budget()))


def tav_tune() -> None:
    """`tav-tune`, with the tuning processes' OpenMP settings."""
    tuning_environment()
    from tuner.tune import main

    main()


def tav_tune_worker() -> None:
    """`tav-tune-worker`, with the tuning processes' OpenMP settings."""
    tuning_environment()
    from jobs.celery_worker import main

    main()


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
