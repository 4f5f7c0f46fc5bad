"""Corrections after storage: when ADT moves or renames a patient (A40, A47, A08), every object
fhirbridge stored under the old identity is re-identified in the PACS and its ImagingStudy's
subject follows (IHE PIR; dicom.md "Correcting objects already in the PACS").

Job payload: {"old": [[system, value], …], "new": [system, value], "reason": "ADT A40"}.
The new identity is resolved again through the match policy (EHR first), so a correction
never moves images to a patient the policy would not match; when it would hold, the job
fails with that reason for an operator to see. Re-running gives the same final state.

The object to correct is our built copy while it is kept (`[retention] keep_files`), else the
PACS's own copy, retrieved (WADO-RS, Orthanc REST, C-GET or the folder): see `load_stored`.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from pathlib import Path

from pydicom import Dataset, dcmread
from sqlalchemy import select

from fhirbridge.adapters.blobs import write_durably
from fhirbridge.dicom.correct import correct_patient, differs
from fhirbridge.dicom.io import write_dataset
from fhirbridge.identity.model import Identifier, SubjectClaim
from fhirbridge.identity.policy import Held
from fhirbridge.pipeline.process import Permanent, Pipeline
from fhirbridge.pipeline.queue import ClaimedJob
from fhirbridge.store.models import StoredInstance

RECONCILE_JOB = "reconcile"


def reconcile(pipeline: Pipeline, job: ClaimedJob) -> str:
    old = [Identifier(str(s), str(v)) for s, v in job.payload.get("old", [])]
    new = Identifier(*[str(x) for x in job.payload["new"]])
    reason = str(job.payload.get("reason", "correction"))
    issuer_of = {d.fhir_system: d.dicom_issuer for d in pipeline.options.domains}
    wanted = {(issuer_of[i.system], i.value) for i in old if i.system in issuer_of}
    with pipeline.db.session() as s:
        rows = [r for r in s.scalars(select(StoredInstance).where(
            StoredInstance.patient_id.in_(sorted({v for _, v in wanted}))))
            if (r.issuer, r.patient_id) in wanted]
    if not rows:
        with pipeline.db.transaction(durable=False) as s:
            pipeline.queue.complete(s, job)
        return "done"
    verdict = pipeline.resolver.resolve(SubjectClaim(reference=None, identifier=new), None)
    if isinstance(verdict, Held):
        raise Permanent(f"correction-held-{verdict.reason.value}",
                        f"correction not applied: {verdict.detail}")
    patient = verdict.patient
    demographics = pipeline.demographics(patient)
    if demographics is None:
        raise Permanent("correction-no-identifier",
                        "correction not applied: the patient has no identifier in a domain")
    corrected = []
    for row in rows:
        ds = load_stored(pipeline, row)
        if differs(ds, demographics):
            fixed = correct_patient(ds, demographics, reason=reason,
                                    source="EHR / ADT patient identity feed")
            path = Path(row.file_path) if row.file_path and Path(row.file_path).is_file() \
                else None  # a kept built copy follows the correction
            if path is not None:
                write_durably(path.with_suffix(".new"), write_dataset(fixed))
            corrected.append((row, str(ds.get("PatientID", "")), fixed, path))
    if corrected:
        pipeline.pacs.replace([(old_pid, fixed) for _, old_pid, fixed, _ in corrected])
        for _, _, _, path in corrected:
            if path is not None:
                path.with_suffix(".new").replace(path)
    studies: dict[str, list[int]] = defaultdict(list)
    with pipeline.db.transaction(durable=False) as s:
        for row in rows:
            r = s.get(StoredInstance, row.id)
            assert r is not None
            r.patient_ref = patient.ref
            r.patient_id = demographics.patient_id
            r.issuer = demographics.issuer_of_patient_id
            studies[r.study_instance_uid].append(r.id)
    for study_uid in studies:
        pipeline.write_back_study(study_uid, patient)
    with pipeline.db.transaction(durable=False) as s:
        pipeline.queue.complete(s, job)
    return "done"


def load_stored(pipeline: Pipeline, row: StoredInstance, *,
                header_only: bool = False) -> Dataset:
    """The object as stored: our built copy while kept, else retrieved from the PACS (the
    copy is removed once the PACS holds the object). PacsError when the PACS cannot be asked
    (retried); Permanent when it no longer holds the object (an operator must look)."""
    if row.file_path and Path(row.file_path).is_file():
        return dcmread(row.file_path, stop_before_pixels=header_only)
    ds = pipeline.pacs.retrieve(row.study_instance_uid, row.series_instance_uid,
                                row.sop_instance_uid)
    if ds is None:
        raise Permanent("correction-object-missing", "correction not applied: the PACS no "
                        "longer holds an object fhirbridge stored")
    return ds


def enqueue_correction(session: object, old: tuple[Identifier, ...], new: Identifier,
                       reason: str) -> None:
    from fhirbridge.pipeline.queue import enqueue

    enqueue(session, RECONCILE_JOB, f"reconcile-{uuid.uuid4().hex[:12]}",  # type: ignore[arg-type]
            {"old": [[i.system, i.value] for i in old], "new": [new.system, new.value],
             "reason": reason})
