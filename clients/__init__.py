"""Python client library and CLI (`tav-client`) for the Tune-A-Video gRPC server; needs only the stubs."""

from clients.client import AsyncClient, Client, Model, ModelList, ServerError, TuneJob, Video

__all__ = ["AsyncClient", "Client", "Model", "ModelList", "ServerError", "TuneJob", "Video"]
