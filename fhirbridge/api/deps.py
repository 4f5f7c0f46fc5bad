"""Request dependencies: the composition root's services, reached through app.state."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

from fhirbridge.api.auth import Caller, operator_caller

if TYPE_CHECKING:
    from fhirbridge.app import Services


def services_of(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


def require_operator(request: Request) -> Caller:
    """The review queue and operator endpoints: `Authorization: Bearer <http.admin_token>`;
    with [auth], a JWT with an operator scope; with neither configured, a client on loopback.
    The proven caller is set on request.state (fhirbridge.api.auth.operator_caller)."""
    return operator_caller(request)
