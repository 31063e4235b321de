"""Optional bearer-token auth: a server interceptor that answers UNAUTHENTICATED unless the call carries
`authorization: Bearer <token>` with one of the configured tokens. The health service stays open, so load
balancers and Kubernetes probes need no token.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def read_tokens(path: str | Path) -> list[str]:
    """The tokens of a token file: one per non-empty line (several allow rotation without downtime)."""
    tokens = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not tokens:
        raise ValueError(f"token file {path} holds no token")
    return tokens


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: list[str]) -> None:
        self._tokens = [token.encode() for token in tokens]

    def _authorized(self, metadata: tuple | None) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                scheme, _, token = str(value).partition(" ")
                given = token.strip().encode()
                # compare with every token (no early exit) so the time taken says nothing about them
                matches = [hmac.compare_digest(given, known) for known in self._tokens]
                return scheme.lower() == "bearer" and any(matches)
        return False

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if (handler is None or handler_call_details.method.startswith(OPEN_PREFIXES)
                or self._authorized(handler_call_details.invocation_metadata)):
            return handler
        return _denied(handler)


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""

    async def deny(request, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or wrong bearer token (send metadata 'authorization: Bearer <token>')")

    if handler.request_streaming and handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        make = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        make = grpc.unary_stream_rpc_method_handler
    else:
        make = grpc.unary_unary_rpc_method_handler
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
