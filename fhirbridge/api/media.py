"""`POST /fhir/Media`, `GET /fhir/Media/{id}` (FHIR R4 create and read)."""

from __future__ import annotations

import json
from functools import partial

from fastapi import APIRouter, Request
from fastapi.responses import Response

from fhirbridge.api.deps import services_of
from fhirbridge.api.responses import fhir_response
from fhirbridge.fhir.media import parse_media
from fhirbridge.fhir.outcome import FhirError
from fhirbridge.pipeline.intake import accept_media
from fhirbridge.store.models import Submission

router = APIRouter()


@router.post("/fhir/Media")
async def create_media(request: Request) -> Response:
    svc = services_of(request)
    body = await request.body()
    ctype = request.headers.get("content-type", "").split(";")[0].strip()
    if ctype not in ("application/fhir+json", "application/json", ""):
        raise FhirError(415, "not-supported", "send FHIR JSON (application/fhir+json)")
    inbound = await svc.run_sync(partial(parse_media, max_pixels=svc.settings.media.max_pixels,
                                         min_side=svc.settings.media.min_side), body)
    accepted = await svc.run_sync(accept_media, svc.db, svc.blobs, inbound)
    location = f"{svc.settings.fhir_base_url}/Media/{accepted.resource_id}/_history/1"
    resource = dict(inbound.resource, id=accepted.resource_id)
    resource["content"] = {k: v for k, v in resource.get("content", {}).items() if k != "data"}
    svc.metrics.uploads_accepted.inc()
    return fhir_response(resource, 201, headers={
        "Location": location,
        "X-Task": f"Task/{accepted.task_id}",
    })


@router.get("/fhir/Media/{resource_id}")
def read_media(resource_id: str, request: Request) -> Response:
    svc = services_of(request)
    with svc.db.session() as s:
        sub = s.get(Submission, resource_id)
    if sub is None or sub.resource_type != "Media":
        raise FhirError(404, "not-found", "no such Media")
    return fhir_response(json.loads(sub.resource_json))
