"""The studies of `tav-bench`, one module each; `cli.py` is the command."""

import os

# Before torch loads: idle OpenMP workers sleep rather than spin (spinning made calls 5-20x slower on shared CPUs).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

