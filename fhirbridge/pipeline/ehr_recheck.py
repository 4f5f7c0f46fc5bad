"""Merges and demographic changes made at the EHR reach what we already stored.

An EHR does not tell us when it merges two Patients (FHIR R4 Patient.link `replaced-by`) or
corrects a name, birth date or sex. So the `ehr-recheck` job re-reads, at the EHR, every
Patient we stored images for; a Patient now `replaced-by` a survivor, or whose demographics
no longer match our objects, gets a correction job (fhirbridge.pipeline.corrections): the
objects are re-identified in the PACS and ImagingStudy.subject moves to the survivor.
An upload whose subject link leads to a survivor triggers the same check at once.
"""

from __future__ import annotations

import logging

from pathlib import Path

from sqlalchemy import select

from fhirbridge.dicom.correct import differs
from fhirbridge.identity.model import Identifier, PatientRecord, patient_record_from_fhir
from fhirbridge.pipeline.corrections import enqueue_correction, load_stored
from fhirbridge.pipeline.patient import _follow_links, identifier_in_domains
from fhirbridge.pipeline.process import EHR_RECHECK_JOB, Pipeline
from fhirbridge.pipeline.queue import ClaimedJob, enqueue
from fhirbridge.store.models import Job, StoredInstance

log = logging.getLogger("fhirbridge.pipeline")


def schedule_recheck(pipeline: Pipeline, refs: list[str] | None = None) -> bool:
    """Queue one recheck (all patients, or only `refs`) unless one for all is pending."""
    with pipeline.db.transaction(durable=False) as s:
        if refs is None:
            pending = s.scalar(select(Job.id).where(
                Job.kind == EHR_RECHECK_JOB, Job.subject_id == "all",
                Job.state.in_(("queued", "running"))).limit(1))
            if pending is not None:
                return False
        enqueue(s, EHR_RECHECK_JOB, "all" if refs is None else "some",
                {"refs": refs} if refs is not None else {})
    return True


def recheck(pipeline: Pipeline, job: ClaimedJob) -> str:
    """Compare each stored patient with the EHR's current Patient; queue corrections."""
    ehr = pipeline.ehr
    if ehr is not None:
        with pipeline.db.session() as s:
            query = select(StoredInstance.patient_ref).distinct()
            refs = job.payload.get("refs")
            if refs:
                query = query.where(StoredInstance.patient_ref.in_(refs))
            stored_refs = [r for r in s.scalars(query) if r.startswith("Patient/")]
        for ref in stored_refs:
            check_patient(pipeline, ref)  # EhrUnavailable: the job is retried
    with pipeline.db.transaction(durable=False) as s:
        pipeline.queue.complete(s, job)
    return "done"


def check_patient(pipeline: Pipeline, ref: str) -> bool:
    """True when a correction was queued for the objects stored under `ref`."""
    ehr = pipeline.ehr
    assert ehr is not None
    found = ehr.read_patient(ref)
    if found is None:
        return False  # gone from the EHR: a person must decide; nothing is moved
    record = patient_record_from_fhir(found, base_url=ehr.base)
    target = _survivor(pipeline, record) if record.replaced_by else record
    if target is None:
        log.warning("stored patient is replaced-by a Patient that cannot be read; not moved")
        return False
    systems = [d.fhir_system for d in pipeline.options.domains]
    new = identifier_in_domains(target, systems)
    if new is None:
        return False
    with pipeline.db.session() as s:
        rows = list(s.scalars(select(StoredInstance).where(StoredInstance.patient_ref == ref)))
    if not rows:
        return False
    if target.ref == ref:
        wanted = pipeline.demographics(target)
        # built copies kept ([retention] keep_files) are read; else one object per patient is
        # retrieved from the PACS (they are corrected together, so they agree)
        sample = [r for r in rows if r.file_path and Path(r.file_path).is_file()] or rows[:1]
        if wanted is None or not any(
                differs(load_stored(pipeline, r, header_only=True), wanted) for r in sample):
            return False
        reason = "EHR demographics update"
    else:
        reason = "EHR Patient replaced-by"
    system_of = {d.dicom_issuer: d.fhir_system for d in pipeline.options.domains}
    old = tuple(sorted({Identifier(system_of[r.issuer], r.patient_id) for r in rows
                        if r.issuer in system_of}, key=lambda i: (i.system, i.value)))
    if not old:
        return False
    with pipeline.db.transaction(durable=False) as s:
        enqueue_correction(s, old, new, reason)
    return True


def _survivor(pipeline: Pipeline, record: PatientRecord) -> PatientRecord | None:
    """The end of the replaced-by chain: active, itself not replaced."""
    ehr = pipeline.ehr
    assert ehr is not None

    def fetch(ref: str) -> PatientRecord | None:
        found = ehr.read_patient(ref)
        return patient_record_from_fhir(found, base_url=ehr.base) if found else None

    chain = _follow_links([record], fetch)
    ends = [r for r in chain if not r.replaced_by and r.active]
    return ends[0] if len(ends) == 1 else None
