"""The server's two interceptors. Both replace a method's handler with one of the same kind, so they share
`_like`.

- `MalformedRequestInterceptor`: bytes that do not parse as the method's request message get INVALID_ARGUMENT
  naming the request (grpcio alone answers UNKNOWN, as if the server had failed).
- `BearerTokenInterceptor` (optional auth): UNAUTHENTICATED unless the call carries
  `authorization: Bearer <token>` with one of the configured tokens. The health service stays open, so load
  balancers and Kubernetes probes need no token.
"""

from __future__ import annotations

import contextlib
import hmac
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def read_tokens(path: str | Path) -> list[str]:
    """The tokens of a token file: one per non-empty line (several allow rotation without downtime)."""
    tokens = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not tokens:
        raise ValueError(f"token file {path} holds no token")
    return tokens


def _like(handler: grpc.RpcMethodHandler, behaviour: Callable, request_deserializer: Callable | None
          ) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` running `behaviour`."""
    if handler.request_streaming and handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        make = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        make = grpc.unary_stream_rpc_method_handler
    else:
        make = grpc.unary_unary_rpc_method_handler
    return make(behaviour, request_deserializer=request_deserializer,
                response_serializer=handler.response_serializer)


@dataclass(frozen=True)
class _Malformed:
    error: str


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Parse failures of single-message requests become INVALID_ARGUMENT; everything else passes unchanged."""

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        inner = handler.unary_stream if handler.response_streaming else handler.unary_unary
        parse = handler.request_deserializer
        rpc = handler_call_details.method.rsplit("/", 1)[-1]

        def deserialize(data: bytes):
            try:
                return parse(data)
            except Exception as e:  # noqa: BLE001 - any parser refusal is the client's malformed message
                return _Malformed(f"{type(e).__name__}: {e}")

        async def reject(request: _Malformed, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request: not a valid {rpc} request message ({request.error})")

        # grpc.aio runs a behaviour by its kind (coroutine or async generator function), so keep the kind
        if inspect.isasyncgenfunction(inner):
            async def behaviour(request, context):
                if isinstance(request, _Malformed):
                    await reject(request, context)
                async with contextlib.aclosing(inner(request, context)) as responses:
                    async for response in responses:
                        yield response
        elif inspect.iscoroutinefunction(inner):
            async def behaviour(request, context):
                if isinstance(request, _Malformed):
                    await reject(request, context)
                return await inner(request, context)
        else:
            return handler
        return _like(handler, behaviour, deserialize)


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

        async def deny(request, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong bearer token (send metadata 'authorization: Bearer <token>')")

        return _like(handler, deny, handler.request_deserializer)
