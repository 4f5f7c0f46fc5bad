"""What every upload shares, whatever resource carries it (FHIR R4 Media, DocumentReference,
Binary in a Bundle): attachments (R4 Attachment, att-1), the subject claim, what the patient
said about themselves, anatomy, device, capture time — and the checks the R4B parser does not
make (strict base64, magic bytes against contentType, size and SHA-1 hash).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pybase64
from pydantic import ValidationError

from fhirbridge.dicom.context import CodedConcept
from fhirbridge.fhir.outcome import FhirError
from fhirbridge.identity.model import Identifier, SelfReported, SubjectClaim
from fhirbridge.media.errors import MediaError
from fhirbridge.media.kinds import ACCEPTED_TYPES, PDF, PHOTO, VIDEO, MediaLimits, kind_of
from fhirbridge.media.sniff import content_type_matches, normalize_content_type, sniff_content_type

SNOMED = "http://snomed.info/sct"
# SNOMED CT laterality qualifiers (272741003 |Laterality|) -> DICOM ImageLaterality
LATERALITY = {"7771000": "L", "24028007": "R", "51440002": "B"}


@dataclass(frozen=True)
class UploadDescription:
    """What the pipeline takes from an upload besides its bytes; re-derivable from the stored
    JSON (describe_media / describe_document_reference)."""

    claim: SubjectClaim
    self_reported: SelfReported | None
    created: datetime | None = None
    body_site: CodedConcept | None = None
    laterality: str = ""
    device_make: str = ""
    device_model: str = ""
    notes: tuple[str, ...] = ()
    identifiers: tuple[tuple[str, str], ...] = ()
    document_title: str = ""  # DocumentReference type/description -> DocumentTitle
    series_description: str = ""  # DocumentReference category/type -> SeriesDescription
    replaces: tuple[str, ...] = ()  # DocumentReference.relatesTo replaces -> ids it supersedes


MediaDescription = UploadDescription  # the name the photo pipeline grew up with


@dataclass
class InboundAttachment:
    """One attachment: its bytes (inline data) or where to get them (url)."""

    content_type: str  # normalised
    expression: str  # FHIRPath of the attachment, for error texts
    data: bytes | None = None
    url: str = ""
    size: int | None = None
    sha1: Any = None
    title: str = ""
    creation: datetime | None = None

    @property
    def kind(self) -> str:
        return kind_of(self.content_type) or ""


@dataclass
class InboundUpload:
    """A parsed, checked upload: its JSON (attachment data removed) and its attachments."""

    resource_type: str
    resource: dict[str, Any]
    attachments: list[InboundAttachment]
    description: UploadDescription
    full_url: str = ""  # Bundle.entry.fullUrl, for references inside a Bundle
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def claim(self) -> SubjectClaim:
        return self.description.claim

    @property
    def identifiers(self) -> tuple[tuple[str, str], ...]:
        return self.description.identifiers

    # The single-attachment view (Media has exactly one).
    @property
    def data(self) -> bytes:
        return self.attachments[0].data or b""

    @property
    def content_type(self) -> str:
        return self.attachments[0].content_type


InboundMedia = InboundUpload


def read_attachment(att: Any, expression: str, *, allow_url: bool = True) -> InboundAttachment:
    """An R4 Attachment (raw JSON dict, `data` still present) → InboundAttachment. `data` is
    decoded strictly here; a `url` is kept for the intake to resolve (Binary/{id}, urn:uuid
    in a Bundle, an EHR URL)."""
    if not isinstance(att, dict):
        raise FhirError(400, "structure", f"{expression} must be an Attachment",
                        expression=expression)
    declared = normalize_content_type(att.get("contentType"))
    if not declared:
        raise FhirError(422, "required", f"{expression}.contentType is required (att-1)",
                        expression=f"{expression}.contentType")
    if declared not in ACCEPTED_TYPES:
        raise FhirError(415, "not-supported", "contentType is not accepted; accepted types: "
                        f"{', '.join(ACCEPTED_TYPES)}", expression=f"{expression}.contentType")
    data_text = att.get("data")
    url = att.get("url")
    data: bytes | None = None
    if data_text is not None:
        if not isinstance(data_text, str):
            raise FhirError(400, "structure", f"{expression}.data must be a base64 string",
                            expression=f"{expression}.data")
        data = strict_b64decode(data_text, expression=f"{expression}.data")
    elif isinstance(url, str) and url.strip() and allow_url:
        url = url.strip()
    else:
        raise FhirError(422, "required", f"{expression} needs data (base64) or a url "
                        "(Binary/{id} or an allowed EHR address)", expression=expression)
    size = att.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise FhirError(400, "invalid", f"{expression}.size must be an unsigned integer",
                        expression=f"{expression}.size")
    title = att.get("title")
    return InboundAttachment(
        content_type=declared, expression=expression, data=data,
        url=url if data is None and isinstance(url, str) else "",
        size=size, sha1=att.get("hash"),
        # Attachment.title is often the phone's file name: never copied into DICOM.
        title=str(title)[:64] if isinstance(title, str) else "",
        creation=parse_datetime(att.get("creation")),
    )


def check_content(data: bytes, att: InboundAttachment, limits: MediaLimits,
                  probe_video: Any = None) -> None:
    """The checks made before 201, on the bytes themselves: type by magic, size and hash,
    then the cheap per-kind checks (photo header and pixel limits, PDF structure, the video's
    container and codec). Raises FhirError (415 wrong or unaccepted type, 422 otherwise)."""
    check_attachment_bytes(data, att.content_type, att.size, att.sha1, att.expression)
    try:
        if att.kind == PHOTO:
            from fhirbridge.media.photo import check_photo

            check_photo(data, att.content_type, max_pixels=limits.max_pixels,
                        min_side=limits.min_side, max_decoded_bytes=limits.max_decoded_bytes)
        elif att.kind == PDF:
            from fhirbridge.media.pdf import check_pdf

            if len(data) > limits.max_pdf_bytes:
                raise MediaError("too-large", f"PDF is larger than {limits.max_pdf_bytes} bytes")
            check_pdf(data)
        elif att.kind == VIDEO and probe_video is not None:
            probe_video(data)
    except MediaError as exc:
        raise media_error(exc, f"{att.expression}.data") from None


def media_error(exc: MediaError, expression: str) -> FhirError:
    status = 415 if exc.code in ("unsupported-type", "type-mismatch", "unsupported-codec") \
        else 422
    return FhirError(status, "invalid", f"{exc.code}: {exc.text}", expression=expression)


def strict_b64decode(text: str, *, expression: str) -> bytes:
    """RFC 4648 base64 with padding; the R4B parser accepts base64url and junk (decoded as
    zeros or nothing), so decode strictly ourselves: pybase64 (SIMD) with `validate=True`
    refuses any character outside the alphabet and bad or excess padding. Whitespace
    (allowed by FHIR base64Binary) is removed, and the text decoded again, only when the
    strict decode failed, so the common case is one pass."""
    try:
        data = pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        data = b""
        if any(ws in text for ws in (" ", "\n", "\r", "\t")):
            try:
                data = pybase64.b64decode("".join(text.split()), validate=True)
            except (binascii.Error, ValueError):
                data = b""
    if data:
        return data
    raise FhirError(400, "invalid", "attachment data is not valid base64", expression=expression)


def pydantic_error(exc: ValidationError, resource_type: str) -> FhirError:
    """Report where the resource is wrong, without the offending values (they may be PHI)."""
    locs = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if not str(p).startswith("function"))
        locs.append(f"{loc or resource_type}: {err.get('type', 'invalid')}")
    return FhirError(400, "structure", f"{resource_type} is not valid FHIR R4: " + "; ".join(locs),
                     expression=resource_type)



def parse_datetime(value: Any) -> datetime | None:
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
    declared = normalize_content_type(declared)
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
