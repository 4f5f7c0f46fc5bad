"""Database tables: submissions, the job queue, Tasks, ImagingStudies and stored instances.

SQLAlchemy 2 declarative models; one schema for SQLite (embedded) and PostgreSQL.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Submission(Base):
    """An accepted upload (Media / DocumentReference) with its bytes staged on disk."""

    __tablename__ = "submission"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    resource_type: Mapped[str] = mapped_column(String(32))
    resource_json: Mapped[str] = mapped_column(Text)  # content.data removed; bytes are in blob
    content_type: Mapped[str] = mapped_column(String(128))
    blob_path: Mapped[str] = mapped_column(String(512))
    blob_sha256: Mapped[str] = mapped_column(String(64))
    blob_size: Mapped[int] = mapped_column(Integer)
    idempotency_key: Mapped[str] = mapped_column(String(64), index=True)
    # One study per upload (or per upload Bundle, or per chain of `replaces`).
    study_key: Mapped[str] = mapped_column(String(64), default="", index=True)
    # Every attachment: [{index, content_type, kind, blob_path, sha256, size, url,
    # series_number, instance_number}]; the blob_* columns above describe the first.
    attachments_json: Mapped[str] = mapped_column(Text, default="[]")
    replaces_id: Mapped[str] = mapped_column(String(64), default="")  # relatesTo replaces
    superseded_by: Mapped[str] = mapped_column(String(64), default="")  # set once it completes
    # uploaded with a patient-bound token (SMART patient/ scopes): that EHR `Patient/{id}`;
    # the pipeline holds the upload if identity matching finds anyone else
    bound_patient: Mapped[str] = mapped_column(String(128), default="", index=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Task(Base):
    """FHIR R4 Task reporting one submission's progress (focus = the submission)."""

    __tablename__ = "task"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    submission_id: Mapped[str] = mapped_column(ForeignKey("submission.id"), unique=True)
    focus: Mapped[str] = mapped_column(String(128), index=True)  # "Media/{id}"
    status: Mapped[str] = mapped_column(String(32))
    reason_code: Mapped[str] = mapped_column(String(64), default="")
    reason_text: Mapped[str] = mapped_column(Text, default="")  # never PHI
    output_ref: Mapped[str] = mapped_column(String(128), default="")  # "ImagingStudy/{id}"
    candidates_json: Mapped[str] = mapped_column(Text, default="")  # held: candidate refs
    authored_on: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_modified: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class Job(Base):
    """A unit of pipeline work with a lease (claim), retries and back-off."""

    __tablename__ = "job"
    __table_args__ = (Index("ix_job_claim", "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))
    subject_id: Mapped[str] = mapped_column(String(64), index=True)  # submission id, patient key…
    payload_json: Mapped[str] = mapped_column(Text, default="{}")
    # queued | running | done | failed | held
    state: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    lease_owner: Mapped[str] = mapped_column(String(64), default="")
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str] = mapped_column(Text, default="")  # never PHI
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class ImagingStudyRecord(Base):
    """fhirbridge's own copy of each ImagingStudy it wrote (searchable at /fhir/ImagingStudy)."""

    __tablename__ = "imaging_study"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_ref: Mapped[str] = mapped_column(String(256), index=True)
    resource_json: Mapped[str] = mapped_column(Text)
    ehr_id: Mapped[str] = mapped_column(String(128), default="")
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class StoredInstance(Base):
    """A DICOM instance fhirbridge built and stored, kept for corrections after merges."""

    __tablename__ = "stored_instance"
    __table_args__ = (UniqueConstraint("sop_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    submission_id: Mapped[str] = mapped_column(String(64), index=True)
    patient_ref: Mapped[str] = mapped_column(String(256), index=True)  # EHR ref or index key
    patient_id: Mapped[str] = mapped_column(String(128), default="", index=True)  # (0010,0020)
    issuer: Mapped[str] = mapped_column(String(128), default="")
    content_sha256: Mapped[str] = mapped_column(String(64), index=True)
    file_path: Mapped[str] = mapped_column(String(512))
    stored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


# -- the patient index, fed by HL7 v2 ADT (PAM / PIX feed) ----------------------------------


class IndexPatient(Base):
    """One patient as ADT describes them; `merged_into` links a subsumed record to its
    survivor (A40), so look-ups by a retired identifier lead to the survivor."""

    __tablename__ = "index_patient"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    names_json: Mapped[str] = mapped_column(Text, default="[]")
    birth_date: Mapped[str] = mapped_column(String(10), default="")  # YYYY-MM-DD
    sex: Mapped[str] = mapped_column(String(16), default="")  # FHIR gender
    active: Mapped[bool] = mapped_column(default=True)
    merged_into: Mapped[str | None] = mapped_column(String(64), index=True)
    last_event_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class IndexIdentifier(Base):
    """A patient identifier in one configured domain (FHIR system ↔ HL7 CX-4 ↔ DICOM issuer)."""

    __tablename__ = "index_identifier"
    __table_args__ = (UniqueConstraint("system", "value"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    system: Mapped[str] = mapped_column(String(256))
    value: Mapped[str] = mapped_column(String(128))
    patient_key: Mapped[str] = mapped_column(ForeignKey("index_patient.key"), index=True)


class IndexHistory(Base):
    """Every demographic change and merge, with the event that caused it."""

    __tablename__ = "index_history"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    patient_key: Mapped[str] = mapped_column(String(64), index=True)
    event_type: Mapped[str] = mapped_column(String(8))
    control_id: Mapped[str] = mapped_column(String(64), default="")
    event_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    applied: Mapped[bool] = mapped_column(default=True)  # False: older than what was applied
    snapshot_json: Mapped[str] = mapped_column(Text, default="{}")
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Hl7Message(Base):
    """Each accepted HL7 message by (sending application, facility, MSH-10): a repeat is
    acknowledged again and applied once."""

    __tablename__ = "hl7_message"
    __table_args__ = (UniqueConstraint("sender", "control_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sender: Mapped[str] = mapped_column(String(256))
    control_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(8))
    ack_code: Mapped[str] = mapped_column(String(2))
    ack_text: Mapped[str] = mapped_column(Text, default="")
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ReviewDecision(Base):
    """A person's decision on a held upload: confirm a patient, or reject (who, when, why)."""

    __tablename__ = "review_decision"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(64), index=True)
    decision: Mapped[str] = mapped_column(String(16))  # confirm | reject
    patient_ref: Mapped[str] = mapped_column(String(256), default="")
    reviewer: Mapped[str] = mapped_column(String(128))
    comment: Mapped[str] = mapped_column(Text, default="")
    decided_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)




class BinaryRecord(Base):
    """A FHIR R4 Binary received at `POST /fhir/Binary`: its bytes are a blob (content-addressed,
    durable before this row commits); several Binaries may share one blob."""

    __tablename__ = "binary_resource"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # uuid4 hex
    content_type: Mapped[str] = mapped_column(String(128))
    blob_path: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # posted with a patient-bound token: that `Patient/{id}`; only such a token may read it
    bound_patient: Mapped[str] = mapped_column(String(128), default="", index=True)


class AuditEventRecord(Base):
    """One FHIR R4 AuditEvent (IHE BALP): the columns searched at `GET /fhir/AuditEvent`,
    and the resource as recorded. Rows are only ever inserted."""

    __tablename__ = "audit_event"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # uuid4 hex
    recorded: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    type: Mapped[str] = mapped_column(String(32))  # "rest" | DICOM 1101xx
    subtype: Mapped[str] = mapped_column(String(32), default="")  # create | read | search-type…
    action: Mapped[str] = mapped_column(String(1))  # C R U D E
    outcome: Mapped[str] = mapped_column(String(2))  # 0 | 4 | 8 | 12
    agent_who: Mapped[str] = mapped_column(String(256), index=True)  # sub, peer, operator
    agent_alt: Mapped[str] = mapped_column(String(256), default="")  # client_id, sender
    patient_ref: Mapped[str] = mapped_column(String(256), default="", index=True)
    entity_ref: Mapped[str] = mapped_column(String(256), default="", index=True)
    resource_json: Mapped[str] = mapped_column(Text)
