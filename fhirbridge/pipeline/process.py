"""The worker: claims jobs and runs the upload pipeline — check media, resolve the patient,
build DICOM, store in the PACS, write the ImagingStudy back — each step idempotent.

UIDs derive from the submission's idempotency key (fhirbridge.dicom.uids), FHIR writes are
conditional updates, and a PACS's "already stored" is success, so any step can run twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Callable

from pydicom import Dataset, dcmread
from sqlalchemy import bindparam, insert, select, update

from fhirbridge.adapters.attachments import (
    AttachmentNotPatients,
    AttachmentRefused,
    AttachmentUnavailable,
)
from fhirbridge.adapters.blobs import BlobStore, write_durably
from fhirbridge.adapters.ehr import EhrRefused, EhrUnavailable, FhirEhr
from fhirbridge.adapters.pacs import Pacs, PacsError
from fhirbridge.config import IdentifierDomain
from fhirbridge.dicom.build import build_object, prepare_media
from fhirbridge.dicom.context import PatientDemographics, StudyContext
from fhirbridge.dicom.io import write_dataset_to
from fhirbridge.dicom.uids import uid_from
from fhirbridge.fhir.documentreference import describe_document_reference
from fhirbridge.fhir.imagingstudy import (
    InstanceSummary,
    imaging_study,
    study_identifier_token,
)
from fhirbridge.fhir.media import describe_media
from fhirbridge.fhir.upload import UploadDescription
from fhirbridge.identity.model import PatientRecord, review_summary
from fhirbridge.identity.policy import Held, Matched
from fhirbridge.media.errors import MediaError
from fhirbridge.media.kinds import (
    PDF,
    PHOTO,
    SERIES_DESCRIPTION,
    SERIES_NUMBER,
    VIDEO,
    MediaLimits,
    kind_of,
)
from fhirbridge.media.sniff import content_type_matches, sniff_content_type
from fhirbridge.pipeline.intake import UPLOAD_JOB, same_patient
from fhirbridge.pipeline.patient import PatientResolver, identifier_in_domains
from fhirbridge.pipeline.queue import ClaimedJob, JobQueue, enqueue
from fhirbridge.pipeline.retention import release_files
from fhirbridge.store.db import Database
from fhirbridge.store.models import ImagingStudyRecord, StoredInstance, Submission, Task, utcnow

log = logging.getLogger("fhirbridge.pipeline")

# Statements run for every job, built once (see pipeline.queue); DML runs on the connection.
_TASK_IN_PROGRESS = (update(Task).where(Task.submission_id == bindparam("sub_id"),
                                        Task.status.in_(("requested", "failed")))
                     .values(status="in-progress", reason_code="", reason_text=""))
_TASK_DONE = update(Task).where(Task.id == bindparam("task_id")).values(
    status="completed", reason_code=bindparam("code"), reason_text=bindparam("text"),
    output_ref=bindparam("ref"))
_TASK_OF_SUBMISSION = select(Task).where(Task.submission_id == bindparam("sub_id"))
_STRIP_RESOURCE = update(Submission).where(Submission.id == bindparam("sub_id")).values(
    resource_json=bindparam("r_json"))
_STUDY_KEPT = update(ImagingStudyRecord).where(ImagingStudyRecord.id == bindparam("study_id"))
_STUDY_UPDATE = _STUDY_KEPT.values(patient_ref=bindparam("p_ref"),
                                   resource_json=bindparam("r_json"))
_STUDY_UPDATE_EHR = _STUDY_UPDATE.values(ehr_id=bindparam("ehr"))
_STUDY_INSERT = insert(ImagingStudyRecord)
_RECORDED = (select(StoredInstance.sop_instance_uid, StoredInstance.id)
             .where(StoredInstance.sop_instance_uid.in_(bindparam("uids", expanding=True))))
_SAME_CONTENT = select(StoredInstance).where(
    StoredInstance.content_sha256 == bindparam("sha256"),
    StoredInstance.patient_ref == bindparam("p_ref"),
    StoredInstance.sop_instance_uid != bindparam("sop_uid")).limit(1)
# The instance these UIDs name, when it is already recorded in another study: the same bytes,
# claim and identifiers give the same SOP Instance UID (pipeline.intake.idempotency_key), but a
# batch Bundle gives them another study. A SOP Instance UID belongs to one study (PS3.3 C.12.1,
# PS3.5 9.1): the repeat points at the stored instance (docs/decisions.md).
_SAME_UID_OTHER_STUDY = select(StoredInstance).where(
    StoredInstance.sop_instance_uid == bindparam("sop_uid"),
    StoredInstance.patient_ref == bindparam("p_ref"),
    StoredInstance.study_instance_uid != bindparam("study_uid")).limit(1)
# The study's instances, without those of a superseded upload.
_CURRENT_INSTANCES = (
    select(StoredInstance)
    .join(Submission, Submission.id == StoredInstance.submission_id, isouter=True)
    .where(StoredInstance.study_instance_uid == bindparam("study_uid"),
           (Submission.superseded_by == "") | (Submission.id.is_(None)))
    .order_by(StoredInstance.series_instance_uid, StoredInstance.id))

EHR_RECHECK_JOB = "ehr-recheck"  # handled by fhirbridge.pipeline.ehr_recheck
FHIR_GENDER_TO_DICOM = {"male": "M", "female": "F", "other": "O"}


class Permanent(Exception):
    """A failure that retrying cannot fix: the Task fails with this reason (no PHI)."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


@dataclass
class PipelineOptions:
    domains: list[IdentifierDomain]
    instances_dir: Path
    wado_rs_url: str = ""
    limits: MediaLimits = field(default_factory=MediaLimits)
    source_description: str = "Patient portal upload via fhirbridge"
    extra: dict[str, Any] = field(default_factory=dict)
    # [retention] keep_files: staged bytes and built DICOM copies stay after the PACS holds
    # the object (else removed once the Task completes; pipeline.retention)
    keep_files: bool = False


class Pipeline:
    def __init__(self, db: Database, queue: JobQueue, blobs: BlobStore, pacs: Pacs,
                 resolver: PatientResolver, ehr: FhirEhr | None, options: PipelineOptions,
                 fetcher: Any = None) -> None:
        self.db = db
        self.queue = queue
        self.blobs = blobs
        self.pacs = pacs
        self.resolver = resolver
        self.ehr = ehr
        self.options = options
        self.fetcher = fetcher  # fetches attachment URLs (adapters.attachments)
        self.handlers: dict[str, Callable[[ClaimedJob], str]] = {UPLOAD_JOB: self.process_upload}
        self._pacs_retrieves: bool | None = None  # see pacs_returns_objects
        options.instances_dir.mkdir(parents=True, exist_ok=True)

    # -- the worker loop -------------------------------------------------------------------
    def run_once(self, owner: str, *, busy: bool = False) -> bool:
        """Claim and run one job; False when nothing was due. `busy`: the last call ran one."""
        job = self.queue.claim(owner, tuple(self.handlers), on_claim=self._task_in_progress,
                               look_first=not busy)
        if job is None:
            return False
        try:
            self.handlers[job.kind](job)
        except (Permanent, EhrRefused) as exc:  # EhrRefused: e.g. our credentials refused
            code, text = ((exc.code, exc.text) if isinstance(exc, Permanent)
                          else ("ehr-refused", str(exc)))
            # 'lost': our lease expired and another worker owns the job now; it reports.
            if self.queue.fail(job, f"{code}: {text}", retryable=False) != "lost":
                self._set_task_for(job, "failed", code, text)
        except (EhrUnavailable, PacsError, AttachmentUnavailable, OSError) as exc:
            retryable = getattr(exc, "retryable", True)
            state = self.queue.fail(job, f"{type(exc).__name__}: {exc}", retryable=retryable)
            log.warning("job %s attempt %s failed (%s); now %s", job.id, job.attempts,
                        type(exc).__name__, state)
            if state == "failed":  # people read a plain reason; the job list keeps the detail
                self._set_task_for(job, "failed", "delivery-failed", failure_reason(exc))
        except Exception as exc:  # a bug must not kill the worker; the job is retried
            log.exception("job %s crashed with %s", job.id, type(exc).__name__)
            state = self.queue.fail(job, f"internal error: {type(exc).__name__}")
            if state == "failed":
                self._set_task_for(job, "failed", "internal-error",
                                   "processing failed repeatedly; see the operator's job list")
        return True

    def run_forever(self, owner: str, stop: threading.Event, poll_seconds: float = 0.2) -> None:
        worked = False
        while not stop.is_set():
            try:
                worked = self.run_once(owner, busy=worked)
            except Exception:  # e.g. database briefly unavailable
                log.exception("worker %s loop error", owner)
                worked = False
            if not worked:
                stop.wait(poll_seconds)

    # -- upload ----------------------------------------------------------------------------
    def process_upload(self, job: ClaimedJob) -> str:
        with self.db.session() as s:
            sub = s.get(Submission, job.subject_id)
            task = s.scalar(_TASK_OF_SUBMISSION, {"sub_id": job.subject_id})
        if sub is None or task is None:
            raise Permanent("missing-submission", "the submission is no longer stored")
        resource = json.loads(sub.resource_json)
        desc = describe_upload(sub.resource_type, resource)
        attachments = self._attachments(sub)

        # 1. media: check and prepare every attachment held here (deterministic); one that is
        # only a URL is fetched once the patient is known (EHR content must be theirs, 2b)
        prepared: list[Any] = [self._prepare(sub.id, att) if att.get("blob_path") else att
                               for att in attachments]

        # 2. patient: matched, or held for a person (never a guess)
        confirmed = job.payload.get("confirmed_patient")
        verdict = self.resolver.resolve(desc.claim, desc.self_reported)
        if confirmed:
            patient = self._confirmed_record(confirmed, verdict)
        elif isinstance(verdict, Held):
            self._hold(job, task.id, verdict)
            return "held"
        else:
            assert isinstance(verdict, Matched)
            patient = verdict.patient
        if sub.bound_patient and not confirmed and not same_patient(patient.ref,
                                                                    sub.bound_patient):
            # uploaded with a token limited to one patient, matched to another (a merge, an
            # identifier moved): a person decides (SMART patient/ scopes)
            bound = self.lookup_patient(sub.bound_patient)
            self._hold_reason(job, task.id, "patient-mismatch", "the upload was made for one "
                              "patient and identity matching found another",
                              [review_summary(p) for p in (patient, bound) if p is not None])
            return "held"
        if desc.claim.reference and patient.ref != desc.claim.reference:
            # the subject was merged into a survivor at the EHR: what we stored under the
            # subsumed Patient must follow (fhirbridge.pipeline.ehr_recheck)
            with self.db.transaction(durable=False) as s:
                enqueue(s, EHR_RECHECK_JOB, "some", {"refs": [desc.claim.reference]})
        demographics = self.demographics(patient)
        if demographics is None:
            self._hold_reason(job, task.id, "no-identifier-in-domain",
                              "the matched patient has no identifier in a configured domain",
                              [review_summary(patient)])
            return "held"

        if sub.replaces_id and self._replaces_other_patient(sub.replaces_id, patient.ref):
            raise Permanent("replaces-other-patient", "the upload it replaces belongs to "
                            "another patient; nothing was stored")

        # 2b. attachments that are only a URL, fetched for this patient: content the EHR
        # gives fhirbridge's own credentials is used only when it is this patient's
        # (confused deputy: Binary.securityContext); otherwise held for a person
        try:
            prepared = [p if isinstance(p, tuple) else self._prepare(
                sub.id, p, patient.ref if patient.source == "ehr" else None) for p in prepared]
        except AttachmentNotPatients as exc:
            self._hold_reason(job, task.id, "attachment-not-patients", exc.text, [])
            return "held"

        # 3. DICOM, with UIDs derived from the submission; content already stored for this
        # patient (same bytes, another upload) reuses the stored instance.
        key = sub.idempotency_key
        study_key = sub.study_key or key
        built: list[tuple[dict[str, Any], StudyContext, Dataset, Path]] = []
        reused: list[StoredInstance] = []
        for att, media in prepared:
            ctx = self.study_context(key, desc, sub.received_at, study_key=study_key,
                                     attachment=att, captured=media.captured)
            duplicate = self._stored_duplicate(att.get("sha256", ""), patient.ref, ctx)
            if duplicate is not None:
                reused.append(duplicate)
                continue
            try:
                ds = build_object(media, demographics, ctx, now=_aware(sub.received_at))
            except ValueError as exc:  # an identifier or code DICOM cannot carry (no PHI)
                raise Permanent("not-representable-in-dicom", str(exc)) from None
            path = self.options.instances_dir / f"{ctx.sop_instance_uid}.dcm"
            write_durably(path, partial(write_dataset_to, ds=ds))
            built.append((att, ctx, ds, path))

        # 4. PACS
        if built:
            self.pacs.store([ds for _, _, ds, _ in built], [path for _, _, _, path in built])
        # the built copies may go once the Task completes if the PACS gives objects back
        # (corrections need them); asked once per process, here, not after completion
        keep_copies = bool(built) and not self.options.keep_files \
            and not self.pacs_returns_objects(built[0][1])

        # 5. ImagingStudy: at the EHR (conditional update), then ours with the new instances
        # (and the replaced upload superseded) and the Task completed, in one transaction
        adding = NewInstances(rows=[StoredInstance(
            sop_instance_uid=ctx.sop_instance_uid, sop_class_uid=str(ds.SOPClassUID),
            series_instance_uid=ctx.series_instance_uid,
            study_instance_uid=ctx.study_instance_uid, submission_id=sub.id,
            patient_ref=patient.ref, patient_id=demographics.patient_id,
            issuer=demographics.issuer_of_patient_id, content_sha256=att.get("sha256", ""),
            file_path=str(path)) for att, ctx, ds, path in built],
            datasets=[ds for _, _, ds, _ in built], submission_id=sub.id,
            replaces=sub.replaces_id)
        studies = [ctx.study_instance_uid for _, ctx, _, _ in built]
        studies += [r.study_instance_uid for r in reused]
        uids = list(dict.fromkeys(studies))
        study_ref = f"ImagingStudy/{uuid.uuid5(uuid.NAMESPACE_OID, uids[0])}" if uids else ""
        code, text = ("duplicate", "the same content was already stored for this patient; "
                      "the stored instance is reused") if reused and not built else ("", "")

        # PHI at rest: once completed, the stored resource keeps no more of what the patient
        # typed about themselves (the DICOM object and ImagingStudy carry what is needed)
        stripped = json.dumps(strip_self_reported(resource))

        def finish(s: Any) -> None:  # in the transaction that keeps the last ImagingStudy
            conn = s.connection()
            conn.execute(_TASK_DONE, {"task_id": task.id, "code": code, "text": text,
                                      "ref": study_ref})
            conn.execute(_STRIP_RESOURCE, {"sub_id": sub.id, "r_json": stripped})
            self.queue.complete(s, job)

        for i, study_uid in enumerate(uids):  # uids[0]: the new instances' study, if any
            self.write_back_study(study_uid, patient,
                                  finish=finish if i == len(uids) - 1 else None,
                                  adding=adding if i == 0 else None)
        if not uids:
            with self.db.transaction(durable=False) as s:
                finish(s)
        if not self.options.keep_files:  # the PACS holds the objects and the Task completed
            release_files(self.db, self.blobs, sub.id, used_after={
                a["blob_path"]: a["fetched_at"] for a in attachments if "fetched_at" in a},
                keep_copies=keep_copies)
        return "done"

    @staticmethod
    def _task_in_progress(s: Any, job: ClaimedJob) -> None:
        """In the claiming transaction: the upload's Task shows in-progress (one commit less
        per job)."""
        if job.kind == UPLOAD_JOB:
            s.connection().execute(_TASK_IN_PROGRESS, {"sub_id": job.subject_id})

    def _attachments(self, sub: Submission) -> list[dict[str, Any]]:
        atts = json.loads(sub.attachments_json or "[]")
        if not atts:  # a submission recorded before attachments_json existed
            atts = [{"index": 0, "content_type": sub.content_type, "blob_path": sub.blob_path,
                     "sha256": sub.blob_sha256, "size": sub.blob_size, "url": "",
                     "series_number": 1, "instance_number": 1}]
        return atts

    def _prepare(self, submission_id: str, att: dict[str, Any],
                 patient_ref: str | None = None) -> tuple[dict[str, Any], Any]:
        source = self._source_of(submission_id, att, patient_ref)
        try:
            return att, prepare_media(source, att["content_type"], self.options.limits)
        except MediaError as exc:
            raise Permanent(exc.code, exc.text) from None

    def _source_of(self, submission_id: str, att: dict[str, Any],
                   patient_ref: str | None = None) -> bytes | Path:
        """The attachment's bytes (a Path for video: never all in memory), fetching a URL
        attachment once into the blob store and recording where it went. `patient_ref`: the
        upload's patient at the EHR (`Patient/{id}`), None when the EHR does not know them."""
        if not att.get("blob_path"):
            if self.fetcher is None:
                raise Permanent("attachment-unavailable", "attachment URLs cannot be fetched: "
                                "no EHR is configured")
            try:
                rel, digest, size, _ctype = self.fetcher.fetch(att["url"], self.blobs,
                                                               patient_ref)
            except AttachmentNotPatients:
                raise
            except AttachmentRefused as exc:
                raise Permanent(f"attachment-{exc.code}", exc.text) from None
            head = self.blobs.path(rel).open("rb").read(4096)
            if not content_type_matches(att["content_type"], sniff_content_type(head)):
                raise Permanent("type-mismatch", "the fetched attachment is not "
                                f"{att['content_type']}")
            # written by this job after the upload was received (pipeline.retention)
            att.update(blob_path=rel, sha256=digest, size=size, fetched_at=time.time())
            with self.db.transaction(durable=False) as s:
                row = s.get(Submission, submission_id)
                if row is not None:
                    stored = json.loads(row.attachments_json or "[]")
                    for a in stored:
                        if a.get("index") == att.get("index"):
                            a.update(blob_path=rel, sha256=digest, size=size)
                    row.attachments_json = json.dumps(stored)
        if kind_of(att["content_type"]) == VIDEO:
            return self.blobs.path(att["blob_path"])
        return self.blobs.get(att["blob_path"])

    def _replaces_other_patient(self, replaced_id: str, patient_ref: str) -> bool:
        with self.db.session() as s:
            refs = set(s.scalars(select(StoredInstance.patient_ref).where(
                StoredInstance.submission_id == replaced_id)))
        return bool(refs - {patient_ref})

    def _stored_duplicate(self, sha256: str, patient_ref: str,
                          ctx: StudyContext) -> StoredInstance | None:
        """The instance already stored for this patient with the same bytes (another
        upload), or with this SOP Instance UID in another study: reused, never re-sent, so a
        SOP Instance UID stays in exactly one study (PACS, StoredInstance, ImagingStudy)."""
        with self.db.session() as s:
            same_uid = s.scalar(_SAME_UID_OTHER_STUDY, {
                "sop_uid": ctx.sop_instance_uid, "p_ref": patient_ref,
                "study_uid": ctx.study_instance_uid})
            if same_uid is not None or not sha256:
                return same_uid
            return s.scalar(_SAME_CONTENT, {"sha256": sha256, "p_ref": patient_ref,
                                            "sop_uid": ctx.sop_instance_uid})

    # -- pieces, public so corrections and the review queue reuse them ----------------------
    def demographics(self, patient: PatientRecord) -> PatientDemographics | None:
        """DICOM Patient Module values from the EHR (or index) record, never from the upload.
        PatientID/IssuerOfPatientID come from the first configured domain the patient has."""
        domains = sorted(self.options.domains, key=lambda d: not d.default)
        ident = identifier_in_domains(patient, [d.fhir_system for d in domains])
        if ident is None:
            return None
        domain = next(d for d in domains if d.fhir_system == ident.system)
        others = tuple(
            (i.value, d.dicom_issuer)
            for d in domains for i in patient.identifiers
            if i.system == d.fhir_system and i != ident
        )
        name = patient.names[0] if patient.names else None
        return PatientDemographics(
            patient_id=ident.value,
            issuer_of_patient_id=domain.dicom_issuer,
            family=name.family if name else "",
            given=tuple(name.given) if name else (),
            prefix=name.prefix if name else "",
            suffix=name.suffix if name else "",
            birth_date=(patient.birth_date or "").replace("-", ""),
            sex=FHIR_GENDER_TO_DICOM.get(patient.sex or "", ""),
            other_ids=others,
        )

    def study_context(self, key: str, desc: UploadDescription, received_at: datetime, *,
                      study_key: str | None = None, attachment: dict[str, Any] | None = None,
                      captured: datetime | None = None) -> StudyContext:
        """UIDs: the study from the study key (one upload, one Bundle, or a `replaces`
        chain), a series per kind, an instance per attachment — all deterministic."""
        att = attachment or {"index": 0, "kind": PHOTO, "series_number": 1,
                             "instance_number": 1}
        kind = att.get("kind") or kind_of(att.get("content_type")) or PHOTO
        study_key = study_key or key
        index = int(att.get("index") or 0)
        created = desc.created or captured or _aware(received_at)
        is_document = kind == PDF
        return StudyContext(
            study_instance_uid=uid_from("study", study_key),
            series_instance_uid=uid_from("series", study_key) if kind == PHOTO
            else uid_from(f"series-{kind}", study_key),
            sop_instance_uid=uid_from("sop", key) if index == 0
            else uid_from(f"sop-{index}", key),
            content_datetime=created,
            study_datetime=created,
            study_id="1",
            series_number=int(att.get("series_number") or SERIES_NUMBER.get(kind, 1)),
            instance_number=int(att.get("instance_number") or 1),
            study_description="Patient-generated media",
            series_description=desc.series_description or SERIES_DESCRIPTION.get(kind, ""),
            anatomic_region=desc.body_site,
            laterality=desc.laterality,
            manufacturer=desc.device_make,
            manufacturer_model_name=desc.device_model,
            comments=desc.notes,
            document_title=desc.document_title if is_document else "",
            source_description=self.options.source_description,
        )

    def subject_reference(self, patient: PatientRecord) -> dict[str, Any]:
        if patient.source == "ehr":
            return {"reference": patient.ref}
        ident = identifier_in_domains(patient, [d.fhir_system for d in self.options.domains])
        if ident is not None:
            return {"type": "Patient",
                    "identifier": {"system": ident.system, "value": ident.value}}
        return {"reference": patient.ref}

    def write_back_study(self, study_instance_uid: str, patient: PatientRecord, *,
                         finish: Callable[[Any], None] | None = None,
                         adding: NewInstances | None = None) -> str:
        """(Re)build the ImagingStudy from every current instance stored for the study (not
        those of a superseded upload); write it to the EHR by conditional update, keep our
        copy. Workers finishing uploads of one study at the same time each write; whoever
        wrote a set that is no longer current writes again, so the last write is complete.
        `finish` runs in the transaction that keeps the complete copy (the caller's last
        step, e.g. Task completed); `adding` (instances not recorded yet) is in the first write
        and recorded in its transaction. Returns `ImagingStudy/{our id}`."""
        local_id = str(uuid.uuid5(uuid.NAMESPACE_OID, study_instance_uid))
        subject = self.subject_reference(patient)
        rows = self._current_instances(study_instance_uid)
        known: dict[str, InstanceSummary] = {}
        if adding is not None:
            new_uids = {r.sop_instance_uid for r in adding.rows}
            rows = [r for r in rows if r.sop_instance_uid not in new_uids
                    and not (adding.replaces and r.submission_id == adding.replaces)]
            rows += adding.rows
            known = {str(ds.SOPInstanceUID): summary_from_dataset(ds) for ds in adding.datasets}
        for _ in range(5):
            if not rows:
                break
            rows, complete = self._write_study(study_instance_uid, local_id, rows, subject,
                                               patient, finish, adding, known)
            adding = None  # recorded
            if complete:
                return f"ImagingStudy/{local_id}"
        if finish is not None or adding is not None:
            with self.db.transaction(durable=False) as s:
                if adding is not None:  # nothing current to write (rows empty)
                    self._record_instances(s, adding)
                if finish is not None:
                    finish(s)
        return f"ImagingStudy/{local_id}"

    @staticmethod
    def _record_instances(s: Any, adding: NewInstances) -> None:
        """Store the new instance rows (updated in place when a retry finds them recorded)
        and supersede the upload they replace (DocumentReference.relatesTo replaces)."""
        uids = [r.sop_instance_uid for r in adding.rows]
        conn = s.connection()
        recorded = dict(conn.execute(_RECORDED, {"uids": uids}).all()) if uids else {}
        values = [{c: getattr(r, c) for c in ("sop_instance_uid", *_INSTANCE_COLUMNS)}
                  for r in adding.rows]
        fresh = [v for v in values if v["sop_instance_uid"] not in recorded]
        if fresh:
            conn.execute(insert(StoredInstance), fresh)
        for v in values:
            if v["sop_instance_uid"] in recorded:
                s.execute(update(StoredInstance)
                          .where(StoredInstance.id == recorded[v["sop_instance_uid"]])
                          .values(**v))
        if adding.replaces:
            s.execute(update(Submission).where(Submission.id == adding.replaces)
                      .values(superseded_by=adding.submission_id))

    def _current_instances(self, study_instance_uid: str) -> list[StoredInstance]:
        with self.db.session() as s:
            return list(s.scalars(_CURRENT_INSTANCES, {"study_uid": study_instance_uid}))

    def _write_study(self, study_instance_uid: str, local_id: str, rows: list[StoredInstance],
                     subject: dict[str, Any], patient: PatientRecord,
                     finish: Callable[[Any], None] | None, adding: NewInstances | None,
                     known: dict[str, InstanceSummary]) -> tuple[list[StoredInstance], bool]:
        """Write the ImagingStudy of `rows`; keep our copy (recording `adding` with it) and,
        when no instance was added or superseded meanwhile (checked under the write lock), run
        `finish` in the same transaction. `known`: summaries of objects we hold in memory (the
        rest are read back from their files). Returns (the current instances, whether `rows`
        were still current)."""
        kept: dict[str, InstanceSummary] | None = None  # from our copy of the ImagingStudy
        summaries = []
        for r in rows:
            summary = known.get(r.sop_instance_uid)
            if summary is None and Path(r.file_path).is_file():
                summary = summary_from_file(Path(r.file_path))
            if summary is None:  # the built copy was removed once the PACS held it
                if kept is None:
                    kept = self._kept_summaries(local_id)
                summary = kept.get(r.sop_instance_uid) or self._retrieved_summary(r)
            summaries.append(summary)
        resource = imaging_study(summaries, subject=subject,
                                 wado_rs_url=self.options.wado_rs_url, resource_id=local_id)
        ehr_id = ""
        if self.ehr is not None and patient.source == "ehr":
            try:
                ehr_id = self.ehr.upsert_imaging_study(resource,
                                                       study_identifier_token(study_instance_uid))
            except EhrRefused as exc:
                raise Permanent("ehr-refused", str(exc)) from None
        patient_key = subject.get("reference") or (
            f"{subject['identifier']['system']}|{subject['identifier']['value']}")
        written = sorted(r.sop_instance_uid for r in rows)
        with self.db.transaction(durable=False) as s:
            if adding is not None:
                self._record_instances(s, adding)
            conn = s.connection()
            resource_json = json.dumps(resource)
            res = conn.execute(_STUDY_UPDATE_EHR if ehr_id else _STUDY_UPDATE, {
                "study_id": local_id, "p_ref": patient_key, "r_json": resource_json,
                **({"ehr": ehr_id} if ehr_id else {})})
            if not res.rowcount:
                conn.execute(_STUDY_INSERT, {
                    "id": local_id, "study_instance_uid": study_instance_uid,
                    "patient_ref": patient_key, "resource_json": resource_json,
                    **({"ehr_id": ehr_id} if ehr_id else {})})
            current = list(s.scalars(_CURRENT_INSTANCES, {"study_uid": study_instance_uid}))
            complete = sorted(r.sop_instance_uid for r in current) == written
            if complete and finish is not None:
                finish(s)
        return current, complete

    def pacs_returns_objects(self, ctx: StudyContext | None = None) -> bool:
        """Whether the PACS gives stored objects back (`Pacs.retrieve`: C-GET, WADO-RS, REST),
        asked once per process with an object it holds (`ctx`, else the last one recorded).
        Corrections need the object: a PACS that does not return it keeps our built copies
        (said once in the log)."""
        if self._pacs_retrieves is None:
            if ctx is not None:
                uids = (ctx.study_instance_uid, ctx.series_instance_uid, ctx.sop_instance_uid)
            else:
                with self.db.session() as s:
                    row = s.scalar(select(StoredInstance).order_by(StoredInstance.id.desc())
                                   .limit(1))
                if row is None:
                    return False
                uids = (row.study_instance_uid, row.series_instance_uid, row.sop_instance_uid)
            try:
                ok = self.pacs.retrieve(*uids) is not None
            except (PacsError, OSError, RuntimeError) as exc:
                log.warning("could not ask the PACS for a stored object back (%s); the built "
                            "DICOM copy is kept", type(exc).__name__)
                return False  # asked again with the next upload
            self._pacs_retrieves = ok
            if not ok:
                log.warning("the PACS does not return stored objects (C-GET / WADO-RS): built "
                            "DICOM copies are kept under data_dir/instances for corrections")
        return self._pacs_retrieves

    def _kept_summaries(self, local_id: str) -> dict[str, InstanceSummary]:
        with self.db.session() as s:
            rec = s.get(ImagingStudyRecord, local_id)
        return summaries_from_imaging_study(json.loads(rec.resource_json)) if rec else {}

    def _retrieved_summary(self, row: StoredInstance) -> InstanceSummary:
        ds = self.pacs.retrieve(row.study_instance_uid, row.series_instance_uid,
                                row.sop_instance_uid)
        if ds is None:
            raise Permanent("instance-missing-in-pacs", "an object stored earlier for this "
                            "study is no longer held by the PACS")
        return summary_from_dataset(ds)

    # -- task state ------------------------------------------------------------------------
    def _hold(self, job: ClaimedJob, task_id: str, verdict: Held) -> None:
        self._hold_reason(job, task_id, verdict.reason.value, verdict.detail,
                          [review_summary(c) for c in verdict.candidates])

    def _hold_reason(self, job: ClaimedJob, task_id: str, code: str, text: str,
                     candidates: list[dict[str, Any]]) -> None:
        """On hold for a person; the candidates (with their demographics, for the reviewer)
        are kept with the Task but never shown in it."""
        unique = {c["ref"]: c for c in candidates}
        with self.db.transaction(durable=False) as s:
            t = s.get(Task, task_id)
            assert t is not None
            t.status, t.reason_code, t.reason_text = "on-hold", code, text
            t.candidates_json = json.dumps([unique[k] for k in sorted(unique)])
            self.queue.complete(s, job, state="held")

    def _confirmed_record(self, confirmed: dict[str, Any], verdict: Any) -> PatientRecord:
        """A reviewer confirmed a patient: use the freshest record we can get for it."""
        ref = confirmed["ref"]
        if isinstance(verdict, (Held, Matched)):
            pool = verdict.candidates if isinstance(verdict, Held) else (verdict.patient,)
            for c in pool:
                if c.ref == ref:
                    return c
        record = self.lookup_patient(ref)
        if record is None:
            raise Permanent("confirmed-patient-missing", "the confirmed patient cannot be found")
        return record

    def lookup_patient(self, ref: str) -> PatientRecord | None:
        from fhirbridge.identity.model import patient_record_from_fhir

        if ref.startswith("Patient/") and self.ehr is not None:
            found = self.ehr.read_patient(ref)
            return patient_record_from_fhir(found) if found else None
        index = self.resolver.index
        return index.get(ref) if index is not None else None

    def _set_task_for(self, job: ClaimedJob, status: str, code: str, text: str) -> None:
        if job.kind != UPLOAD_JOB:
            return
        with self.db.transaction(durable=False) as s:
            t = s.scalar(select(Task).where(Task.submission_id == job.subject_id))
            if t is not None:
                t.status, t.reason_code, t.reason_text = status, code, text[:500]


def failure_reason(exc: Exception) -> str:
    """The Task.statusReason text for a delivery that kept failing: our adapters' own texts
    (PHI-free, no paths), and for a local file error a plain sentence — never the exception
    text, which names files on this node (e.g. `[Errno 2] ... '/…/blobs/…'`)."""
    if isinstance(exc, FileNotFoundError):
        return "the staged bytes of this upload are missing on this node"
    if isinstance(exc, OSError):
        return "a file of this upload could not be read or written on this node"
    return str(exc)


@dataclass(frozen=True)
class NewInstances:
    """What one job adds to a study: instance rows not recorded yet, the objects as built
    (their ImagingStudy summaries), and the upload the job's submission replaces, if any."""

    rows: list[StoredInstance]
    datasets: list[Dataset]
    submission_id: str
    replaces: str = ""


_INSTANCE_COLUMNS = ("sop_class_uid", "series_instance_uid", "study_instance_uid",
                     "submission_id", "patient_ref", "patient_id", "issuer", "content_sha256",
                     "file_path")


def describe_upload(resource_type: str, resource: dict[str, Any]) -> UploadDescription:
    if resource_type == "DocumentReference":
        return describe_document_reference(resource)
    return describe_media(resource)


def strip_self_reported(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource without what the patient typed about themselves: contained Patients
    (Media's self-reported Patient, DocumentReference.context.sourcePatientInfo, IHE MHD),
    `subject.display` and `note` (PHI at rest kept small). The rest (identifiers, subject
    reference, body site, attachment metadata, DocumentReference.description: the document
    title the DICOM object carries too) stays."""
    out = dict(resource)
    contained = [c for c in out.get("contained") or [] if isinstance(c, dict)]
    kept = [c for c in contained if c.get("resourceType") != "Patient"]
    if kept:
        out["contained"] = kept
    else:
        out.pop("contained", None)
    if isinstance(out.get("subject"), dict):
        out["subject"] = {k: v for k, v in out["subject"].items() if k != "display"}
    out.pop("note", None)
    context = out.get("context")
    if isinstance(context, dict) and isinstance(context.get("sourcePatientInfo"), dict):
        context = dict(context)
        source = context["sourcePatientInfo"]
        if str(source.get("reference", "")).startswith("#") or "display" in source:
            context.pop("sourcePatientInfo")
        out["context"] = context
    return out


def summaries_from_imaging_study(resource: dict[str, Any]) -> dict[str, InstanceSummary]:
    """What ImagingStudy needs of each instance, read back from an ImagingStudy we wrote
    (fhirbridge.fhir.imagingstudy.imaging_study), by SOP Instance UID."""
    from fhirbridge.dicom.context import CodedConcept
    from fhirbridge.fhir.imagingstudy import LATERALITY_SCT

    laterality = {code: key for key, (code, _) in LATERALITY_SCT.items()}
    study_uid = str(resource.get("identifier", [{}])[0].get("value", "")).removeprefix(
        "urn:oid:")
    out: dict[str, InstanceSummary] = {}
    for series in resource.get("series") or []:
        site = series.get("bodySite")
        started = series.get("started")
        for inst in series.get("instance") or []:
            out[inst["uid"]] = InstanceSummary(
                study_instance_uid=study_uid,
                series_instance_uid=series["uid"],
                sop_instance_uid=inst["uid"],
                sop_class_uid=str(inst["sopClass"]["code"]).removeprefix("urn:oid:"),
                modality=series["modality"]["code"],
                series_number=int(series.get("number") or 1),
                instance_number=int(inst.get("number") or 1),
                started=datetime.fromisoformat(started) if started else None,
                series_description=series.get("description", ""),
                study_description=resource.get("description", ""),
                body_site=CodedConcept(code=site["code"], scheme="SCT",
                                       meaning=site.get("display", "")) if site else None,
                laterality=laterality.get((series.get("laterality") or {}).get("code", ""), ""),
                title=inst.get("title", ""),
            )
    return out


def summary_from_file(path: Path) -> InstanceSummary:
    """Read back what ImagingStudy needs from the object we stored (not from the request)."""
    return summary_from_dataset(dcmread(path, stop_before_pixels=True))


def summary_from_dataset(ds: Dataset) -> InstanceSummary:
    """What ImagingStudy needs, from the object (as built and stored, or read back)."""
    started = None
    if ds.get("StudyDate"):
        t = str(ds.get("StudyTime", "") or "000000").split(".")[0].ljust(6, "0")
        started = datetime.strptime(f"{ds.StudyDate}{t}", "%Y%m%d%H%M%S")
        tz = str(ds.get("TimezoneOffsetFromUTC", "") or "")
        if tz:
            sign = 1 if tz[0] == "+" else -1
            from datetime import timedelta

            started = started.replace(tzinfo=timezone(sign * timedelta(
                hours=int(tz[1:3]), minutes=int(tz[3:5]))))
    region = None
    seq = ds.get("AnatomicRegionSequence")
    if seq:
        from fhirbridge.dicom.context import CodedConcept

        code = seq[0].get("CodeValue") or seq[0].get("LongCodeValue") or ""
        region = CodedConcept(code=str(code), scheme=str(seq[0].CodingSchemeDesignator),
                              meaning=str(seq[0].get("CodeMeaning", "")))
    return InstanceSummary(
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        modality=str(ds.Modality),
        series_number=int(ds.get("SeriesNumber") or 1),
        instance_number=int(ds.get("InstanceNumber") or 1),
        started=started,
        series_description=str(ds.get("SeriesDescription", "") or ""),
        study_description=str(ds.get("StudyDescription", "") or ""),
        body_site=region,
        laterality=str(ds.get("ImageLaterality", "") or ""),
        title=str(ds.get("DocumentTitle", "") or ""),
    )


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


__all__ = ["Permanent", "Pipeline", "PipelineOptions", "summary_from_file", "utcnow"]
