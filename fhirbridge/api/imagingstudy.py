"""`GET /fhir/ImagingStudy?patient=…&identifier=…` and `/fhir/ImagingStudy/{id}`: the studies
fhirbridge wrote (FHIR R4 ImagingStudy search parameters patient, subject, identifier).

SMART scopes `ImagingStudy.r` / `.s`; a patient-bound token sees its patient's studies only."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy import select

from fhirbridge.api.auth import Caller, note_audit, require_scope
from fhirbridge.api.deps import services_of
from fhirbridge.api.responses import fhir_response
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


@router.get("/fhir/ImagingStudy")
def search_studies(request: Request,
                   caller: Caller = Depends(require_scope("ImagingStudy", "s"))) -> Response:
    params = request.query_params
    q = select(ImagingStudyRecord).order_by(ImagingStudyRecord.updated_at.desc()).limit(1000)
    if caller.patient:  # whatever the query says, only the token's patient
        q = q.where(ImagingStudyRecord.patient_ref == caller.bound_patient)
    patient = params.get("patient") or params.get("subject")
    if patient:
        patient = patient.split("/fhir/")[-1]
        if not patient.startswith("Patient/"):
            patient = f"Patient/{patient}"
        q = q.where(ImagingStudyRecord.patient_ref == patient)
    by_ident = params.get("patient:identifier") or params.get("subject:identifier")
    if by_ident:
        q = q.where(ImagingStudyRecord.patient_ref == by_ident)
    ident = params.get("identifier")
    if ident:
        system, _, value = ident.rpartition("|")
        if system and system != "urn:dicom:uid":
            return fhir_response(searchset([], str(request.url)))
        uid = value.removeprefix("urn:oid:")
        q = q.where(ImagingStudyRecord.study_instance_uid == uid)
    known = {"patient", "subject", "patient:identifier", "subject:identifier", "identifier",
             "_count", "_format"}
    unknown = [k for k in params.keys() if k not in known]
    if unknown:
        raise FhirError(400, "not-supported", "unsupported search parameter(s): "
                        + ", ".join(sorted(unknown)[:5]))
    with services_of(request).db.session() as s:
        rows = list(s.scalars(q))
    for r in rows:
        note_audit(request, f"ImagingStudy/{r.id}", r.patient_ref)
    return fhir_response(searchset([json.loads(r.resource_json) for r in rows], str(request.url)))
