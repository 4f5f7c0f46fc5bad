"""`GET /fhir/ImagingStudy?patient=…&identifier=…` and `/fhir/ImagingStudy/{id}`: the studies
fhirbridge wrote (FHIR R4 ImagingStudy search parameters patient, subject, identifier).

SMART scopes `ImagingStudy.r` / `.s`; a patient-bound token sees its patient's studies only."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy import func, or_, select

from fhirbridge.api.auth import Caller, note_audit, require_scope
from fhirbridge.api.deps import services_of
from fhirbridge.api.responses import fhir_response
from fhirbridge.api.search import (
    count_of,
    date_clause,
    keyset_page,
    page_links,
    patient_reference,
    self_link,
    supported_parameters,
    values_of,
)
from fhirbridge.fhir.outcome import FhirError
from fhirbridge.fhir.task import searchset
from fhirbridge.store.models import ImagingStudyRecord

router = APIRouter()


@router.get("/fhir/ImagingStudy/{study_id}")
def read_study(study_id: str, request: Request,
               caller: Caller = Depends(require_scope("ImagingStudy", "r"))) -> Response:
    with services_of(request).db.session() as s:
        rec = s.get(ImagingStudyRecord, study_id)
    if rec is not None and caller.patient and rec.patient_ref != caller.bound_patient:
        rec = None  # another patient's study: as if it did not exist
    if rec is None:
        raise FhirError(404, "not-found", "no such ImagingStudy")
    note_audit(request, f"ImagingStudy/{rec.id}", rec.patient_ref)
    return fhir_response(json.loads(rec.resource_json))


STUDY_PARAMETERS = frozenset({"_id", "patient", "subject", "patient:identifier",
                              "subject:identifier", "identifier", "_lastUpdated", "_summary",
                              "_cursor"})


def _study_uid(value: str) -> str | None:
    """`urn:dicom:uid|urn:oid:1.2.3` (or a bare value) → the StudyInstanceUID; another
    identifier system matches nothing (None)."""
    system, _, uid = value.rpartition("|")
    if system and system != "urn:dicom:uid":
        return None
    return uid.removeprefix("urn:oid:")


@router.get("/fhir/ImagingStudy")
def search_studies(request: Request,
                   caller: Caller = Depends(require_scope("ImagingStudy", "s"))) -> Response:
    """R4 ImagingStudy search: `_id`, `patient`/`subject` (a reference, or `:identifier`
    system|value for a patient known from ADT only), `identifier` (the StudyInstanceUID),
    `_lastUpdated`; paged by `_count` with a `next` link (keyset on the id: studies written
    meanwhile never shift a page), and `previous`."""
    kept = supported_parameters(request, STUDY_PARAMETERS)
    col = ImagingStudyRecord
    where: list[Any] = []
    for values in values_of(kept, "_id"):
        where.append(col.id.in_(values))
    for name in ("patient", "subject"):
        for values in values_of(kept, name):
            where.append(col.patient_ref.in_([patient_reference(v) for v in values]))
        for values in values_of(kept, f"{name}:identifier"):
            where.append(col.patient_ref.in_(values))
    for values in values_of(kept, "identifier"):
        uids = [u for u in map(_study_uid, values) if u is not None]
        where.append(col.study_instance_uid.in_(uids))
    for values in values_of(kept, "_lastUpdated"):
        where.append(or_(*[date_clause(col.updated_at, v, "_lastUpdated") for v in values]))
    summary = values_of(kept, "_summary")
    if summary and summary != [["count"]]:
        raise FhirError(400, "not-supported", "_summary supports count only",
                        expression="_summary")
    if caller.patient:  # whatever the query says, only the token's patient
        where.append(col.patient_ref == caller.bound_patient)
    count = 0 if summary else count_of(kept)
    with services_of(request).db.session() as s:
        total = s.scalar(select(func.count()).select_from(col).where(*where)) or 0
        # keyset on the id: studies written meanwhile never shift a page
        rows, nxt, prev = keyset_page(s, select(col).where(*where), [col.id], False, kept,
                                      count, lambda row: [row[0].id])
    studies = [r[0] for r in rows]
    for r in studies:
        note_audit(request, f"ImagingStudy/{r.id}", r.patient_ref)
    base = services_of(request).settings.fhir_base_url
    bundle = searchset([json.loads(r.resource_json) for r in studies],
                       self_link(base, "ImagingStudy", kept), total=total, base=base)
    bundle["link"] += page_links(base, "ImagingStudy", kept, nxt, prev)
    return fhir_response(bundle)
