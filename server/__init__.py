"""The serving side: runtime engines, the generation loop, and the gRPC service."""

import os

# Before torch loads: idle OpenMP workers sleep rather than spin (on shared CPUs spinning made UNet calls 5-20x
# slower, measured on 2 cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from server.local import generate

__all__ = ["generate"]
