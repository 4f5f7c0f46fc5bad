"""`POST /fhir/Binary` and `GET /fhir/Binary/{id}`: raw attachment bytes, streamed to disk.

FHIR R4 http.html#binary: a non-FHIR Content-Type means the body is the content itself; with
`application/fhir+json` the body is a Binary resource (base64 `data`, `contentType`). A plain
read returns the raw content with its Content-Type; `Accept: application/fhir+json` the resource.
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, Response
from starlette.requests import ClientDisconnect

from fhirbridge.adapters.blobs import BlobTooLarge
from fhirbridge.api.auth import Caller, note_audit, require_scope
from fhirbridge.api.deps import services_of
from fhirbridge.api.responses import fhir_response, version_headers
from fhirbridge.fhir.jsonbody import load_json
from fhirbridge.fhir.media import strict_b64decode
from fhirbridge.fhir.outcome import FhirError
from fhirbridge.media.kinds import ACCEPTED_TYPES
from fhirbridge.media.sniff import (
    content_type_matches,
    normalize_content_type,
    sniff_content_type,
)
from fhirbridge.store.db import Database
from fhirbridge.store.models import BinaryRecord

router = APIRouter()

PATH = "/fhir/Binary"
SETTING = "media.max_binary_bytes"  # the limit of raw bodies on PATH (api.limits.BodySizeLimit)
SNIFF_BYTES = 4096  # what sniff_content_type looks at (an ISO BMFF ftyp box fits)
INLINE_DATA_MAX = 1024 * 1024  # Binary JSON read: `data` inline up to this size, else left out
_JSON_TYPES = ("application/fhir+json", "application/json")
_BINARY_ELEMENTS = {"resourceType", "id", "meta", "implicitRules", "language", "contentType",
                    "securityContext", "data"}
_ID = re.compile(r"^[0-9a-f]{32}$")
_MEDIA_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}$")


def raw_limits(max_binary_bytes: int) -> dict[str, tuple[int, str]]:
    """For `BodySizeLimit(raw_limits=…)`: raw Binary bodies have their own limit."""
    return {PATH: (max_binary_bytes, SETTING)}


def find_binary(db: Database, binary_id: str) -> BinaryRecord | None:
    """The Binary we hold with this id (for `Binary/{id}` attachment URLs), or None."""
    if not _ID.match(binary_id):
        return None
    with db.session() as s:
        return s.get(BinaryRecord, binary_id)


@router.post(PATH)
async def create_binary(request: Request,
                        caller: Caller = Depends(require_scope("Binary", "c"))) -> Response:
    svc = services_of(request)
    declared = normalize_content_type(request.headers.get("content-type"))
    if declared in _JSON_TYPES:
        content_type, data = _parse_binary_json(await request.body(),
                                                max_depth=svc.settings.http.max_json_depth)
        _check_accepted(content_type)
        _check_sniffed(content_type, sniff_content_type(data[:SNIFF_BYTES]))
        rel, digest = await svc.run_sync(svc.blobs.put, data)
        size = len(data)
    else:
        content_type = declared
        _check_accepted(content_type)  # before reading a byte of the body
        try:
            rel, digest, size = await svc.blobs.put_stream(
                _sniffed(request.stream(), content_type),
                max_bytes=svc.settings.media.max_binary_bytes)
        except BlobTooLarge:
            raise FhirError(413, "too-long",
                            f"Binary exceeds the configured limit ({SETTING})") from None
        except ClientDisconnect:
            raise FhirError(400, "incomplete",
                            "the client went away before the body ended") from None
    record = BinaryRecord(id=uuid.uuid4().hex, content_type=content_type, blob_path=rel,
                          sha256=digest, size=size, bound_patient=caller.bound_patient)
    await svc.run_sync(_insert, svc.db, record)
    note_audit(request, f"Binary/{record.id}", caller.bound_patient)
    base = svc.settings.fhir_base_url
    return fhir_response(_resource(record), 201, headers={
        "Location": f"{base}/Binary/{record.id}",
        **version_headers("1", record.created_at)})


@router.get(PATH + "/{binary_id}")
async def read_binary(binary_id: str, request: Request,
                      caller: Caller = Depends(require_scope("Binary", "r"))) -> Response:
    svc = services_of(request)
    record = await svc.run_sync(find_binary, svc.db, binary_id)
    if record is not None and caller.patient and record.bound_patient != caller.bound_patient:
        record = None  # not posted with this patient's token: as if it did not exist
    if record is None:
        raise FhirError(404, "not-found", "no such Binary")
    note_audit(request, f"Binary/{record.id}", record.bound_patient)
    if _wants_fhir(request):
        resource = _resource(record)
        if record.size <= INLINE_DATA_MAX:
            data = await svc.run_sync(svc.blobs.get, record.blob_path)
            resource["data"] = base64.b64encode(data).decode("ascii")
        return fhir_response(resource, headers=version_headers("1", record.created_at))
    path = svc.blobs.path(record.blob_path)
    if not path.is_file():
        raise FhirError(404, "not-found", "the content of this Binary is no longer held")
    return FileResponse(path, media_type=record.content_type, headers={
        "ETag": f'"{record.sha256}"',
        "Last-Modified": version_headers("1", record.created_at)["Last-Modified"]})


# --- helpers -----------------------------------------------------------------------------------

def _insert(db: Database, record: BinaryRecord) -> None:
    with db.transaction() as s:
        s.add(record)
        s.flush()
        s.expunge(record)


def _resource(record: BinaryRecord) -> dict[str, Any]:
    """Binary without `data` (the bytes are at the same URL with a non-FHIR Accept)."""
    return {"resourceType": "Binary", "id": record.id,
            "meta": {"versionId": "1", "lastUpdated": _instant(record.created_at)},
            "contentType": record.content_type}


def _instant(dt: datetime) -> str:
    if dt.tzinfo is None:  # SQLite gives naive datetimes back; they were written in UTC
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _wants_fhir(request: Request) -> bool:
    fmt = request.query_params.get("_format", "")
    if fmt in ("json", "application/json", "application/fhir+json"):
        return True
    accept = [normalize_content_type(a) for a in request.headers.get("accept", "").split(",")]
    return any(a in _JSON_TYPES for a in accept)


def _check_accepted(content_type: str) -> None:
    if content_type not in ACCEPTED_TYPES:
        named = content_type if _MEDIA_TYPE.match(content_type) else "this content type"
        if not content_type:
            named = "a body without Content-Type"
        raise FhirError(415, "not-supported", f"unsupported-type: {named} is not accepted; "
                        f"accepted types: {', '.join(ACCEPTED_TYPES)}")


def _check_sniffed(declared: str, sniffed: str | None) -> None:
    if not content_type_matches(declared, sniffed):
        what = f"look like {sniffed}" if sniffed else "are no type we recognise"
        raise FhirError(422, "invalid", f"type-mismatch: the bytes {what}, not the declared "
                        f"{declared}", expression="Binary.contentType")


async def _sniffed(chunks: AsyncIterator[bytes], declared: str) -> AsyncIterator[bytes]:
    """The body's chunks, once its first bytes are checked against the declared type."""
    head = b""
    checked = False
    async for chunk in chunks:
        if checked:
            yield chunk
            continue
        head += chunk
        if len(head) >= SNIFF_BYTES:
            _check_sniffed(declared, sniff_content_type(head[:SNIFF_BYTES]))
            checked = True
            yield head
            head = b""
    if not checked:  # the whole body was shorter than SNIFF_BYTES
        if not head:
            raise FhirError(400, "required", "empty body: a Binary needs content")
        _check_sniffed(declared, sniff_content_type(head))
        yield head


def _parse_binary_json(raw: bytes, *, max_depth: int) -> tuple[str, bytes]:
    """A Binary resource (FHIR JSON): (normalised contentType, decoded data)."""
    doc = load_json(raw, max_depth=max_depth)
    if not isinstance(doc, dict) or doc.get("resourceType") != "Binary":
        raise FhirError(400, "structure", "expected a FHIR Binary resource", expression="Binary")
    unknown = sorted(k for k in doc if k not in _BINARY_ELEMENTS and not k.startswith("_"))
    if unknown:
        names = ", ".join(k for k in unknown[:5] if re.fullmatch(r"[A-Za-z]{1,64}", k))
        raise FhirError(400, "structure", f"Binary has unknown elements: {names or '?'}",
                        expression="Binary")
    content_type, data = doc.get("contentType"), doc.get("data")
    if not isinstance(content_type, str) or not content_type:
        raise FhirError(400, "required", "Binary.contentType is required",
                        expression="Binary.contentType")
    if not isinstance(data, str) or not data:
        raise FhirError(400, "required", "Binary.data is required (base64)",
                        expression="Binary.data")
    return normalize_content_type(content_type), strict_b64decode(data, expression="Binary.data")
