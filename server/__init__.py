"""The serving side: runtime engines, the generation loop, and (later) the gRPC service."""

from server.local import generate

__all__ = ["generate"]
