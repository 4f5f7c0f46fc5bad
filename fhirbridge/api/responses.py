"""FHIR JSON responses and the mapping of every error to an OperationOutcome."""

from __future__ import annotations

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
        log.error("unexpected %s while handling a request", type(exc).__name__)
        return fhir_response(operation_outcome("exception", "internal error; nothing was "
                                               "accepted, retry later"), 500)
