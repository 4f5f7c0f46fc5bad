"""Accept an upload: bytes staged durably, then submission + Task + job in one transaction.

Only after that commit does the client get 201 (durable before acknowledged). An upload
Bundle is accepted the same way, every entry in the same transaction, all in one study.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from sqlalchemy import exists, or_, select
from sqlalchemy.orm import Session

from fhirbridge.adapters.attachments import local_binary_id
from fhirbridge.adapters.blobs import BlobStore
from fhirbridge.fhir.outcome import FhirError
from fhirbridge.fhir.upload import InboundAttachment, InboundUpload, check_content
from fhirbridge.media.kinds import SERIES_NUMBER, VIDEO, MediaLimits
from fhirbridge.media.sniff import content_type_matches, sniff_content_type
from fhirbridge.pipeline.queue import enqueue
from fhirbridge.store.db import Database
from fhirbridge.store.models import StoredInstance, Submission, Task

UPLOAD_JOB = "upload"


@dataclass(frozen=True)
class Accepted:
    resource_type: str
    resource_id: str
    task_id: str
    received_at: datetime | None = None  # meta.lastUpdated of version 1


@dataclass(frozen=True)
class StagedBlob:
    """Bytes already durable in the blob store (inline data, or a Binary we hold)."""

    blob_path: str
    sha256: str
    size: int
    content_type: str


@dataclass
class IntakeContext:
    """What intake needs besides the database: where bytes go and how URLs resolve."""

    blobs: BlobStore
    limits: MediaLimits = field(default_factory=MediaLimits)
    # Binary/{id} we hold → StagedBlob, or None
    local_binary: Callable[[str], StagedBlob | None] = lambda _id: None
    # may fhirbridge fetch this URL later (EHR base, allow-list)? → bool
    url_allowed: Callable[[str], bool] = lambda _url: False
    probe_video: Callable[[Any], Any] | None = None  # bytes or Path → raises MediaError
    bundle_blobs: dict[str, StagedBlob] = field(default_factory=dict)  # fullUrl → blob
    own_base: str = ""  # our public FHIR base: {own_base}/Binary/{id} is ours
    # a patient-bound token (SMART patient/ scopes) made the request: that `Patient/{id}`,
    # recorded on the submission; `check_bound_patient` ran before anything was staged
    bound_patient: str = ""


def same_patient(ref: str, bound: str) -> bool:
    """A resolved patient ref (`Patient/{id}`, or `index:{key}` with no EHR) is the bound one."""
    return bool(bound) and (ref == bound or ref == "index:" + bound.removeprefix("Patient/"))


def check_bound_patient(inbound: InboundUpload, bound: str, resolver: Any,
                        ehr_base: str = "") -> None:
    """SMART patient-bound token (`patient/...` scopes + `patient` claim = `bound`): the
    upload must be about that patient, or 403 before anything is staged. A reference must be
    `Patient/{id}` (relative, or absolute under the EHR base); an identifier must resolve by
    identity matching (EHR search, then the ADT index) to exactly that patient.
    `resolver`: fhirbridge.pipeline.patient.PatientResolver. EhrUnavailable propagates."""
    from fhirbridge.identity.model import SubjectClaim
    from fhirbridge.identity.policy import Matched

    refused = FhirError(403, "forbidden", "the token is limited to one patient and this "
                        "upload names another (or one that cannot be confirmed)",
                        expression=f"{inbound.resource_type}.subject")
    claim = inbound.claim
    if claim.reference:
        subject = inbound.resource.get("subject")
        raw = subject.get("reference", "") if isinstance(subject, dict) else ""
        if "://" in str(raw) and not (ehr_base and str(raw).startswith(ehr_base.rstrip("/")
                                                                        + "/")):
            raise refused  # an absolute reference to a server that is not the EHR
        if claim.reference != bound:
            raise refused
    if claim.identifier:
        verdict = resolver.resolve(SubjectClaim(identifier=claim.identifier), None)
        if not (isinstance(verdict, Matched) and same_patient(verdict.patient.ref, bound)):
            raise refused


def idempotency_key(inbound: InboundUpload, content_ids: Sequence[str]) -> str:
    """Same patient claim + same business identifiers + same bytes = the same DICOM objects."""
    claim = inbound.claim
    parts = {
        "ref": claim.reference or "",
        "ident": [claim.identifier.system, claim.identifier.value] if claim.identifier else [],
        "ids": sorted(list(i) for i in inbound.identifiers),
        "sha256": content_ids[0] if len(content_ids) == 1 else list(content_ids),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def stage(inbound: InboundUpload, ctx: IntakeContext) -> list[dict[str, Any]]:
    """Make every attachment's bytes durable (or check its URL may be fetched), checking
    the bytes we hold. Returns the attachment records for Submission.attachments_json."""
    staged = []
    for index, att in enumerate(inbound.attachments):
        rec: dict[str, Any] = {"index": index, "content_type": att.content_type,
                               "kind": att.kind, "blob_path": "", "sha256": "", "size": 0,
                               "url": ""}
        if att.data is not None:
            rel, digest = ctx.blobs.put(att.data)
            rec.update(blob_path=rel, sha256=digest, size=len(att.data))
        else:
            blob = _resolve_local(att, ctx)
            if blob is not None:
                rec.update(blob_path=blob.blob_path, sha256=blob.sha256, size=blob.size)
            elif ctx.url_allowed(att.url):
                rec.update(url=att.url)
            else:
                raise FhirError(422, "security", "attachment url is neither a Binary held here "
                                "nor on the EHR or its allow-list",
                                expression=f"{att.expression}.url")
        staged.append(rec)
    return staged


def _resolve_local(att: InboundAttachment, ctx: IntakeContext) -> StagedBlob | None:
    """urn:uuid of a Binary in the same Bundle, `Binary/{id}` or `{our base}/Binary/{id}`
    naming a Binary we hold → its blob (checked). Anything else → None (maybe the EHR's)."""
    blob = ctx.bundle_blobs.get(att.url)
    if blob is None:
        url = att.url
        if ctx.own_base and url.startswith(ctx.own_base.rstrip("/") + "/"):
            url = url[len(ctx.own_base.rstrip("/")) + 1:]
        binary_id = local_binary_id(url)
        if binary_id is not None:
            blob = ctx.local_binary(binary_id)
    if blob is None:
        return None
    check_held_bytes(att, blob, ctx)
    return blob


def check_held_bytes(att: InboundAttachment, blob: StagedBlob, ctx: IntakeContext) -> None:
    """The checks inline data gets, for bytes we already hold (a Binary): type by magic,
    size and hash, and the per-kind checks — without reading a video into memory."""
    path = ctx.blobs.path(blob.blob_path)
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if not content_type_matches(att.content_type, sniff_content_type(head)):
        raise FhirError(415, "invalid", f"attachment bytes are not {att.content_type}",
                        expression=f"{att.expression}.contentType")
    if att.size is not None and att.size != blob.size:
        raise FhirError(422, "invalid", "Attachment.size does not match the Binary's length",
                        expression=f"{att.expression}.size")
    if att.kind == VIDEO:
        if att.sha1:
            _check_sha1_file(path, att)
        if ctx.probe_video is not None:
            from fhirbridge.fhir.upload import media_error
            from fhirbridge.media.errors import MediaError

            try:
                ctx.probe_video(path)
            except MediaError as exc:
                raise media_error(exc, att.expression) from None
        return
    check_content(path.read_bytes(), att, ctx.limits, ctx.probe_video)


def _check_sha1_file(path: Path, att: InboundAttachment) -> None:
    import base64

    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    try:
        expected = base64.b64decode(str(att.sha1), validate=True)
    except ValueError:
        expected = b""
    if expected != digest.digest():
        raise FhirError(422, "invalid", "Attachment.hash does not match the SHA-1 of the data",
                        expression=f"{att.expression}.hash")


def accept_upload(db: Database, ctx: IntakeContext, inbound: InboundUpload) -> Accepted:
    """One Media or DocumentReference: staged, then recorded with its Task and job."""
    staged = stage(inbound, ctx)
    with db.transaction() as s:
        return _record(s, inbound, staged, study_key=None, counters={},
                       bound_patient=ctx.bound_patient)


def accept_bundle(db: Database, ctx: IntakeContext, uploads: list[InboundUpload], *,
                  staged: list[list[dict[str, Any]]] | None = None) -> list[Accepted]:
    """Every upload of a Bundle in one transaction and one study: a series per kind."""
    if staged is None:
        staged = [stage(u, ctx) for u in uploads]
    keys = [idempotency_key(u, _content_ids(st)) for u, st in zip(uploads, staged)]
    study_key = hashlib.sha256(json.dumps(sorted(keys)).encode()).hexdigest()
    counters: dict[str, int] = {}
    with db.transaction() as s:
        return [_record(s, u, st, study_key=study_key, counters=counters,
                        bound_patient=ctx.bound_patient) for u, st in zip(uploads, staged)]


def _content_ids(staged: list[dict[str, Any]]) -> list[str]:
    return [a["sha256"] or f"url:{a['url']}" for a in staged]


def _record(s: Session, inbound: InboundUpload, staged: list[dict[str, Any]],
            study_key: str | None, counters: dict[str, int], bound_patient: str = "") -> Accepted:
    key = idempotency_key(inbound, _content_ids(staged))
    for a in staged:
        counters[a["kind"]] = counters.get(a["kind"], 0) + 1
        a["series_number"] = SERIES_NUMBER.get(a["kind"], 9)
        a["instance_number"] = counters[a["kind"]]
    replaced = None
    for old_id in inbound.description.replaces:
        replaced = s.get(Submission, old_id)
        if replaced is not None:
            break
    if study_key is None:
        study_key = replaced.study_key if replaced is not None and replaced.study_key else key
    # a Bundle entry arrives with the id its fullUrl was rewritten to (R4 http.html#trules)
    resource_id = str(inbound.extra.get("id") or uuid.uuid4())
    task_id = str(uuid.uuid4())
    resource = dict(inbound.resource)
    resource["id"] = resource_id
    first = staged[0]
    received_at = datetime.now(timezone.utc)
    s.add(Submission(
        id=resource_id,
        received_at=received_at,
        resource_type=inbound.resource_type,
        resource_json=json.dumps(resource),
        content_type=first["content_type"],
        blob_path=first["blob_path"],
        blob_sha256=first["sha256"],
        blob_size=first["size"],
        idempotency_key=key,
        study_key=study_key,
        attachments_json=json.dumps(staged),
        replaces_id=replaced.id if replaced is not None else "",
        bound_patient=bound_patient,
    ))
    s.flush()
    s.add(Task(id=task_id, submission_id=resource_id,
               focus=f"{inbound.resource_type}/{resource_id}", status="requested"))
    enqueue(s, UPLOAD_JOB, resource_id)
    return Accepted(inbound.resource_type, resource_id, task_id, received_at)


# --- conditional create (FHIR R4 http.html#ccreate) --------------------------------------------

CONDITIONAL_PARAMETERS = frozenset({"identifier"})


def conditional_criteria(raw: str) -> list[tuple[str, str]]:
    """`If-None-Exist` (or a Bundle entry's `request.ifNoneExist`): a search query without
    `?`. Only `identifier` (token: `system|value`, `|value`, `value`) is supported; any other
    parameter is refused with 400 rather than ignored (R4 search.html#errors)."""
    raw = raw.strip()
    if "?" in raw:  # `Media?identifier=…`: the query part only
        raw = raw.split("?", 1)[1]
    pairs = parse_qsl(raw, keep_blank_values=True)
    if not pairs:
        raise FhirError(400, "invalid", "If-None-Exist needs a search such as "
                        "identifier=system|value")
    for name, value in pairs:
        if name not in CONDITIONAL_PARAMETERS:
            raise FhirError(400, "not-supported", "If-None-Exist supports the identifier "
                            "parameter only (identifier=system|value)")
        if not all(v.rpartition("|")[2] for v in value.split(",")):
            raise FhirError(400, "invalid", "If-None-Exist identifier needs a value "
                            "(identifier=system|value)")
    return pairs


def _identifiers(resource: dict[str, Any]) -> list[tuple[str, str]]:
    """identifier (and DocumentReference.masterIdentifier): the `identifier` search param."""
    idents = resource.get("identifier")
    items = list(idents) if isinstance(idents, list) else []
    if isinstance(resource.get("masterIdentifier"), dict):
        items.append(resource["masterIdentifier"])
    return [(str(i.get("system") or ""), i["value"]) for i in items
            if isinstance(i, dict) and isinstance(i.get("value"), str)]


def _token_matches(token: str, idents: list[tuple[str, str]]) -> bool:
    """R4 search.html#token: `system|value`, `|value` (no system), `value` (any system)."""
    if "|" not in token:
        return any(v == token for _, v in idents)
    system, _, value = token.partition("|")
    return any(v == value and sys == system for sys, v in idents)


def _contains(text: str) -> str:
    """A LIKE pattern: `text` anywhere, its wildcards escaped (escape character `!`)."""
    return "%" + text.replace("!", "!!").replace("%", "!%").replace("_", "!_") + "%"


def find_existing(db: Database, resource_type: str, criteria: list[tuple[str, str]], *,
                  bound_patient: str = "") -> list[Submission]:
    """The uploads of `resource_type` matching conditional-create `criteria` (from
    `conditional_criteria`): repeated parameters AND, comma-separated values OR. With a
    patient-bound token (`bound_patient`), only that patient's uploads can match: another
    patient's upload is neither revealed nor counted (the create goes ahead as a new one)."""
    tokens = [value.split(",") for name, value in criteria if name == "identifier"]
    q = select(Submission).where(Submission.resource_type == resource_type)
    for alternatives in tokens:  # a cheap pre-filter on the stored JSON, checked exactly below
        q = q.where(or_(*[Submission.resource_json.like(
            _contains(json.dumps(t.rpartition("|")[2])), escape="!") for t in alternatives]))
    if bound_patient:  # uploaded with that patient's token, or stored under that patient
        stored = exists().where(StoredInstance.submission_id == Submission.id,
                                StoredInstance.patient_ref == bound_patient)
        q = q.where((Submission.bound_patient == bound_patient) | stored)
    with db.session() as s:
        rows = list(s.scalars(q.order_by(Submission.received_at)))
        s.expunge_all()
    return [sub for sub in rows
            if all(any(_token_matches(t, _identifiers(json.loads(sub.resource_json)))
                       for t in alts) for alts in tokens)]


def task_of(db: Database, submission_id: str) -> str:
    """The id of the Task that reports an upload's progress ("" if none)."""
    with db.session() as s:
        return s.scalar(select(Task.id).where(Task.submission_id == submission_id)) or ""
