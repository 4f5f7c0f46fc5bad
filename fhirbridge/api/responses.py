"""FHIR JSON responses and the mapping of every error to an OperationOutcome."""

from __future__ import annotations

import errno
import json
import logging
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from fhirbridge.fhir.outcome import FhirError, operation_outcome

FHIR_JSON = "application/fhir+json"
FHIR_JSON_UTF8 = "application/fhir+json; charset=utf-8"  # R4 http.html#mime: say the charset
log = logging.getLogger("fhirbridge.api")


def fhir_response(resource: dict[str, Any], status: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(resource), status_code=status, media_type=FHIR_JSON_UTF8,
                    headers=headers)


def fhir_instant(dt: datetime) -> str:
    """A FHIR `instant` in UTC with milliseconds (meta.lastUpdated)."""
    if dt.tzinfo is None:  # SQLite gives naive datetimes back; they were written in UTC
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def version_headers(version: str, modified: datetime) -> dict[str, str]:
    """`ETag: W/"n"` (R4 http.html#versioning) and `Last-Modified` (RFC 9110 8.8.2)."""
    if modified.tzinfo is None:
        modified = modified.replace(tzinfo=timezone.utc)
    return {"ETag": f'W/"{version}"',
            "Last-Modified": format_datetime(modified.astimezone(timezone.utc), usegmt=True)}


def version_of(modified: datetime) -> str:
    """A version id for a resource kept without history: its last-modified instant in ms."""
    if modified.tzinfo is None:
        modified = modified.replace(tzinfo=timezone.utc)
    return str(int(modified.timestamp() * 1000))


RETURN_PREFERENCES = ("minimal", "representation", "OperationOutcome")


def prefer_return(request: Request) -> str:
    """`Prefer: return=…` (R4 http.html#ops, RFC 7240): minimal | representation |
    OperationOutcome; absent or not one of those → representation (a preference the server
    does not know is ignored, RFC 7240 2)."""
    for part in request.headers.get("prefer", "").replace(";", ",").split(","):
        name, _, value = part.strip().partition("=")
        value = value.strip().strip('"')
        if name.strip().lower() == "return" and value in RETURN_PREFERENCES:
            return value
    return "representation"


def preferred_response(request: Request, resource: dict[str, Any], status: int,
                       headers: dict[str, str], outcome_text: str) -> Response:
    """A create's answer as `Prefer: return=` asks: the resource, no body, or an
    OperationOutcome saying what happened (`outcome_text`, never PHI)."""
    wanted = prefer_return(request)
    if "return=" in request.headers.get("prefer", ""):
        headers = dict(headers, **{"Preference-Applied": f"return={wanted}"})
    if wanted == "minimal":
        return Response(status_code=status, headers=headers)
    if wanted == "OperationOutcome":
        return fhir_response(operation_outcome("informational", outcome_text,
                                               severity="information"), status, headers)
    return fhir_response(resource, status, headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(FhirError)
    async def _fhir_error(_: Request, exc: FhirError) -> Response:
        return fhir_response(operation_outcome(exc.code, exc.text, expression=exc.expression),
                             exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        where = "; ".join(".".join(str(p) for p in e.get("loc", ())) for e in exc.errors()[:5])
        return fhir_response(operation_outcome("invalid", f"invalid request: {where}"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not-found", 405: "not-supported", 413: "too-long"}.get(exc.status_code,
                                                                             "processing")
        return fhir_response(operation_outcome(code, str(exc.detail)), exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        if isinstance(exc, RecursionError):  # a body nested past what a parser can follow
            return fhir_response(operation_outcome("structure", "the request is nested too "
                                                   "deeply to be read"), 400)
        if out_of_space(exc):
            # RFC 4918 11.5 507 Insufficient Storage: the request was refused, not lost
            log.error("no space left for a request (%s); nothing was accepted",
                      type(exc).__name__)
            return fhir_response(operation_outcome(
                "transient", "the service has no storage space left; nothing was accepted, "
                "retry later"), 507, headers={"Retry-After": "60"})
        log.error("unexpected %s while handling a request", type(exc).__name__)
        return fhir_response(operation_outcome("exception", "internal error; nothing was "
                                               "accepted, retry later"), 500)


_SQLITE_FULL = 13  # SQLite result code: "database or disk is full"


def out_of_space(exc: BaseException) -> bool:
    """The file system (ENOSPC) or a quota (EDQUOT) is full, directly or under a database
    error (SQLite SQLITE_FULL / SQLITE_IOERR with ENOSPC, PostgreSQL SQLSTATE 53100)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if getattr(cur, "sqlite_errorcode", None) == _SQLITE_FULL:
            return True
        if getattr(cur, "sqlstate", None) == "53100":  # PostgreSQL disk_full
            return True
        orig = getattr(cur, "orig", None)  # SQLAlchemy's DBAPIError wraps the driver's error
        cur = orig if isinstance(orig, BaseException) else (cur.__cause__ or cur.__context__)
    return False
