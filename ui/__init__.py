"""The browser page over the gRPC services (`tav-ui`): a Gradio app built on the clients library, holding no
model. Needs the `ui` extra (`pip install .[ui]`)."""

import os

# Read by Gradio (and the hub library) when they load, so set here, before `ui.app` imports them: no telemetry, no
# version check.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
