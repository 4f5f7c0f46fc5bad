"""Content negotiation for the FHIR API: JSON is the only format served (R4 http.html#mime).

`Accept` or `_format` asking for XML (or any format but JSON) → 406 OperationOutcome in JSON."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from fhirbridge.fhir.outcome import operation_outcome

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# R4 http.html#mime: `_format` values meaning JSON (the short form and the MIME types)
JSON_FORMATS = frozenset({"json", "application/json", "application/fhir+json"})
# what a client asking for another FHIR format names in Accept (R4 XML and RDF Turtle)
OTHER_FHIR_TYPES = frozenset({"application/fhir+xml", "application/xml", "text/xml",
                              "application/xml+fhir", "application/x-turtle", "text/turtle"})
FHIR_JSON_UTF8 = b"application/fhir+json; charset=utf-8"
JSON_TYPES = frozenset({"application/fhir+json", "application/json", "application/json+fhir",
                        "*/*", "application/*"})


def _media_types(accept: str) -> list[str]:
    """The media types an Accept header names with q > 0 (RFC 9110 12.5.1)."""
    out = []
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        mtype = fields[0].lower()
        if not mtype:
            continue
        q = next((f.split("=", 1)[1] for f in fields[1:] if f.lower().startswith("q=")), "1")
        try:
            if float(q) <= 0:
                continue
        except ValueError:
            pass
        out.append(mtype)
    return out


def refused_format(accept: str, query: str) -> str | None:
    """Why the request cannot be answered in JSON, or None when JSON will do.
    `_format` overrides Accept (R4 http.html#mime); an Accept that names XML (or Turtle) and
    no JSON type nor wildcard asks for a format this server does not produce."""
    formats = [v for k, v in parse_qsl(query, keep_blank_values=True) if k == "_format"]
    if formats:
        if all(f.split(";")[0].strip().lower() in JSON_FORMATS for f in formats):
            return None
        return "this server answers in FHIR JSON only (_format=json)"
    types = _media_types(accept)
    if any(t in OTHER_FHIR_TYPES for t in types) and not any(t in JSON_TYPES for t in types):
        return "this server answers in FHIR JSON only (Accept: application/fhir+json)"
    return None


class FormatNegotiation:
    """ASGI middleware (inside the audit middleware: a refusal is audited): a FHIR request
    (`/fhir…`) asking for XML gets 406 Not Acceptable before anything is read or stored."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith("/fhir"):
            await self.app(scope, receive, send)
            return
        accept = ", ".join(v.decode("latin-1") for k, v in scope.get("headers", [])
                           if k.lower() == b"accept")
        why = refused_format(accept, scope.get("query_string", b"").decode("latin-1"))
        if why is None:
            await self.app(scope, receive, send)
            return
        body = json.dumps(operation_outcome("not-supported", why)).encode()
        await send({"type": "http.response.start", "status": 406, "headers": [
            (b"content-type", FHIR_JSON_UTF8), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class FhirCharset:
    """ASGI middleware, outermost: every FHIR JSON answer, from a route or from another
    middleware's refusal (size, time, concurrency, audit), says `charset=utf-8` (R4
    http.html#mime)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    (k, FHIR_JSON_UTF8) if k.lower() == b"content-type"
                    and v.strip().lower() == b"application/fhir+json" else (k, v)
                    for k, v in message.get("headers", [])]
            await send(message)

        await self.app(scope, receive, sending)
