"""Inbound FHIR R4 Media: parse (fhir.resources R4B models), then check what the library
does not — strict base64, magic bytes against contentType, size and SHA-1 hash, the subject.

FHIR R4 Media (4.0.1), Attachment (att-1), Reference (logical reference by identifier).
"""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B.media import Media
from pydantic import ValidationError

from fhirbridge.fhir.jsonbody import load_json
from fhirbridge.fhir.outcome import FhirError
from fhirbridge.fhir.upload import (
    InboundMedia,
    InboundUpload,
    MediaDescription,
    UploadDescription,
    body_site_of,
    check_content,
    device_of,
    parse_datetime,
    pydantic_error,
    read_attachment,
    strict_b64decode,
    subject_claim,
)
from fhirbridge.identity.model import self_reported_from_fhir
from fhirbridge.media.kinds import PHOTO, VIDEO, MediaLimits

__all__ = ["InboundMedia", "MediaDescription", "describe_media", "parse_media",
           "parse_media_resource", "strict_b64decode"]

_EVENT_STATUS = ("preparation", "in-progress", "not-done", "on-hold", "stopped", "completed",
                 "entered-in-error", "unknown")


def parse_media(raw: bytes, *, limits: MediaLimits | None = None,
                probe_video: Any = None) -> InboundUpload:
    doc = load_json(raw, max_depth=(limits or MediaLimits()).max_json_depth)
    return parse_media_resource(doc, limits=limits, probe_video=probe_video)


def parse_media_resource(doc: Any, *, limits: MediaLimits | None = None,
                         probe_video: Any = None, expression: str = "Media") -> InboundUpload:
    """A Media as a JSON object (from a body or a Bundle entry) → a checked InboundUpload.
    Inline data is checked here; a `url` attachment is checked once its bytes are fetched."""
    limits = limits or MediaLimits()
    if not isinstance(doc, dict) or doc.get("resourceType") != "Media":
        raise FhirError(400, "structure", "body is not a FHIR Media resource")
    content = doc.get("content")
    if not isinstance(content, dict):
        raise FhirError(400, "structure", "Media.content is required and must be an Attachment",
                        expression="Media.content")
    data_text = content.pop("data", None)  # the bytes live in the blob store, not the JSON
    try:
        media = Media.model_validate(doc)
    except ValidationError as exc:
        raise pydantic_error(exc, "Media") from None
    att = read_attachment(content if data_text is None else {**content, "data": data_text},
                          f"{expression}.content")
    if media.status not in _EVENT_STATUS:
        raise FhirError(400, "code-invalid", "Media.status is not an EventStatus code",
                        expression="Media.status")
    if media.status == "entered-in-error":
        raise FhirError(422, "business-rule", "a Media entered-in-error is not imported",
                        expression="Media.status")
    if att.kind not in (PHOTO, VIDEO):
        raise FhirError(415, "not-supported", "a Media carries a photo or a video; send "
                        "documents (PDF) as a DocumentReference", expression=att.expression)
    if att.data is not None:
        check_content(att.data, att, limits, probe_video)
    return InboundUpload(resource_type="Media", resource=doc, attachments=[att],
                         description=describe_media(doc))


def describe_media(doc: dict[str, Any]) -> UploadDescription:
    """Subject claim, self-reported patient, capture time, anatomy and device of a Media."""
    contained = [c for c in (doc.get("contained") or []) if isinstance(c, dict)]
    body_site, laterality = body_site_of(doc.get("bodySite"))
    make, model = device_of(doc, contained)
    return UploadDescription(
        claim=subject_claim(doc.get("subject"), "Media.subject"),
        self_reported=next((self_reported_from_fhir(c) for c in contained
                            if c.get("resourceType") == "Patient"), None),
        created=parse_datetime(doc.get("createdDateTime")),
        body_site=body_site,
        laterality=laterality,
        device_make=make,
        device_model=model,
        notes=tuple(str(n["text"]) for n in (doc.get("note") or [])
                    if isinstance(n, dict) and n.get("text")),
        identifiers=tuple((str(i.get("system", "")), str(i.get("value", "")))
                          for i in (doc.get("identifier") or []) if isinstance(i, dict)),
    )
