"""Inbound FHIR R4 Media: parse (fhir.resources R4B models), then check what the library
does not — strict base64, magic bytes against contentType, size and SHA-1 hash, the subject.

FHIR R4 Media (4.0.1), Attachment (att-1), Reference (logical reference by identifier).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fhir.resources.R4B.media import Media
from pydantic import ValidationError

from fhirbridge.dicom.context import CodedConcept
from fhirbridge.fhir.outcome import FhirError
from fhirbridge.identity.model import (
    Identifier,
    SelfReported,
    SubjectClaim,
    self_reported_from_fhir,
)
from fhirbridge.media.errors import MediaError
from fhirbridge.media.photo import check_photo
from fhirbridge.media.sniff import content_type_matches, sniff_content_type

ACCEPTED_TYPES = ("image/jpeg",)
SNOMED = "http://snomed.info/sct"
# SNOMED CT laterality qualifiers (272741003 |Laterality|) -> DICOM ImageLaterality
LATERALITY = {"7771000": "L", "24028007": "R", "51440002": "B"}


@dataclass(frozen=True)
class MediaDescription:
    """What the pipeline takes from a Media besides its bytes; re-derivable from stored JSON."""

    claim: SubjectClaim
    self_reported: SelfReported | None
    created: datetime | None = None
    body_site: CodedConcept | None = None
    laterality: str = ""
    device_make: str = ""
    device_model: str = ""
    notes: tuple[str, ...] = ()
    identifiers: tuple[tuple[str, str], ...] = ()


@dataclass
class InboundMedia:
    """A parsed, checked upload: the JSON (content.data removed) and the decoded bytes."""

    resource: dict[str, Any]
    data: bytes
    content_type: str
    description: MediaDescription

    @property
    def claim(self) -> SubjectClaim:
        return self.description.claim

    @property
    def identifiers(self) -> tuple[tuple[str, str], ...]:
        return self.description.identifiers


def strict_b64decode(text: str, *, expression: str) -> bytes:
    """RFC 4648 base64 with padding; the R4B parser accepts base64url and junk (decoded as
    zeros or nothing), so decode strictly ourselves: `validate=True` refuses any character
    outside the alphabet and bad padding. Whitespace (allowed by FHIR base64Binary) is
    removed first only when present, so the common case is one C-speed pass."""
    candidates = [text]
    if any(ws in text for ws in (" ", "\n", "\r", "\t")):
        candidates.append("".join(text.split()))
    for candidate in candidates:
        try:
            data = base64.b64decode(candidate, validate=True)
        except (binascii.Error, ValueError):
            continue
        if data:
            return data
    raise FhirError(400, "invalid", "attachment data is not valid base64", expression=expression)


def _pydantic_error(exc: ValidationError, resource_type: str) -> FhirError:
    """Report where the resource is wrong, without the offending values (they may be PHI)."""
    locs = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if not str(p).startswith("function"))
        locs.append(f"{loc or resource_type}: {err.get('type', 'invalid')}")
    return FhirError(400, "structure", f"{resource_type} is not valid FHIR R4: " + "; ".join(locs),
                     expression=resource_type)


def parse_media(raw: bytes, *, max_pixels: int = 89_478_485, min_side: int = 0) -> InboundMedia:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise FhirError(400, "structure", "body is not JSON") from None
    if not isinstance(doc, dict) or doc.get("resourceType") != "Media":
        raise FhirError(400, "structure", "body is not a FHIR Media resource")
    content = doc.get("content")
    if not isinstance(content, dict):
        raise FhirError(400, "required", "Media.content is required", expression="Media.content")
    data_text = content.pop("data", None)  # decode it ourselves, strictly, once
    try:
        media = Media.model_validate(doc)
    except ValidationError as exc:
        raise _pydantic_error(exc, "Media") from None
    if data_text is None:
        raise FhirError(422, "required", "Media.content.data is required (attachment URLs are "
                        "not accepted here)", expression="Media.content.data")
    if not isinstance(data_text, str):
        raise FhirError(400, "structure", "Media.content.data must be a base64 string",
                        expression="Media.content.data")
    data = strict_b64decode(data_text, expression="Media.content.data")
    att = media.content
    declared = (att.contentType or "").split(";")[0].strip().lower()
    if not declared:
        raise FhirError(422, "required", "Media.content.contentType is required (att-1)",
                        expression="Media.content.contentType")
    check_attachment_bytes(data, declared, att.size, att.hash, "Media.content")
    try:
        check_photo(data, declared, max_pixels=max_pixels, min_side=min_side)
    except MediaError as exc:
        status = 415 if exc.code in ("unsupported-type", "type-mismatch") else 422
        raise FhirError(status, "invalid", f"{exc.code}: {exc.text}",
                        expression="Media.content.data") from None
    if media.status not in ("preparation", "in-progress", "not-done", "on-hold", "stopped",
                            "completed", "entered-in-error", "unknown"):
        raise FhirError(400, "code-invalid", "Media.status is not an EventStatus code",
                        expression="Media.status")
    if media.status == "entered-in-error":
        raise FhirError(422, "business-rule", "a Media entered-in-error is not imported",
                        expression="Media.status")
    return InboundMedia(resource=doc, data=data, content_type=declared,
                        description=describe_media(doc))


def describe_media(doc: dict[str, Any]) -> MediaDescription:
    """Subject claim, self-reported patient, capture time, anatomy and device of a Media."""
    contained = [c for c in (doc.get("contained") or []) if isinstance(c, dict)]
    body_site, laterality = body_site_of(doc.get("bodySite"))
    make, model = device_of(doc, contained)
    created = _parse_datetime(doc.get("createdDateTime"))
    return MediaDescription(
        claim=subject_claim(doc.get("subject"), "Media.subject"),
        self_reported=next((self_reported_from_fhir(c) for c in contained
                            if c.get("resourceType") == "Patient"), None),
        created=created,
        body_site=body_site,
        laterality=laterality,
        device_make=make,
        device_model=model,
        notes=tuple(str(n["text"]) for n in (doc.get("note") or [])
                    if isinstance(n, dict) and n.get("text")),
        identifiers=tuple((str(i.get("system", "")), str(i.get("value", "")))
                          for i in (doc.get("identifier") or []) if isinstance(i, dict)),
    )


def _parse_datetime(value: Any) -> datetime | None:
    """FHIR dateTime with a time (the parser has checked it carries a zone); dates alone
    carry no time of capture and are ignored here."""
    if not isinstance(value, str) or "T" not in value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def check_attachment_bytes(data: bytes, declared: str, size: int | None, sha1_hash: Any,
                           expression: str) -> None:
    """Attachment.size and .hash (SHA-1, base64) must match; the bytes' magic must match
    contentType; only accepted types pass (415 with the list)."""
    if declared == "image/jpg":
        declared = "image/jpeg"
    if declared not in ACCEPTED_TYPES:
        raise FhirError(415, "not-supported", f"contentType is not accepted; accepted types: "
                        f"{', '.join(ACCEPTED_TYPES)}", expression=f"{expression}.contentType")
    if not data:
        raise FhirError(400, "invalid", "attachment data is empty", expression=f"{expression}.data")
    sniffed = sniff_content_type(data)
    if not content_type_matches(declared, sniffed):
        raise FhirError(415, "invalid", f"attachment bytes are not {declared} "
                        f"(they look like {sniffed or 'an unknown format'})",
                        expression=f"{expression}.contentType")
    if size is not None and int(size) != len(data):
        raise FhirError(422, "invalid", "Attachment.size does not match the decoded data length",
                        expression=f"{expression}.size")
    if sha1_hash:
        given = sha1_hash if isinstance(sha1_hash, (bytes, bytearray)) else str(sha1_hash).encode()
        try:
            expected = base64.b64decode(given, validate=True) if not isinstance(sha1_hash, bytes) \
                else bytes(sha1_hash)
        except (binascii.Error, ValueError):
            expected = b""
        if expected != hashlib.sha1(data).digest():
            raise FhirError(422, "invalid", "Attachment.hash does not match the SHA-1 of the data",
                            expression=f"{expression}.hash")


def subject_claim(subject: Any, expression: str) -> SubjectClaim:
    """`subject` names the EHR Patient by reference (`Patient/123`, or absolute) or by a
    logical identifier (system + value). A contained `#ref` alone is not a subject."""
    if not isinstance(subject, dict):
        raise FhirError(422, "required", f"{expression} is required and must name the patient",
                        expression=expression)
    ref = subject.get("reference")
    ident = subject.get("identifier")
    claim_ref: str | None = None
    claim_ident: Identifier | None = None
    if isinstance(ref, str) and ref and not ref.startswith("#"):
        m = re.search(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$", ref)
        if not m:
            raise FhirError(422, "invalid", f"{expression}.reference must reference a Patient",
                            expression=f"{expression}.reference")
        claim_ref = f"Patient/{m.group(1)}"
    if isinstance(ident, dict) and ident.get("system") and ident.get("value"):
        claim_ident = Identifier(system=str(ident["system"]), value=str(ident["value"]))
    elif isinstance(ident, dict):
        raise FhirError(422, "required", f"{expression}.identifier needs system and value",
                        expression=f"{expression}.identifier")
    if claim_ref is None and claim_ident is None:
        raise FhirError(422, "required", f"{expression} must reference the EHR Patient or give "
                        "its identifier", expression=expression)
    if subject.get("type") not in (None, "Patient"):
        raise FhirError(422, "invalid", f"{expression}.type must be Patient",
                        expression=f"{expression}.type")
    return SubjectClaim(reference=claim_ref, identifier=claim_ident)


def body_site_of(cc: Any) -> tuple[CodedConcept | None, str]:
    """FHIR bodySite (SNOMED CT) -> AnatomicRegionSequence code and ImageLaterality."""
    if not isinstance(cc, dict):
        return None, ""
    region: CodedConcept | None = None
    laterality = ""
    codings = list(cc.get("coding") or [])
    for ext in cc.get("extension") or []:
        v = ext.get("valueCodeableConcept") if isinstance(ext, dict) else None
        if isinstance(v, dict):
            codings.extend(v.get("coding") or [])
    for c in codings:
        if not isinstance(c, dict) or c.get("system") != SNOMED or not c.get("code"):
            continue
        code = str(c["code"])
        if code in LATERALITY:
            laterality = laterality or LATERALITY[code]
        elif region is None:
            region = CodedConcept(code=code, scheme="SCT",
                                  meaning=str(c.get("display") or cc.get("text") or code)[:64])
    return region, laterality


def device_of(doc: dict[str, Any], contained: list[dict[str, Any]]) -> tuple[str, str]:
    """Make and model from a contained Device (manufacturer, modelNumber) or deviceName."""
    ref = (doc.get("device") or {}).get("reference", "") if isinstance(doc.get("device"), dict) \
        else ""
    for c in contained:
        if c.get("resourceType") == "Device" and (not ref or ref == f"#{c.get('id')}"):
            names = c.get("deviceName") or []
            model = c.get("modelNumber") or (names[0].get("name") if names else "") or ""
            return str(c.get("manufacturer") or "")[:64], str(model)[:64]
    return "", str(doc.get("deviceName") or "")[:64]
