"""Request dependencies: the composition root's services, reached through app.state."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

if TYPE_CHECKING:
    from fhirbridge.app import Services


def services_of(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]
