"""Request dependencies: the composition root's services, reached through app.state."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

if TYPE_CHECKING:
    from fhirbridge.app import Services


def services_of(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


def require_operator(request: Request) -> None:
    """The review queue and operator endpoints: `Authorization: Bearer <http.admin_token>`,
    or, with no token configured, a client on loopback."""
    import hmac
    import ipaddress

    from fhirbridge.fhir.outcome import FhirError

    token = services_of(request).settings.http.admin_token
    if token:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise FhirError(401, "security", "operator endpoints need the admin bearer token")
        return
    host = request.client.host if request.client else ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host in ("localhost", "testclient")
    if not loopback:
        raise FhirError(403, "security", "operator endpoints answer loopback clients only "
                        "unless http.admin_token is set")
