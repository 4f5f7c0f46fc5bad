"""Uploads: `POST /fhir/Media`, `POST /fhir/DocumentReference` (FHIR R4 create), their reads,
and `POST /fhir` with a transaction or batch Bundle of them (one Bundle = one study)."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from fhirbridge.api.deps import services_of
from fhirbridge.api.responses import fhir_response
from fhirbridge.fhir.bundle import BinaryEntry, parse_bundle, response_bundle
from fhirbridge.fhir.documentreference import parse_document_reference
from fhirbridge.fhir.media import parse_media
from fhirbridge.fhir.outcome import FhirError
from fhirbridge.fhir.upload import InboundUpload
from fhirbridge.pipeline.intake import Accepted, StagedBlob, accept_bundle, accept_upload, stage
from fhirbridge.store.models import Submission

router = APIRouter()
_PARSERS = {"Media": parse_media, "DocumentReference": parse_document_reference}


async def _body(request: Request) -> bytes:
    ctype = request.headers.get("content-type", "").split(";")[0].strip()
    if ctype not in ("application/fhir+json", "application/json", ""):
        raise FhirError(415, "not-supported", "send FHIR JSON (application/fhir+json)")
    return await request.body()


def _created(inbound: InboundUpload, accepted: Accepted) -> dict[str, Any]:
    """The stored resource as answered: our id, attachment data left out."""
    resource = dict(inbound.resource, id=accepted.resource_id)
    if accepted.resource_type == "Media":
        resource["content"] = {k: v for k, v in resource.get("content", {}).items()
                               if k != "data"}
    else:
        resource["content"] = [
            dict(c, attachment={k: v for k, v in c.get("attachment", {}).items() if k != "data"})
            for c in resource.get("content", [])]
    return resource


def _location(request: Request, accepted: Accepted) -> str:
    base = services_of(request).settings.fhir_base_url
    return f"{base}/{accepted.resource_type}/{accepted.resource_id}/_history/1"


async def _create(request: Request, resource_type: str) -> Response:
    svc = services_of(request)
    body = await _body(request)
    ctx = svc.intake_context()
    inbound = await svc.run_sync(partial(_PARSERS[resource_type], limits=ctx.limits,
                                         probe_video=ctx.probe_video), body)
    accepted = await svc.run_sync(accept_upload, svc.db, ctx, inbound)
    svc.metrics.uploads_accepted.inc()
    return fhir_response(_created(inbound, accepted), 201, headers={
        "Location": _location(request, accepted),
        "X-Task": f"Task/{accepted.task_id}",
    })


@router.post("/fhir/Media")
async def create_media(request: Request) -> Response:
    return await _create(request, "Media")


@router.post("/fhir/DocumentReference")
async def create_document_reference(request: Request) -> Response:
    return await _create(request, "DocumentReference")


@router.post("/fhir")
async def transaction(request: Request) -> Response:
    """A transaction (all or nothing) or batch Bundle of uploads for one patient."""
    svc = services_of(request)
    body = await _body(request)
    ctx = svc.intake_context()
    bundle = await svc.run_sync(partial(parse_bundle, limits=ctx.limits,
                                        probe_video=ctx.probe_video), body)
    for entry in bundle.entries:
        if isinstance(entry, BinaryEntry):
            rel, digest = await svc.run_sync(svc.blobs.put, entry.data)
            ctx.bundle_blobs[entry.full_url] = StagedBlob(rel, digest, len(entry.data),
                                                          entry.content_type)
    uploads = [e for e in bundle.entries if isinstance(e, InboundUpload)]
    results: list[dict[str, Any] | FhirError] = []
    if bundle.type == "transaction":
        accepted = await svc.run_sync(accept_bundle, svc.db, ctx, uploads) if uploads else []
    else:
        # batch: an entry whose attachment cannot be staged fails alone
        ok, staged = [], []
        for u in uploads:
            try:
                staged.append(await svc.run_sync(stage, u, ctx))
                ok.append(u)
            except FhirError as exc:
                u.extra["error"] = exc
        accepted = (await svc.run_sync(partial(accept_bundle, staged=staged), svc.db, ctx, ok)
                    if ok else [])
    by_upload = {id(u): a for u, a in zip([u for u in uploads if "error" not in u.extra],
                                          accepted)}
    for entry in bundle.entries:
        if isinstance(entry, FhirError):
            results.append(entry)
        elif isinstance(entry, BinaryEntry):
            results.append({"status": "200 OK", "location": entry.full_url})
        elif "error" in entry.extra:
            results.append(entry.extra["error"])
        else:
            a = by_upload[id(entry)]
            svc.metrics.uploads_accepted.inc()
            results.append({"status": "201 Created", "location": _location(request, a),
                            "etag": 'W/"1"', "outcome": {
                                "resourceType": "OperationOutcome", "issue": [{
                                    "severity": "information", "code": "informational",
                                    "diagnostics": f"Task/{a.task_id} reports progress"}]}})
    return fhir_response(response_bundle(bundle.type, results), 200)


@router.get("/fhir/Media/{resource_id}")
def read_media(resource_id: str, request: Request) -> Response:
    return _read(request, "Media", resource_id)


@router.get("/fhir/DocumentReference/{resource_id}")
def read_document_reference(resource_id: str, request: Request) -> Response:
    return _read(request, "DocumentReference", resource_id)


def _read(request: Request, resource_type: str, resource_id: str) -> Response:
    svc = services_of(request)
    with svc.db.session() as s:
        sub = s.get(Submission, resource_id)
    if sub is None or sub.resource_type != resource_type:
        raise FhirError(404, "not-found", f"no such {resource_type}")
    resource = json.loads(sub.resource_json)
    if sub.superseded_by and resource_type == "DocumentReference":
        resource["status"] = "superseded"
    return fhir_response(resource)
