"""The exporter: a tuned model directory -> engines (ONNX Runtime, TensorRT, AOTInductor) in a shared store."""

import os

# Before torch loads: idle OpenMP workers sleep rather than spin; torch and ONNX Runtime share the cores here
# (the graph checks), where spinning made calls 5-20x slower (docs/ARCHITECTURE.md, "Runtime details").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
