"""ASGI middleware: refuse bodies over the configured size with 413 before reading them.

One limit for FHIR JSON (`http.max_body_bytes`); a route that takes raw bytes (FHIR R4
`POST /fhir/Binary` with a non-FHIR Content-Type, http.html#binary) has its own, given in
`raw_limits` with the name of its setting. The route streams such a body to disk.
"""

from __future__ import annotations

import json
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
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:
                    raise _TooLarge()
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _reject(send, setting)


class _TooLarge(Exception):
    pass


async def _reject(send: Any, setting: str) -> None:
    body = json.dumps(operation_outcome("too-long", "request body exceeds the configured "
                                        f"limit ({setting})")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/fhir+json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
