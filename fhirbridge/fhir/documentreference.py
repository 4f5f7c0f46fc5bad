"""Inbound FHIR R4 DocumentReference (read with the R4B models, whose DocumentReference has
the R4 shape): each `content[].attachment` becomes one DICOM object — a PDF an Encapsulated
PDF, a photo a VL Photographic Image, a video a Video Photographic Image.

IHE MHD habits honoured: `context.sourcePatientInfo` (a contained Patient: what the patient
said, evidence only), `relatesTo` code `replaces` (this upload supersedes an earlier one),
`type`/`category`/`description` → DocumentTitle and SeriesDescription.
"""

from __future__ import annotations

import re
from typing import Any

from fhir.resources.R4B.documentreference import DocumentReference
from pydantic import ValidationError

from fhirbridge.fhir.jsonbody import load_json
from fhirbridge.fhir.outcome import FhirError
from fhirbridge.fhir.upload import (
    InboundUpload,
    UploadDescription,
    check_content,
    parse_datetime,
    pydantic_error,
    read_attachment,
    subject_claim,
)
from fhirbridge.identity.model import self_reported_from_fhir
from fhirbridge.media.kinds import MediaLimits

__all__ = ["describe_document_reference", "parse_document_reference",
           "parse_document_reference_resource"]


def parse_document_reference(raw: bytes, *, limits: MediaLimits | None = None,
                             probe_video: Any = None) -> InboundUpload:
    doc = load_json(raw, max_depth=(limits or MediaLimits()).max_json_depth)
    return parse_document_reference_resource(doc, limits=limits, probe_video=probe_video)


def parse_document_reference_resource(doc: Any, *, limits: MediaLimits | None = None,
                                      probe_video: Any = None) -> InboundUpload:
    limits = limits or MediaLimits()
    if not isinstance(doc, dict) or doc.get("resourceType") != "DocumentReference":
        raise FhirError(400, "structure", "body is not a FHIR DocumentReference resource")
    content = doc.get("content")
    if not isinstance(content, list) or not content:
        raise FhirError(422, "required", "DocumentReference.content is required (1..*)",
                        expression="DocumentReference.content")
    raw_attachments = []
    for i, item in enumerate(content):
        att = item.get("attachment") if isinstance(item, dict) else None
        if not isinstance(att, dict):
            raise FhirError(422, "required", f"DocumentReference.content[{i}].attachment is "
                            "required", expression=f"DocumentReference.content[{i}].attachment")
        raw_attachments.append((att, att.pop("data", None)))
    try:
        model = DocumentReference.model_validate(doc)
    except ValidationError as exc:
        raise pydantic_error(exc, "DocumentReference") from None
    if model.status == "entered-in-error":
        raise FhirError(422, "business-rule", "a DocumentReference entered-in-error is not "
                        "imported", expression="DocumentReference.status")
    attachments = []
    for i, (att, data_text) in enumerate(raw_attachments):
        parsed = read_attachment(att if data_text is None else {**att, "data": data_text},
                                 f"DocumentReference.content[{i}].attachment")
        if parsed.data is not None:
            check_content(parsed.data, parsed, limits, probe_video)
        attachments.append(parsed)
    return InboundUpload(resource_type="DocumentReference", resource=doc,
                         attachments=attachments, description=describe_document_reference(doc))


def _text_of(cc: Any) -> str:
    """CodeableConcept → human text: its text, else the first coding's display."""
    if not isinstance(cc, dict):
        return ""
    if isinstance(cc.get("text"), str) and cc["text"].strip():
        return cc["text"].strip()
    for c in cc.get("coding") or []:
        if isinstance(c, dict) and isinstance(c.get("display"), str) and c["display"].strip():
            return c["display"].strip()
    return ""


def describe_document_reference(doc: dict[str, Any]) -> UploadDescription:
    contained = {f"#{c.get('id')}": c for c in (doc.get("contained") or [])
                 if isinstance(c, dict) and c.get("resourceType") == "Patient"}
    context = doc.get("context") if isinstance(doc.get("context"), dict) else {}
    source = (context.get("sourcePatientInfo") or {}).get("reference") \
        if isinstance(context.get("sourcePatientInfo"), dict) else None
    patient = contained.get(source or "") or next(iter(contained.values()), None)
    first = next((c.get("attachment") for c in doc.get("content") or []
                  if isinstance(c, dict) and isinstance(c.get("attachment"), dict)), {})
    period = context.get("period") if isinstance(context.get("period"), dict) else {}
    created = (parse_datetime(first.get("creation")) or parse_datetime(period.get("start"))
               or parse_datetime(doc.get("date")))
    type_text = _text_of(doc.get("type"))
    category = next((t for t in (_text_of(c) for c in doc.get("category") or []) if t), "")
    description = doc.get("description") if isinstance(doc.get("description"), str) else ""
    replaces = []
    for rel in doc.get("relatesTo") or []:
        if not isinstance(rel, dict) or rel.get("code") != "replaces":
            continue
        ref = (rel.get("target") or {}).get("reference", "")
        m = re.search(r"(?:^|/)DocumentReference/([A-Za-z0-9\-.]{1,64})$", str(ref))
        if m:
            replaces.append(m.group(1))
    idents = [doc["masterIdentifier"]] if isinstance(doc.get("masterIdentifier"), dict) else []
    idents += [i for i in doc.get("identifier") or [] if isinstance(i, dict)]
    return UploadDescription(
        claim=subject_claim(doc.get("subject"), "DocumentReference.subject"),
        self_reported=self_reported_from_fhir(patient) if patient else None,
        created=created,
        notes=(description,) if description else (),
        identifiers=tuple((str(i.get("system", "")), str(i.get("value", ""))) for i in idents),
        document_title=(description or type_text)[:64],
        series_description=(category or type_text)[:64],
        replaces=tuple(replaces),
    )
