"""Python client library and CLI (`tav-client`) for the Tune-A-Video gRPC server; needs only the stubs."""

from clients.client import (
    AsyncClient,
    BaseList,
    BaseModel,
    Client,
    Model,
    ModelList,
    ServerError,
    ServerInfo,
    TuneJob,
    Video,
)

__all__ = ["AsyncClient", "BaseList", "BaseModel", "Client", "Model", "ModelList", "ServerError", "ServerInfo",
           "TuneJob", "Video"]
