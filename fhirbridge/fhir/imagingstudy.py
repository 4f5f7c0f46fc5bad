"""DICOM → FHIR R4 ImagingStudy mapping (FHIR R4 ImagingStudy, "DICOM mapping" notes).

identifier urn:dicom:uid / urn:oid:<StudyInstanceUID>; an Endpoint of connection type
dicom-wado-rs whose address is the WADO-RS base without a trailing slash.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fhirbridge.dicom.context import CodedConcept

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"
LATERALITY_SCT = {"L": ("7771000", "Left"), "R": ("24028007", "Right"),
                  "B": ("51440002", "Bilateral")}
MODALITY_DISPLAY = {"XC": "External-camera Photography", "DOC": "Document"}
# SNOMED CT 123037004 "Body structure": what a video's DICOM object must carry when no body
# site was given (its Anatomic Region Sequence is required, dicom/video.py). It says nothing,
# so the ImagingStudy leaves series.bodySite absent (unknown things stay absent).
UNSPECIFIED_BODY_SITE = "123037004"


@dataclass(frozen=True)
class InstanceSummary:
    """What ImagingStudy needs of one stored DICOM instance."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    series_number: int
    instance_number: int
    started: datetime | None = None
    series_description: str = ""
    study_description: str = ""
    body_site: CodedConcept | None = None
    laterality: str = ""
    title: str = ""


def study_identifier(study_instance_uid: str) -> dict[str, str]:
    return {"system": "urn:dicom:uid", "value": f"urn:oid:{study_instance_uid}"}


def study_identifier_token(study_instance_uid: str) -> str:
    """The search token for a conditional update: `urn:dicom:uid|urn:oid:<uid>`."""
    return f"urn:dicom:uid|urn:oid:{study_instance_uid}"


def imaging_study(instances: list[InstanceSummary], *, subject: dict[str, Any],
                  wado_rs_url: str = "", resource_id: str = "", note: str = "") -> dict[str, Any]:
    """Build one ImagingStudy (status available) from the instances of one study."""
    if not instances:
        raise ValueError("an ImagingStudy needs at least one instance")
    first = instances[0]
    series: dict[str, dict[str, Any]] = {}
    for inst in sorted(instances, key=lambda i: (i.series_number, i.instance_number)):
        s = series.get(inst.series_instance_uid)
        if s is None:
            s = {"uid": inst.series_instance_uid, "number": inst.series_number,
                 "modality": _coding(inst.modality), "numberOfInstances": 0, "instance": []}
            if inst.series_description:
                s["description"] = inst.series_description
            if inst.body_site is not None and inst.body_site.code != UNSPECIFIED_BODY_SITE:
                s["bodySite"] = {"system": SNOMED, "code": inst.body_site.code,
                                 "display": inst.body_site.meaning}
            if inst.laterality in LATERALITY_SCT:
                code, display = LATERALITY_SCT[inst.laterality]
                s["laterality"] = {"system": SNOMED, "code": code, "display": display}
            if inst.started is not None:
                s["started"] = _fhir_datetime(inst.started)
            series[inst.series_instance_uid] = s
        entry: dict[str, Any] = {
            "uid": inst.sop_instance_uid,
            "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{inst.sop_class_uid}"},
            "number": inst.instance_number,
        }
        if inst.title:
            entry["title"] = inst.title
        s["instance"].append(entry)
        s["numberOfInstances"] += 1
    modalities = {i.modality for i in instances}
    res: dict[str, Any] = {"resourceType": "ImagingStudy"}
    if resource_id:
        res["id"] = resource_id
    res.update({  # FHIR JSON order does not matter; this follows the R4 element order
        "identifier": [study_identifier(first.study_instance_uid)],
        "status": "available",
        "modality": [_coding(m) for m in sorted(modalities)],
        "subject": subject,
    })
    if wado_rs_url:  # a contained Endpoint keeps the conditional update self-contained
        res["contained"] = [wado_rs_endpoint(wado_rs_url, "wado-rs")]
    starts = [i.started for i in instances if i.started is not None]
    if starts:
        res["started"] = _fhir_datetime(min(starts))
    if wado_rs_url:
        res["endpoint"] = [{"reference": "#wado-rs"}]
    res["numberOfSeries"] = len(series)
    res["numberOfInstances"] = len(instances)
    if first.study_description:
        res["description"] = first.study_description
    if note:
        res["note"] = [{"text": note}]
    res["series"] = list(series.values())
    return res


def wado_rs_endpoint(address: str, resource_id: str) -> dict[str, Any]:
    """FHIR R4 Endpoint, connectionType dicom-wado-rs (endpoint-connection-type)."""
    return {
        "resourceType": "Endpoint",
        "id": resource_id,
        "status": "active",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "dicom-wado-rs",
        },
        "payloadType": [{"text": "DICOM WADO-RS"}],
        "payloadMimeType": ["application/dicom"],
        "address": address.rstrip("/"),
    }


def _coding(modality: str) -> dict[str, str]:
    c = {"system": DCM, "code": modality}
    if modality in MODALITY_DISPLAY:
        c["display"] = MODALITY_DISPLAY[modality]
    return c


def _fhir_datetime(dt: datetime) -> str:
    """FHIR dateTime: with a time it must carry a zone; naive values are taken as UTC."""
    if dt.tzinfo is None:
        return dt.isoformat(timespec="seconds") + "Z"
    return dt.isoformat(timespec="seconds")
