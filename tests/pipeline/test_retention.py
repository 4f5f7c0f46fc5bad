"""PHI at rest, below the service: which staged blobs an upload's completion may remove (shared
content-addressed blobs, Binaries), the retention purge (what goes, what stays), the stripped
resource, and ImagingStudy summaries recovered without the built copy. Real SQLite files."""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select

from fhirbridge.adapters.blobs import BlobStore
from fhirbridge.dicom.context import CodedConcept
from fhirbridge.fhir.imagingstudy import InstanceSummary, imaging_study
from fhirbridge.pipeline.process import strip_self_reported, summaries_from_imaging_study
from fhirbridge.pipeline.retention import purge, release_files
from fhirbridge.store.db import Database
from fhirbridge.store.models import (
    BinaryRecord,
    ImagingStudyRecord,
    IndexHistory,
    Job,
    ReviewDecision,
    StoredInstance,
    Submission,
    Task,
)

LONG_AGO = datetime.now(timezone.utc) - timedelta(days=400)


@pytest.fixture()
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'fb.db'}")
    database.create_schema()
    return database


@pytest.fixture()
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


def add_upload(db: Database, blobs: BlobStore, data: bytes, *, status: str = "completed",
               resource: dict | None = None, when: datetime | None = None,
               copy: Path | None = None, superseded_by: str = "") -> str:
    rel, digest = blobs.put(data)
    sub_id = str(uuid.uuid4())
    with db.transaction() as s:
        s.add(Submission(id=sub_id, resource_type="Media",
                         resource_json=json.dumps(resource or {"resourceType": "Media"}),
                         content_type="image/jpeg", blob_path=rel, blob_sha256=digest,
                         blob_size=len(data), idempotency_key=sub_id,
                         attachments_json=json.dumps([{"index": 0, "blob_path": rel}]),
                         superseded_by=superseded_by,
                         received_at=datetime.now(timezone.utc) + timedelta(seconds=5)))
        s.flush()
        task = Task(id=str(uuid.uuid4()), submission_id=sub_id, focus=f"Media/{sub_id}",
                    status=status)
        s.add(task)
        s.add(Job(kind="upload", subject_id=sub_id, state="done" if status == "completed"
                  else "held"))
        s.add(ReviewDecision(task_id=task.id, decision="confirm", reviewer="r"))
        if copy is not None:
            copy.write_bytes(b"DICM")
            s.add(StoredInstance(sop_instance_uid=f"2.25.{uuid.uuid4().int}", sop_class_uid="1",
                                 series_instance_uid="1", study_instance_uid="1",
                                 submission_id=sub_id, patient_ref="Patient/p",
                                 content_sha256=digest, file_path=str(copy)))
    if when is not None:
        with db.transaction() as s:  # completed long ago
            s.get(Task, task.id).last_modified = when  # type: ignore[union-attr]
    return sub_id


def test_a_blob_shared_with_an_upload_not_completed_stays(db, blobs, tmp_path):
    photo = os.urandom(2000)
    first = add_upload(db, blobs, photo, copy=tmp_path / "a.dcm")
    add_upload(db, blobs, photo, status="on-hold")  # the same bytes, held for review
    release_files(db, blobs, first)
    assert not (tmp_path / "a.dcm").exists()  # the built copy goes
    assert blobs.path(blobs.put(photo)[0]).exists()  # the shared bytes stay


def test_completion_removes_the_blob_and_the_binary_it_used(db, blobs):
    photo = os.urandom(3000)
    rel, digest = blobs.put(photo)
    with db.transaction() as s:
        s.add(BinaryRecord(id="a" * 32, content_type="image/jpeg", blob_path=rel, sha256=digest,
                           size=len(photo)))
    sub = add_upload(db, blobs, photo, resource={
        "resourceType": "Media", "content": {"url": f"Binary/{'a' * 32}"}})
    os.utime(blobs.path(rel), (time.time() - 60, time.time() - 60))  # posted a minute ago
    assert release_files(db, blobs, sub) == 1
    assert not blobs.path(rel).exists()
    with db.session() as s:
        assert s.get(BinaryRecord, "a" * 32) is None


def test_a_binary_nobody_used_keeps_its_bytes(db, blobs):
    photo = os.urandom(3000)
    rel, digest = blobs.put(photo)
    with db.transaction() as s:  # the same bytes posted as a Binary no upload names yet
        s.add(BinaryRecord(id="b" * 32, content_type="image/jpeg", blob_path=rel, sha256=digest,
                           size=len(photo)))
    sub = add_upload(db, blobs, photo)
    release_files(db, blobs, sub)
    assert blobs.path(rel).exists()


def test_bytes_reused_by_an_upload_on_its_way_are_kept(db, blobs):
    """An upload of the same bytes re-used the blob (put found it) but has not committed its
    submission yet: the blob's use after our reception keeps it."""
    photo = os.urandom(1000)
    sub = add_upload(db, blobs, photo)
    with db.transaction() as s:  # this one was received long before
        s.get(Submission, sub).received_at = LONG_AGO  # type: ignore[union-attr]
    rel, _ = blobs.put(photo)  # another request, not committed
    release_files(db, blobs, sub)
    assert blobs.path(rel).exists()


def test_remove_sets_aside_and_puts_back(blobs):
    rel, _ = blobs.put(b"x" * 100)
    past = time.time() + 60
    assert not blobs.remove(rel, lambda: True, used_after=past)  # still in use: put back
    assert blobs.path(rel).read_bytes() == b"x" * 100
    assert blobs.remove(rel, lambda: False, used_after=past)
    assert not blobs.path(rel).exists()
    assert not blobs.remove(rel, lambda: False, used_after=past)  # already gone
    # a process that died between the rename and the decision: the purge puts it back
    rel, _ = blobs.put(b"y" * 100)
    aside = blobs.path(rel).with_name(f".{Path(rel).name}.{uuid.uuid4().hex}.gone")
    os.rename(blobs.path(rel), aside)
    assert blobs.restore_set_aside(time.time() + 1) == 1
    assert blobs.path(rel).read_bytes() == b"y" * 100


def test_private_modes(blobs, tmp_path):
    rel, _ = blobs.put(b"z" * 10)
    assert blobs.root.stat().st_mode & 0o777 == 0o700
    assert blobs.path(rel).parent.stat().st_mode & 0o777 == 0o700
    assert blobs.path(rel).stat().st_mode & 0o777 == 0o600
    Database(f"sqlite:///{tmp_path / 'x' / 'new.db'}").create_schema()
    for f in (tmp_path / "x").iterdir():
        assert f.stat().st_mode & 0o777 == 0o600, f


def test_purge_removes_old_completed_uploads_only(db, blobs, tmp_path):
    old = add_upload(db, blobs, os.urandom(500), when=LONG_AGO, copy=tmp_path / "old.dcm")
    recent = add_upload(db, blobs, os.urandom(500))
    held = add_upload(db, blobs, os.urandom(500), status="on-hold", when=LONG_AGO)
    failed = add_upload(db, blobs, os.urandom(500), status="failed", when=LONG_AGO)
    superseded = add_upload(db, blobs, os.urandom(500), when=LONG_AGO, superseded_by=recent)
    with db.transaction() as s:
        s.add(IndexHistory(patient_key="k", event_type="A08", recorded_at=LONG_AGO))
        s.add(IndexHistory(patient_key="k", event_type="A08"))
        s.add(ImagingStudyRecord(id="s", study_instance_uid="1", patient_ref="Patient/p",
                                 resource_json="{}"))

    result = purge(db, blobs, 30)

    assert result.submissions == 1 and result.history == 1
    with db.session() as s:
        left = set(s.scalars(select(Submission.id)))
        assert left == {recent, held, failed, superseded}
        assert s.scalar(select(func.count()).select_from(Task)) == 4
        assert not list(s.scalars(select(Job).where(Job.subject_id == old)))
        assert s.scalar(select(func.count()).select_from(ReviewDecision)) == 4
        assert s.scalar(select(func.count()).select_from(IndexHistory)) == 1
        # corrections after merges still find the object; the ImagingStudy stays
        assert s.scalar(select(func.count()).select_from(StoredInstance)) == 1
        assert s.get(ImagingStudyRecord, "s") is not None
    assert not (tmp_path / "old.dcm").exists()
    assert purge(db, blobs, 0).submissions == 0  # 0 days = never


def test_stripped_resource_keeps_what_dicom_carries():
    media = {"resourceType": "Media", "id": "m",
             "contained": [{"resourceType": "Patient", "id": "self", "name": [{"family": "X"}]},
                           {"resourceType": "Device", "id": "cam", "manufacturer": "Acme"}],
             "subject": {"reference": "Patient/1", "display": "Ana X"},
             "note": [{"text": "it hurts"}], "bodySite": {"text": "arm"},
             "content": {"contentType": "image/jpeg", "url": "Binary/abc"}}
    out = strip_self_reported(media)
    assert out["contained"] == [media["contained"][1]]
    assert out["subject"] == {"reference": "Patient/1"}
    assert "note" not in out and out["bodySite"] == {"text": "arm"}
    assert out["content"] == media["content"]
    doc = {"resourceType": "DocumentReference", "description": "Wound care plan",
           "contained": [{"resourceType": "Patient", "id": "p"}],
           "context": {"sourcePatientInfo": {"reference": "#p"}, "period": {"start": "2026"}}}
    out = strip_self_reported(doc)
    assert "contained" not in out and out["context"] == {"period": {"start": "2026"}}
    assert out["description"] == "Wound care plan"
    assert media["note"] and doc["contained"]  # the input is not changed


def test_imaging_study_summaries_come_back_without_the_dicom_copy():
    started = datetime(2026, 11, 20, 9, 15, tzinfo=timezone(timedelta(hours=1)))
    summaries = [
        InstanceSummary("1.2.3", "1.2.3.1", "1.2.3.1.1", "1.2.840.10008.5.1.4.1.1.77.1.4", "XC",
                        1, 1, started, "Photos", "Patient-generated media",
                        CodedConcept("40983000", "SCT", "Upper arm"), "R"),
        InstanceSummary("1.2.3", "1.2.3.2", "1.2.3.2.1", "1.2.840.10008.5.1.4.1.1.104.1", "DOC",
                        2, 1, started, "Documents", "Patient-generated media", title="Plan"),
    ]
    resource = imaging_study(summaries, subject={"reference": "Patient/1"},
                             wado_rs_url="http://pacs/dicom-web", resource_id="x")
    back = summaries_from_imaging_study(resource)
    assert imaging_study([back[s.sop_instance_uid] for s in summaries],
                         subject={"reference": "Patient/1"},
                         wado_rs_url="http://pacs/dicom-web", resource_id="x") == resource
