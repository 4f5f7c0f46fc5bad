"""Upload Bundles (FHIR R4 3.1.0.11 transaction / batch): entries of Media, DocumentReference
and Binary, for one patient, become one study (a series per kind).

transaction: all or nothing — any bad entry refuses the whole Bundle, nothing is stored.
batch: each entry on its own; the response carries each entry's outcome.
A Binary entry is referenced from an attachment `url` by its `fullUrl` (urn:uuid:…).
R4 http.html#trules: every entry gets its server id first, and every reference to another
entry's `fullUrl` (Reference.reference, Attachment.url) is rewritten to that id before
anything is stored; a `urn:uuid:` no entry declares is refused.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from fhirbridge.fhir.documentreference import parse_document_reference_resource
from fhirbridge.fhir.jsonbody import load_json
from fhirbridge.fhir.media import parse_media_resource
from fhirbridge.fhir.outcome import FhirError, operation_outcome
from fhirbridge.fhir.upload import InboundUpload, strict_b64decode
from fhirbridge.media.kinds import ACCEPTED_TYPES, MediaLimits
from fhirbridge.media.sniff import content_type_matches, normalize_content_type, sniff_content_type

__all__ = ["BinaryEntry", "UploadBundle", "parse_bundle", "response_bundle"]

_UPLOAD_TYPES = ("Media", "DocumentReference")


@dataclass
class BinaryEntry:
    full_url: str
    content_type: str
    data: bytes
    id: str = ""  # the server id (BinaryRecord.id) this Bundle gives the Binary


@dataclass
class UploadBundle:
    type: str  # transaction | batch
    entries: list[InboundUpload | BinaryEntry | FhirError]  # in Bundle order
    full_urls: list[str] = field(default_factory=list)


def parse_bundle(raw: bytes, *, limits: MediaLimits | None = None,
                 probe_video: Any = None) -> UploadBundle:
    limits = limits or MediaLimits()
    doc = load_json(raw, max_depth=limits.max_json_depth)
    if not isinstance(doc, dict) or doc.get("resourceType") != "Bundle":
        raise FhirError(400, "structure", "POST /fhir takes a Bundle")
    kind = doc.get("type")
    if kind not in ("transaction", "batch"):
        raise FhirError(422, "not-supported", "Bundle.type must be transaction or batch",
                        expression="Bundle.type")
    raw_entries = doc.get("entry")
    if not isinstance(raw_entries, list) or not raw_entries:
        raise FhirError(422, "required", "the Bundle has no entries", expression="Bundle.entry")
    if len(raw_entries) > limits.max_bundle_entries:
        # before any entry is decoded or staged: a 10,000-entry Bundle costs one count
        raise FhirError(413, "too-long", f"the Bundle has {len(raw_entries)} entries; at most "
                        f"{limits.max_bundle_entries} are accepted (http.max_bundle_entries)",
                        expression="Bundle.entry")
    out = UploadBundle(type=kind, entries=[])
    ids = _server_ids(raw_entries)
    for i, entry in enumerate(raw_entries):
        where = f"Bundle.entry[{i}]"
        full_url = entry.get("fullUrl", "") if isinstance(entry, dict) else ""
        out.full_urls.append(full_url if isinstance(full_url, str) else "")
        try:
            out.entries.append(_entry(entry, where, limits, probe_video, ids))
        except FhirError as exc:
            if kind == "transaction":
                raise FhirError(exc.status, exc.code, f"{where}: {exc.text}",
                                expression=exc.expression or where) from None
            out.entries.append(exc)
    _fail_dangling(out, raw_entries, ids)
    uploads = [e for e in out.entries if isinstance(e, InboundUpload)]
    if not uploads and kind == "transaction":
        raise FhirError(422, "required", "the Bundle holds no Media or DocumentReference")
    _one_patient(uploads)
    return out


def _server_ids(raw_entries: list[Any]) -> dict[str, str]:
    """fullUrl → `Type/{server id}` for every create entry of a type we store (R4
    http.html#trules: ids are assigned before references are resolved). A fullUrl two
    entries share names neither (bdl-7): references to it stay unresolved."""
    ids: dict[str, str] = {}
    seen: set[str] = set()
    for entry in raw_entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
            continue
        full_url = entry.get("fullUrl")
        rtype = entry["resource"].get("resourceType")
        if not isinstance(full_url, str) or not full_url:
            continue
        if full_url in seen:
            ids.pop(full_url, None)
            continue
        seen.add(full_url)
        if rtype == "Binary":
            ids[full_url] = f"Binary/{uuid.uuid4().hex}"  # BinaryRecord ids: 32 hex digits
        elif rtype in _UPLOAD_TYPES:
            ids[full_url] = f"{rtype}/{uuid.uuid4()}"  # Submission ids
    return ids


def _rewrite(node: Any, ids: dict[str, str], where: str) -> Any:
    """`node` with every Reference.reference / Attachment.url that names an entry's fullUrl
    replaced by that entry's `Type/{id}`; a `urn:uuid:` no entry declares → 400."""
    if isinstance(node, list):
        return [_rewrite(v, ids, where) for v in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("reference", "url") and isinstance(value, str):
            if value in ids:
                value = ids[value]
            elif value.startswith("urn:uuid:"):
                raise FhirError(400, "not-found", "a reference names a urn:uuid that is not "
                                "the fullUrl of any (single) entry of this Bundle",
                                expression=where)
            out[key] = value
        else:
            out[key] = _rewrite(value, ids, where)
    return out


def _entry(entry: Any, where: str, limits: MediaLimits | None,
           probe_video: Any, ids: dict[str, str] | None = None) -> InboundUpload | BinaryEntry:
    if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
        raise FhirError(400, "structure", "entry has no resource", expression=where)
    request = entry.get("request")
    if not isinstance(request, dict) or request.get("method") != "POST":
        raise FhirError(422, "not-supported", "only POST (create) entries are accepted",
                        expression=f"{where}.request.method")
    ids = ids or {}
    full_url = str(entry.get("fullUrl") or "")
    rtype = entry["resource"].get("resourceType")
    if rtype == "Binary":
        binary = _binary(entry["resource"], full_url, where)
        binary.id = ids.get(full_url, f"Binary/{uuid.uuid4().hex}").removeprefix("Binary/")
        return binary
    # references are rewritten before the resource is parsed, checked or stored
    resource = _rewrite(entry["resource"], ids, f"{where}.resource")
    if rtype not in _UPLOAD_TYPES:
        raise FhirError(422, "not-supported", "entries must be Media, DocumentReference or "
                        "Binary", expression=f"{where}.resource")
    if rtype == "Media":
        upload = parse_media_resource(resource, limits=limits, probe_video=probe_video)
    else:
        upload = parse_document_reference_resource(resource, limits=limits,
                                                   probe_video=probe_video)
    upload.full_url = full_url
    if isinstance(request.get("ifNoneExist"), str):  # conditional create (R4 http.html#trules)
        upload.extra["if_none_exist"] = request["ifNoneExist"]
    if full_url in ids:  # the id other entries' references were rewritten to
        upload.extra["id"] = ids[full_url].split("/", 1)[1]
    return upload


def _binary(resource: dict[str, Any], full_url: str, where: str) -> BinaryEntry:
    ctype = normalize_content_type(resource.get("contentType"))
    if ctype not in ACCEPTED_TYPES:
        raise FhirError(415, "not-supported", "Binary.contentType is not accepted; accepted "
                        f"types: {', '.join(ACCEPTED_TYPES)}", expression=f"{where}.resource")
    if not full_url:
        raise FhirError(422, "required", "a Binary entry needs a fullUrl to be referenced",
                        expression=f"{where}.fullUrl")
    text = resource.get("data")
    if not isinstance(text, str):
        raise FhirError(422, "required", "Binary.data is required", expression=f"{where}.resource")
    data = strict_b64decode(text, expression=f"{where}.resource.data")
    if not content_type_matches(ctype, sniff_content_type(data)):
        raise FhirError(415, "invalid", f"Binary bytes are not {ctype}",
                        expression=f"{where}.resource.contentType")
    return BinaryEntry(full_url=full_url, content_type=ctype, data=data)


def _fail_dangling(out: UploadBundle, raw_entries: list[Any], ids: dict[str, str]) -> None:
    """batch: an entry whose attachment names a Binary entry that failed fails too (its
    rewritten `Binary/{id}` would name nothing we hold)."""
    failed = {ids[u] for u, e in zip(out.full_urls, out.entries)
              if isinstance(e, FhirError) and u in ids}
    if not failed:
        return
    for i, e in enumerate(out.entries):
        if isinstance(e, InboundUpload) and any(a.url in failed for a in e.attachments):
            out.entries[i] = FhirError(400, "processing", f"Bundle.entry[{i}]: its attachment "
                                       "names an entry of this batch that failed",
                                       expression=f"Bundle.entry[{i}]")


def _one_patient(uploads: list[InboundUpload]) -> None:
    """One upload Bundle = one patient = one study."""
    claims = {(u.claim.reference, u.claim.identifier) for u in uploads}
    if len(claims) > 1:
        raise FhirError(422, "business-rule", "every entry of an upload Bundle must name the "
                        "same patient (the same subject)", expression="Bundle.entry")


def response_bundle(kind: str, results: list[dict[str, Any] | FhirError]) -> dict[str, Any]:
    """transaction-response / batch-response: one entry per request entry, in order."""
    entries = []
    for r in results:
        if isinstance(r, FhirError):
            entries.append({"response": {
                "status": str(r.status),
                "outcome": operation_outcome(r.code, r.text, expression=r.expression)}})
        else:
            entries.append({"response": r})
    return {"resourceType": "Bundle", "type": f"{kind}-response", "entry": entries}
