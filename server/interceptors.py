"""Admission: what a call may cost the server before its handler runs, decided in one interceptor.

Every call but the health service's passes `AdmissionInterceptor`, which answers, in this order:

1. **Token** (when auth is on): a call without a valid `authorization: Bearer <token>` is refused
   UNAUTHENTICATED, and a generation token calling an admin method (the Tuning service: tune jobs, model
   deletion) PERMISSION_DENIED, *before its request body is read*. grpc.aio reads a unary request before it
   calls the handler, so the interceptor hands back a request-streaming handler that aborts without reading: the
   body never leaves HTTP/2 flow control, so a caller without a token costs a few kilobytes, whatever it sends
   (measured: 16 clients sending 64 MiB requests for 60 s left the server at a peak of 511 MiB, about its idle
   size). Refusals are counted and logged at most every 10 s.
2. **Calls in flight**: at most `max_calls` admitted calls at once; past it RESOURCE_EXHAUSTED.
3. **Request bytes in flight**: a call reserves twice the largest request its method may carry while its body is
   received (the raw bytes and the parsed message coexist), then keeps twice its actual size until it ends (a
   queued clip is held as the message and as the bytes the generator reads). The total stays under
   `max_request_bytes`; a call that finds no room waits up to `receive_wait` seconds, then RESOURCE_EXHAUSTED.
4. **Parsing**: bytes that are not the method's request message get INVALID_ARGUMENT naming the request (grpcio
   alone answers UNKNOWN, as if the server had failed); a body over the message size limit gets grpc's own
   RESOURCE_EXHAUSTED.

A refusal made after the body was read ends the call without raising (`end_call`), so nothing keeps the request
alive once the call is over, and once 64 MiB of bodies were received the server's watch loop gives the memory they
leave free in the C allocator back to the system (`give_back_memory`): an idle replica's resident memory returns to
where it was, whatever it received.

Health stays open and outside every bound, so load balancers' and Kubernetes' probes are never starved. Every
refusal made here is counted in the request metric under the method's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hmac
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from server.metrics import Metrics

log = logging.getLogger(__name__)

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
ADMIN_PREFIXES = ("/tuneavideo.v1.Tuning/",)
SMALL_REQUEST_BYTES = 64 << 10  # what a request without a clip may reasonably be
AUTH_LOG_INTERVAL = 10.0  # seconds between log lines about refused tokens
TRIM_AFTER_BYTES = 64 << 20  # request bytes received by a busy server before freed memory is given back


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None under another C library."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = _malloc_trim()


def read_tokens(path: str | Path) -> list[str]:
    """The tokens of a token file: one per non-empty line (several allow rotation without downtime)."""
    tokens = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not tokens:
        raise ValueError(f"token file {path} holds no token")
    return tokens


@dataclass(frozen=True)
class Limits:
    """The admission bounds (docs/SERVER.md, "Limits")."""

    max_calls: int = 64
    max_request_bytes: int = 512 << 20
    large_requests: dict[str, int] | None = None  # full method name -> the largest request it may carry
    receive_wait: float = 10.0  # seconds a call may wait for room to receive its body


class ByteBudget:
    """Bytes reserved by calls in flight, at most `limit`; used on the event loop only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed = asyncio.Condition()

    async def reserve(self, size: int, timeout: float) -> bool:
        """Reserve `size` bytes, waiting up to `timeout` seconds for room; False if none came."""
        async with self._freed:
            try:
                await asyncio.wait_for(self._freed.wait_for(lambda: self.used + size <= self.limit), timeout)
            except asyncio.TimeoutError:
                return False
            self.used += size
            return True

    def release(self, size: int) -> None:
        self.used -= size
        asyncio.ensure_future(self._notify())

    async def _notify(self) -> None:
        async with self._freed:
            self._freed.notify_all()


class RefusalLog:
    """Log refused tokens at most once per `interval` seconds, with how many were refused since."""

    def __init__(self, interval: float = AUTH_LOG_INTERVAL) -> None:
        self.interval = interval
        self._last = -interval
        self._since = 0

    def refused(self, method: str, peer: str) -> None:
        self._since += 1
        now = time.monotonic()
        if now - self._last >= self.interval:
            log.warning("%d call(s) refused without a valid token since the last such line (latest: %s from %s)",
                        self._since, method, peer)
            self._last, self._since = now, 0


def end_call(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """Make the call end with `code` and `message` when its handler returns. Used instead of `context.abort` where
    the handler holds a large request: the exception abort raises stays referenced by grpc's call state, and its
    traceback (with any exception it was raised while handling) keeps the handlers' frames, and the request in
    them, alive in reference cycles until a full garbage collection."""
    context.set_code(code)
    context.set_details(message)


def _rpc_name(method: str) -> str:
    return method.rsplit("/", 1)[-1]


def _request_streaming_handler(handler: grpc.RpcMethodHandler, behaviour: Callable) -> grpc.RpcMethodHandler:
    """A handler that gets the request stream raw (nothing read before `behaviour` runs), answering like
    `handler`."""
    make = grpc.stream_stream_rpc_method_handler if handler.response_streaming else grpc.stream_unary_rpc_method_handler
    return make(behaviour, request_deserializer=None, response_serializer=handler.response_serializer)


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """See the module docstring."""

    def __init__(self, tokens: list[str], admin_tokens: list[str], limits: Limits, metrics: Metrics) -> None:
        self._tokens = {"admin": [t.encode() for t in admin_tokens], "user": [t.encode() for t in tokens]}
        self._auth = bool(tokens or admin_tokens)
        self.limits = limits
        self.metrics = metrics
        self.calls = 0
        self.budget: ByteBudget | None = None  # made on the server's event loop, at the first call
        self.refusals = RefusalLog()
        self.received = 0  # request bytes received since memory was last given back

    async def give_back_memory(self) -> None:
        """Give the memory that received request bodies left free back to the system (called every few seconds):
        once the server is idle after receiving them, and every TRIM_AFTER_BYTES received while it stays busy.
        grpc receives a body in many small buffers, and glibc keeps freed small buffers in its arenas: without
        this, 12 rounds of three refused 60 MiB requests left an idle server up to 136 MB above where one round
        left it. A trim while calls are in flight cannot give back what they still hold, so another follows once
        the server is idle (trimming only every 64 MiB, a CI run saw 104 MB left that way)."""
        if MALLOC_TRIM is None:
            return
        busy = self.calls > 0
        if self.received >= TRIM_AFTER_BYTES or (not busy and self.received >= SMALL_REQUEST_BYTES):
            self.received = SMALL_REQUEST_BYTES if busy else 0
            await asyncio.to_thread(MALLOC_TRIM, 0)

    def _role(self, metadata: tuple | None) -> str | None:
        """"admin", "user" or None (no valid token) for a call's metadata; "admin" for everyone when auth is off."""
        if not self._auth:
            return "admin"
        for key, value in metadata or ():
            if key == "authorization":
                scheme, _, token = str(value).partition(" ")
                given = token.strip().encode()
                # compare with every token (no early exit) so the time taken says nothing about them
                found = [role for role, known in self._tokens.items() for t in known if hmac.compare_digest(given, t)]
                return found[0] if scheme.lower() == "bearer" and found else None
        return None

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        rpc = _rpc_name(details.method)
        role = self._role(details.invocation_metadata)
        if role is None:
            return _request_streaming_handler(handler, self._refuse_token(rpc))
        if role != "admin" and details.method.startswith(ADMIN_PREFIXES):
            return _request_streaming_handler(handler, self._refuse_role(rpc))
        if handler.request_streaming:  # reflection: its requests are small and read one by one
            return handler
        if self.budget is None:
            self.budget = ByteBudget(self.limits.max_request_bytes)
        largest = (self.limits.large_requests or {}).get(details.method, SMALL_REQUEST_BYTES)
        return _request_streaming_handler(handler, self._admit(handler, rpc, largest))

    def _refuse_token(self, rpc: str) -> Callable:
        async def refuse(request_iterator, context: grpc.aio.ServicerContext) -> None:
            self.metrics.auth_failures.inc()
            self.refusals.refused(rpc, context.peer())
            await self._fail(context, rpc, grpc.StatusCode.UNAUTHENTICATED,
                             "missing or wrong bearer token (send metadata 'authorization: Bearer <token>')")

        return refuse

    def _refuse_role(self, rpc: str) -> Callable:
        async def refuse(request_iterator, context: grpc.aio.ServicerContext) -> None:
            await self._fail(context, rpc, grpc.StatusCode.PERMISSION_DENIED,
                             f"{rpc} needs the admin token (a generation token cannot tune or delete)")

        return refuse

    async def _fail(self, context: grpc.aio.ServicerContext, rpc: str, code: grpc.StatusCode, message: str) -> None:
        self.metrics.count(rpc, code)
        await context.abort(code, message)

    def _admit(self, handler: grpc.RpcMethodHandler, rpc: str, largest: int) -> Callable:
        """A behaviour that admits the call (slot, bytes, body, parse), then runs the method's own."""
        inner = handler.unary_stream if handler.response_streaming else handler.unary_unary
        parse = handler.request_deserializer or (lambda data: data)

        async def receive(context: grpc.aio.ServicerContext, share: Reservation):
            """The parsed request, or None when the call is refused: grpc refused the body (over the size limit)
            and answers itself, or it is not the method's message (answered by `end_call`)."""
            remaining = context.time_remaining()
            wait = self.limits.receive_wait if remaining is None else min(self.limits.receive_wait, remaining)
            if not await self.budget.reserve(2 * largest, wait):
                await self._fail(context, rpc, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 "the server is receiving or holding too many request bytes; retry later")
            share.bytes = 2 * largest
            data = await context.read()
            if data is grpc.aio.EOF:
                self.metrics.count(rpc, grpc.StatusCode.RESOURCE_EXHAUSTED)
                return None
            self.received += len(data)
            kept = 2 * max(len(data), 1 << 10)
            self.budget.release(share.bytes - kept)
            share.bytes = kept
            try:
                return parse(data)
            except Exception as e:  # noqa: BLE001 - any parser refusal is the client's malformed message
                self.metrics.count(rpc, grpc.StatusCode.INVALID_ARGUMENT)
                end_call(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"request: not a valid {rpc} request message ({type(e).__name__}: {e})")
                return None

        # grpc.aio runs a behaviour by its kind (coroutine or async generator function), so keep the kind
        if inspect.isasyncgenfunction(inner):
            async def behaviour(request_iterator, context):
                async with self._slot(context, rpc) as share:
                    request = await receive(context, share)
                    if request is not None:
                        async with contextlib.aclosing(inner(request, context)) as responses:
                            async for response in responses:
                                yield response
        elif inspect.iscoroutinefunction(inner):
            async def behaviour(request_iterator, context):
                async with self._slot(context, rpc) as share:
                    request = await receive(context, share)
                    return None if request is None else await inner(request, context)
        else:
            raise TypeError(f"{rpc}: only asyncio handlers are served")
        return behaviour

    @contextlib.asynccontextmanager
    async def _slot(self, context: grpc.aio.ServicerContext, rpc: str):
        """A place among the calls in flight, and the bytes the call reserves, given back when it ends."""
        if self.calls >= self.limits.max_calls:
            await self._fail(context, rpc, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"the server has {self.limits.max_calls} calls in flight; retry later")
        self.calls += 1
        share = Reservation()
        try:
            yield share
        finally:
            self.calls -= 1
            self.budget.release(share.bytes)


@dataclass
class Reservation:
    """Request bytes one call holds against the budget."""

    bytes: int = 0
