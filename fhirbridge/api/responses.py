"""FHIR JSON responses and the mapping of every error to an OperationOutcome."""

from __future__ import annotations

import errno
import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from fhirbridge.fhir.outcome import FhirError, operation_outcome

FHIR_JSON = "application/fhir+json"
log = logging.getLogger("fhirbridge.api")


def fhir_response(resource: dict[str, Any], status: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(resource), status_code=status, media_type=FHIR_JSON,
                    headers=headers)


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
