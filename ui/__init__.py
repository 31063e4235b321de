"""The browser page over the gRPC services (`tav-ui`): a Gradio app built on the clients library, holding no
model. Needs the `ui` extra (`pip install .[ui]`)."""
