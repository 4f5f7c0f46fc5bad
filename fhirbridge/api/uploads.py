"""Uploads: `POST /fhir/Media`, `POST /fhir/DocumentReference` (FHIR R4 create), their reads,
and `POST /fhir` with a transaction or batch Bundle of them (one Bundle = one study)."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy import delete, exists, select

from fhirbridge.adapters.ehr import EhrUnavailable
from fhirbridge.api.auth import (
    Caller,
    authenticate,
    authorize,
    note_audit,
    require_scope,
    unavailable,
)
from fhirbridge.api.binary import find_binary
from fhirbridge.api.deps import services_of
from fhirbridge.api.responses import (
    fhir_instant,
    fhir_response,
    preferred_response,
    version_headers,
)
from fhirbridge.fhir.bundle import BinaryEntry, parse_bundle, response_bundle
from fhirbridge.fhir.documentreference import parse_document_reference
from fhirbridge.fhir.media import parse_media
from fhirbridge.fhir.outcome import FhirError, operation_outcome
from fhirbridge.fhir.upload import InboundUpload
from fhirbridge.pipeline.intake import (
    Accepted,
    IntakeContext,
    StagedBlob,
    accept_bundle,
    accept_upload,
    check_bound_patient,
    conditional_criteria,
    find_existing,
    task_of,
    stage,
)
from fhirbridge.store.db import Database
from fhirbridge.store.models import BinaryRecord, StoredInstance, Submission

router = APIRouter()
_PARSERS = {"Media": parse_media, "DocumentReference": parse_document_reference}
_PATIENT_REF = re.compile(r"(?:^|/)(Patient/[A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")


async def _body(request: Request) -> bytes:
    ctype = request.headers.get("content-type", "").split(";")[0].strip()
    if ctype not in ("application/fhir+json", "application/json", ""):
        raise FhirError(415, "not-supported", "send FHIR JSON (application/fhir+json)")
    return await request.body()


VERSION = "1"  # an upload is never updated: its one version (R4 http.html#versioning)


def _with_meta(resource: dict[str, Any], received_at: datetime) -> dict[str, Any]:
    """meta.versionId and meta.lastUpdated are the server's (R4 resource.html#Meta); the
    client's other meta (profile, tag, security) is kept."""
    meta = resource.get("meta") if isinstance(resource.get("meta"), dict) else {}
    return dict(resource, meta=dict(meta, versionId=VERSION,
                                    lastUpdated=fhir_instant(received_at)))


def _created(inbound: InboundUpload, accepted: Accepted) -> dict[str, Any]:
    """The stored resource as answered: our id, meta, attachment data left out."""
    resource = _with_meta(dict(inbound.resource, id=accepted.resource_id),
                          accepted.received_at or datetime.now(timezone.utc))
    if accepted.resource_type == "Media":
        resource["content"] = {k: v for k, v in resource.get("content", {}).items()
                               if k != "data"}
    else:
        resource["content"] = [
            dict(c, attachment={k: v for k, v in c.get("attachment", {}).items() if k != "data"})
            for c in resource.get("content", [])]
    return resource


def _location(request: Request, accepted: Accepted | Submission) -> str:
    base = services_of(request).settings.fhir_base_url
    if isinstance(accepted, Submission):
        return f"{base}/{accepted.resource_type}/{accepted.id}/_history/{VERSION}"
    return f"{base}/{accepted.resource_type}/{accepted.resource_id}/_history/{VERSION}"


async def _check_bound(request: Request, caller: Caller, uploads: list[InboundUpload]) -> None:
    """A patient-bound token: every upload must be about its patient (403, nothing staged)."""
    if not caller.patient:
        return
    svc = services_of(request)
    ehr_base = svc.ehr.base if svc.ehr is not None else ""
    for inbound in uploads:
        try:
            await svc.run_sync(check_bound_patient, inbound, caller.bound_patient,
                               svc.pipeline.resolver, ehr_base)
        except EhrUnavailable:
            raise unavailable("the EHR cannot confirm the upload's patient now; nothing was "
                              "accepted, retry later") from None


def _bind(request: Request, ctx: IntakeContext, caller: Caller) -> None:
    """Intake for a patient-bound token: recorded on the submission, and an attachment may
    name only a Binary posted with the same patient's token (others look unknown)."""
    if not caller.patient:
        return
    db, bound = services_of(request).db, caller.bound_patient

    def own_binary(binary_id: str) -> StagedBlob | None:
        rec = find_binary(db, binary_id)
        if rec is None or rec.bound_patient != bound:
            return None
        return StagedBlob(rec.blob_path, rec.sha256, rec.size, rec.content_type)

    ctx.bound_patient = bound
    ctx.local_binary = own_binary


def _audit_patient(inbound: InboundUpload, caller: Caller) -> str:
    return caller.bound_patient or inbound.claim.reference or ""


async def _create(request: Request, resource_type: str, caller: Caller) -> Response:
    svc = services_of(request)
    condition = request.headers.get("if-none-exist")
    criteria = conditional_criteria(condition) if condition is not None else None
    body = await _body(request)
    ctx = svc.intake_context()
    inbound = await svc.run_sync(partial(_PARSERS[resource_type], limits=ctx.limits,
                                         probe_video=ctx.probe_video), body)
    await _check_bound(request, caller, [inbound])
    if criteria is not None:  # R4 http.html#ccreate: before anything is staged
        found = await svc.run_sync(partial(find_existing, bound_patient=caller.bound_patient),
                                   svc.db, resource_type, criteria)
        if len(found) > 1:
            raise FhirError(412, "duplicate", f"several {resource_type} resources match "
                            "If-None-Exist; nothing was stored")
        if found:
            return await svc.run_sync(_existing, request, found[0], caller)
    _bind(request, ctx, caller)
    accepted = await svc.run_sync(accept_upload, svc.db, ctx, inbound)
    note_audit(request, f"{resource_type}/{accepted.resource_id}",
               _audit_patient(inbound, caller))
    svc.metrics.uploads_accepted.inc()
    headers = {"Location": _location(request, accepted), "X-Task": f"Task/{accepted.task_id}",
               **version_headers(VERSION, accepted.received_at or datetime.now(timezone.utc))}
    return preferred_response(
        request, _created(inbound, accepted), 201, headers,
        f"created {resource_type}/{accepted.resource_id}; Task/{accepted.task_id} reports "
        "its progress")


def _existing(request: Request, sub: Submission, caller: Caller) -> Response:
    """Conditional create, one match (R4 http.html#ccreate): 200 with the upload already
    held, nothing new stored. The resource itself only to a caller who may read it."""
    db = services_of(request).db
    task_id = task_of(db, sub.id)
    headers = {"Location": _location(request, sub),
               **version_headers(VERSION, sub.received_at)}
    if task_id:
        headers["X-Task"] = f"Task/{task_id}"
    text = (f"{sub.resource_type}/{sub.id} matches If-None-Exist and is already held; "
            f"nothing new was stored" + (f"; Task/{task_id} reports its progress"
                                         if task_id else ""))
    try:
        authorize(caller, sub.resource_type, "r")
    except FhirError:  # may create but not read: where it is, not what it says
        return fhir_response(operation_outcome("informational", text,
                                               severity="information"), 200, headers)
    note_audit(request, f"{sub.resource_type}/{sub.id}", submission_patient(db, sub))
    return preferred_response(request, _stored_view(sub), 200, headers, text)


@router.post("/fhir/Media")
async def create_media(request: Request,
                       caller: Caller = Depends(require_scope("Media", "c"))) -> Response:
    return await _create(request, "Media", caller)


@router.post("/fhir/DocumentReference")
async def create_document_reference(
        request: Request,
        caller: Caller = Depends(require_scope("DocumentReference", "c"))) -> Response:
    return await _create(request, "DocumentReference", caller)


def _bundle_caller(caller: Caller, entries: list[Any]) -> Caller:
    """A Bundle needs the create scope of every entry's type; it is patient-bound when any
    entry is allowed through patient/ scopes only (SMART App Launch 2.0 3.5)."""
    types = {"Binary" if isinstance(e, BinaryEntry) else e.resource_type
             for e in entries if not isinstance(e, FhirError)}
    effective = [authorize(caller, t, "c") for t in sorted(types)]
    return next((c for c in effective if c.patient), effective[0] if effective else caller)


def _insert_binaries(db: Database, records: list[BinaryRecord]) -> None:
    with db.transaction() as s:
        s.add_all(records)
        s.flush()
        for r in records:
            s.expunge(r)


def _delete_binaries(db: Database, ids: list[str]) -> None:
    if not ids:
        return
    with db.transaction() as s:
        s.execute(delete(BinaryRecord).where(BinaryRecord.id.in_(ids)))


def _match_conditional(db: Database, bundle_type: str, entries: list[Any],
                       bound_patient: str) -> None:
    """Entries with `request.ifNoneExist` (R4 http.html#trules): one match → the entry is
    answered with it (`extra["existing"]`), several → 412. A transaction fails whole on a
    bad or ambiguous condition; a batch fails that entry alone (`extra["error"]`)."""
    for i, entry in enumerate(entries):
        if not isinstance(entry, InboundUpload) or "if_none_exist" not in entry.extra:
            continue
        try:
            found = find_existing(db, entry.resource_type,
                                  conditional_criteria(entry.extra["if_none_exist"]),
                                  bound_patient=bound_patient)
            if len(found) > 1:
                raise FhirError(412, "duplicate", f"several {entry.resource_type} resources "
                                "match ifNoneExist; nothing was stored",
                                expression=f"Bundle.entry[{i}].request.ifNoneExist")
        except FhirError as exc:
            if bundle_type == "transaction":
                raise
            entry.extra["error"] = exc
            continue
        if found:
            entry.extra["existing"] = found[0]


@router.post("/fhir")
async def transaction(request: Request, caller: Caller = Depends(authenticate)) -> Response:
    """A transaction (all or nothing) or batch Bundle of uploads for one patient."""
    svc = services_of(request)
    body = await _body(request)
    ctx = svc.intake_context()
    bundle = await svc.run_sync(partial(parse_bundle, limits=ctx.limits,
                                        probe_video=ctx.probe_video), body)
    # scopes and the patient binding are checked before any entry is staged
    caller = _bundle_caller(caller, bundle.entries)
    request.state.caller = caller
    await _check_bound(request, caller,
                       [e for e in bundle.entries if isinstance(e, InboundUpload)])
    _bind(request, ctx, caller)
    await svc.run_sync(_match_conditional, svc.db, bundle.type, bundle.entries,
                       caller.bound_patient)
    # Binary entries become real Binaries (as POST /fhir/Binary makes them) under the ids the
    # other entries' references were rewritten to (R4 http.html#trules)
    binaries: list[BinaryRecord] = []
    for entry in bundle.entries:
        if isinstance(entry, BinaryEntry):
            rel, digest = await svc.run_sync(svc.blobs.put, entry.data)
            ctx.bundle_blobs[f"Binary/{entry.id}"] = StagedBlob(rel, digest, len(entry.data),
                                                                entry.content_type)
            binaries.append(BinaryRecord(id=entry.id, content_type=entry.content_type,
                                         blob_path=rel, sha256=digest, size=len(entry.data),
                                         bound_patient=caller.bound_patient))
    if binaries:
        await svc.run_sync(_insert_binaries, svc.db, binaries)
    uploads = [e for e in bundle.entries if isinstance(e, InboundUpload)
               and "existing" not in e.extra and "error" not in e.extra]
    results: list[dict[str, Any] | FhirError] = []
    if bundle.type == "transaction":
        try:
            accepted = (await svc.run_sync(accept_bundle, svc.db, ctx, uploads)
                        if uploads else [])
        except Exception:
            # all or nothing: the Binaries of a refused transaction are not kept
            await svc.run_sync(_delete_binaries, svc.db, [b.id for b in binaries])
            raise
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
            note_audit(request, f"Binary/{entry.id}", caller.bound_patient)
            results.append({"status": "201 Created", "location": f"Binary/{entry.id}",
                            "etag": 'W/"1"'})
        elif "error" in entry.extra:
            results.append(entry.extra["error"])
        elif "existing" in entry.extra:  # ifNoneExist matched: 200 with it, nothing new
            sub = entry.extra["existing"]
            note_audit(request, f"{sub.resource_type}/{sub.id}", _audit_patient(entry, caller))
            results.append({"status": "200 OK", "location": _location(request, sub),
                            "etag": f'W/"{VERSION}"',
                            "lastModified": fhir_instant(sub.received_at)})
        else:
            a = by_upload[id(entry)]
            note_audit(request, f"{a.resource_type}/{a.resource_id}",
                       _audit_patient(entry, caller))
            svc.metrics.uploads_accepted.inc()
            results.append({"status": "201 Created", "location": _location(request, a),
                            "etag": 'W/"1"', "outcome": {
                                "resourceType": "OperationOutcome", "issue": [{
                                    "severity": "information", "code": "informational",
                                    "diagnostics": f"Task/{a.task_id} reports progress"}]}})
    return fhir_response(response_bundle(bundle.type, results), 200)


@router.get("/fhir/Media/{resource_id}")
def read_media(resource_id: str, request: Request,
               caller: Caller = Depends(require_scope("Media", "r"))) -> Response:
    return _read(request, "Media", resource_id, caller)


@router.get("/fhir/Media/{resource_id}/_history/{version_id}")
def vread_media(resource_id: str, version_id: str, request: Request,
                caller: Caller = Depends(require_scope("Media", "r"))) -> Response:
    return _read(request, "Media", resource_id, caller, version_id)


@router.get("/fhir/DocumentReference/{resource_id}")
def read_document_reference(
        resource_id: str, request: Request,
        caller: Caller = Depends(require_scope("DocumentReference", "r"))) -> Response:
    return _read(request, "DocumentReference", resource_id, caller)


@router.get("/fhir/DocumentReference/{resource_id}/_history/{version_id}")
def vread_document_reference(
        resource_id: str, version_id: str, request: Request,
        caller: Caller = Depends(require_scope("DocumentReference", "r"))) -> Response:
    return _read(request, "DocumentReference", resource_id, caller, version_id)


def submission_of_patient(bound: str) -> Any:
    """SQL condition: the submission is that patient's — uploaded with their patient-bound
    token, or stored (after identity matching) under them."""
    stored = exists().where(StoredInstance.submission_id == Submission.id,
                            StoredInstance.patient_ref == bound)
    return (Submission.bound_patient == bound) | stored


def submission_patient(db: Database, sub: Submission) -> str:
    """The patient an upload is about, for the audit record: bound, stored, else claimed."""
    if sub.bound_patient:
        return sub.bound_patient
    with db.session() as s:
        ref = s.scalar(select(StoredInstance.patient_ref)
                       .where(StoredInstance.submission_id == sub.id).limit(1))
    if ref:
        return str(ref)
    subject = json.loads(sub.resource_json).get("subject") or {}
    ref = subject.get("reference", "") if isinstance(subject, dict) else ""
    m = _PATIENT_REF.search(ref) if isinstance(ref, str) else None
    return m.group(1) if m else ""


def _stored_view(sub: Submission) -> dict[str, Any]:
    """The upload as read: stored JSON, server meta, DocumentReference status superseded
    once a replacement has completed."""
    resource = _with_meta(json.loads(sub.resource_json), sub.received_at)
    if sub.superseded_by and sub.resource_type == "DocumentReference":
        resource["status"] = "superseded"
    return resource


def _read(request: Request, resource_type: str, resource_id: str, caller: Caller,
          version_id: str | None = None) -> Response:
    """read, or vread of `_history/{version_id}` (R4 http.html#vread): an upload has one
    version, "1"; any other is 404 like an unknown id."""
    svc = services_of(request)
    with svc.db.session() as s:
        sub = s.get(Submission, resource_id)
        if sub is not None and caller.patient and not s.scalar(
                select(exists().where(Submission.id == sub.id,
                                      submission_of_patient(caller.bound_patient)))):
            sub = None  # another patient's upload: as if it did not exist
    if sub is None or sub.resource_type != resource_type:
        raise FhirError(404, "not-found", f"no such {resource_type}")
    if version_id is not None and version_id != VERSION:
        raise FhirError(404, "not-found", f"no such version of this {resource_type} (only "
                        f"version {VERSION} exists)")
    note_audit(request, f"{resource_type}/{sub.id}", submission_patient(svc.db, sub))
    return fhir_response(_stored_view(sub), headers=version_headers(VERSION, sub.received_at))
