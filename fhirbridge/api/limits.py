"""Request limits: bodies over the configured size get 413 before they are read; a body
not received within `http.request_timeout_seconds` gets 408; requests beyond
`http.max_concurrent_requests` get 503 + Retry-After; headers not complete in time close the
connection (an h11 protocol for uvicorn, which has no header timeout of its own).

One body limit for FHIR JSON (`http.max_body_bytes`); a route that takes raw bytes (FHIR R4
`POST /fhir/Binary` with a non-FHIR Content-Type, http.html#binary) has its own, given in
`raw_limits` with the name of its setting. The route streams such a body to disk.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any

from fhirbridge.fhir.outcome import operation_outcome

Scope = dict[str, Any]

_JSON_TYPES = (b"application/fhir+json", b"application/json")


class BodySizeLimit:
    def __init__(self, app: Any, max_bytes: int,
                 raw_limits: Mapping[str, tuple[int, str]] | None = None) -> None:
        """`raw_limits`: path → (limit, setting name) for raw (non-JSON) bodies on that path;
        JSON bodies there keep `max_bytes` (they are read whole to decode base64)."""
        self.app = app
        self.max_bytes = max_bytes
        self.raw_limits = dict(raw_limits or {})

    def limit_for(self, scope: Scope, headers: dict[bytes, bytes]) -> tuple[int, str]:
        raw = self.raw_limits.get(scope.get("path", "").rstrip("/"))
        if raw is not None:
            ctype = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
            if ctype not in _JSON_TYPES:
                return raw
        return self.max_bytes, "http.max_body_bytes"

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        max_bytes, setting = self.limit_for(scope, headers)
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > max_bytes
            except ValueError:
                too_big = False
            if too_big:
                await _reject(send, setting)
                return
        seen = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:
                    raise _TooLarge()
            return message

        tracked = TrackedSend(send)
        try:
            await self.app(scope, limited_receive, tracked)
        except _TooLarge:
            if not tracked.started:
                await _reject(send, setting)


class _TooLarge(Exception):
    pass


async def _reject(send: Any, setting: str) -> None:
    await _outcome(send, 413, "too-long", "request body exceeds the configured limit "
                   f"({setting})", [(b"connection", b"close")])


class TrackedSend:
    """An ASGI `send` that remembers whether the response has started (after that, an error
    can no longer be answered with an OperationOutcome)."""

    def __init__(self, send: Any) -> None:
        self.send = send
        self.started = False

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self.send(message)


async def _outcome(send: Any, status: int, code: str, text: str,
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(operation_outcome(code, text)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/fhir+json"),
                            (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class _TimedOut(Exception):
    pass


class RequestTimeout:
    """The whole body must arrive within `seconds` of the request's start (its headers):
    a client that trickles or stalls is answered 408 (RFC 9110 15.5.9) and the connection
    closed, so slow clients cannot hold workers and sockets."""

    def __init__(self, app: Any, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.seconds <= 0:
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.seconds
        body_done = False

        async def timed_receive() -> dict[str, Any]:
            nonlocal body_done
            if body_done:  # after the body only a disconnect can come: no deadline
                return await receive()  # type: ignore[no-any-return]
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except TimeoutError:
                raise _TimedOut() from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message  # type: ignore[no-any-return]

        tracked = TrackedSend(send)
        try:
            await self.app(scope, timed_receive, tracked)
        except _TimedOut:
            if not tracked.started:
                await _outcome(send, 408, "timeout", "the request body did not arrive within "
                               "the configured time (http.request_timeout_seconds)",
                               [(b"connection", b"close")])


class ConcurrencyLimit:
    """At most `max_requests` requests in flight; one more is answered at once with 503 and
    Retry-After (RFC 9110 15.6.4, 10.2.3) instead of queueing without bound. /healthz is not
    counted: a busy service is still alive."""

    def __init__(self, app: Any, max_requests: int, retry_after: int = 1,
                 exempt: tuple[str, ...] = ("/healthz",)) -> None:
        self.app = app
        self.max_requests = max_requests
        self.retry_after = retry_after
        self.exempt = exempt
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_requests:
            await _outcome(send, 503, "transient", "the service is busy; retry later "
                           "(http.max_concurrent_requests)",
                           [(b"retry-after", str(self.retry_after).encode())])
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def h11_with_header_timeout(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, with a deadline for the request line and headers: a connection
    that has not sent a complete head within `seconds` of opening (or of its previous
    response) is closed. uvicorn bounds only idle keep-alive time, so without this a client
    trickling header bytes (slowloris) holds a connection for ever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        def _arm(self) -> None:
            self._head_cycle = self.cycle  # a new cycle object = the next request's head arrived
            self._head_timer = self.loop.call_later(seconds, self._head_timeout)

        def _disarm(self) -> None:
            timer = getattr(self, "_head_timer", None)
            if timer is not None:
                timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.cycle is self._head_cycle and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not getattr(self, "_head_cycle", None):
                self._disarm()

        def on_response_complete(self) -> None:
            finished = self.cycle
            self._disarm()
            super().on_response_complete()  # may start a pipelined request at once
            if self.cycle is finished and not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutH11Protocol
