"""PHI at rest kept small: an upload's staged bytes and built DICOM copies go once the PACS holds
the objects, and completed submissions (with their Task, jobs and identity history) are purged.

`release_files` runs when an upload's Task completes (unless `[retention] keep_files`);
`purge` is the periodic job for `[retention] retention_days`. Neither touches AuditEvents (the
hospital's audit policy), StoredInstance rows (UIDs and identifiers, no names: corrections after
merges need them) nor ImagingStudy records. Held (`on-hold`) and failed uploads are never purged
automatically: people must act on them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import delete, or_, select

from fhirbridge.adapters.blobs import BlobStore
from fhirbridge.store.db import Database
from fhirbridge.store.models import (
    BinaryRecord,
    IndexHistory,
    Job,
    ReviewDecision,
    StoredInstance,
    Submission,
    Task,
)

if TYPE_CHECKING:
    from fhirbridge.pipeline.process import Pipeline
    from fhirbridge.pipeline.queue import ClaimedJob

log = logging.getLogger("fhirbridge.retention")

RETENTION_JOB = "retention-purge"
_SET_ASIDE_GRACE_SECONDS = 3600.0  # a blob set aside this long by a dead process is put back


@dataclass
class PurgeResult:
    submissions: int = 0
    history: int = 0
    jobs: int = 0
    files: int = 0


def blob_paths_of(sub: Submission) -> list[str]:
    """Every staged blob of a submission: the first attachment's and each attachment's."""
    rels = [sub.blob_path] + [str(a.get("blob_path") or "")
                              for a in json.loads(sub.attachments_json or "[]")]
    return [r for r in dict.fromkeys(rels) if r]


def release_files(db: Database, blobs: BlobStore, submission_id: str, *,
                  used_after: dict[str, float] | None = None,
                  keep_copies: bool = False) -> int:
    """Remove the built DICOM copies and the staged blobs of a completed upload (the PACS
    holds the objects). A blob shared with another upload that is not completed, or with a
    Binary this upload did not use, stays. Binaries this upload used (`Binary/{id}`) go with
    their bytes. `used_after`: per blob, the time after which a write was not ours (a blob
    fetched from a URL by this job); default the submission's reception. `keep_copies`: the
    built DICOM copies stay (a PACS that cannot give objects back). Returns how many files
    were removed. Errors are logged, not raised: a leftover is removed by the purge."""
    try:
        return _release_files(db, blobs, submission_id, used_after or {}, keep_copies)
    except Exception as exc:  # the upload is done; never fail it for a file left behind
        log.warning("could not remove the files of a completed upload (%s)",
                    type(exc).__name__)
        return 0


def _release_files(db: Database, blobs: BlobStore, submission_id: str,
                   used_after: dict[str, float], keep_copies: bool = False) -> int:
    with db.session() as s:
        sub = s.get(Submission, submission_id)
        if sub is None:
            return 0
        copies = [] if keep_copies else list(s.scalars(select(StoredInstance.file_path).where(
            StoredInstance.submission_id == submission_id)))
    removed = 0
    for path in copies:
        if path:
            try:
                Path(path).unlink()
                removed += 1
            except FileNotFoundError:
                pass
    received = _aware(sub.received_at).timestamp()
    for rel in blob_paths_of(sub):
        if blobs.remove(rel, partial(_blob_in_use, db, sub, rel),
                        used_after=used_after.get(rel, received)):
            removed += 1
    return removed


def _blob_in_use(db: Database, sub: Submission, rel: str) -> bool:
    """Asked while the blob is set aside: does an upload that is not completed, or a Binary
    this upload did not use, still refer to it? When not, the Binaries this upload used are
    deleted in the same transaction (their bytes are about to go)."""
    with db.transaction(durable=False) as s:
        other = s.scalar(
            select(Submission.id).join(Task, Task.submission_id == Submission.id)
            .where(Submission.id != sub.id, Task.status != "completed",
                   or_(Submission.blob_path == rel,
                       Submission.attachments_json.contains(json.dumps(rel))))
            .limit(1))
        if other is not None:
            return True
        binaries = list(s.scalars(select(BinaryRecord.id).where(BinaryRecord.blob_path == rel)))
        used = [b for b in binaries if f"Binary/{b}" in sub.resource_json]
        if len(used) != len(binaries):
            return True  # a Binary held for someone else
        if used:
            s.execute(delete(BinaryRecord).where(BinaryRecord.id.in_(used)))
        return False


def purge(db: Database, blobs: BlobStore, retention_days: float, *,
          now: datetime | None = None, keep_copies: bool = False) -> PurgeResult:
    """Delete completed uploads older than `retention_days` (by the Task's completion): the
    submission with its stored resource, its Task, jobs and review decisions, and any file of
    it still on disk (`keep_files`); identity history (IndexHistory snapshots) and finished
    jobs older than that. Superseded uploads stay (their rows keep replaced objects out of the
    ImagingStudy). `keep_copies`: built DICOM copies stay (the PACS cannot give objects back
    for corrections). 0 days = never."""
    result = PurgeResult()
    if retention_days <= 0:
        return result
    now = now or datetime.now(timezone.utc)
    cutoff = now - timedelta(days=retention_days)
    with db.session() as s:
        due = list(s.execute(
            select(Submission.id, Task.id).join(Task, Task.submission_id == Submission.id)
            .where(Task.status == "completed", Task.last_modified < cutoff,
                   Submission.superseded_by == "")))
    for sub_id, task_id in due:
        result.files += _release_files(db, blobs, sub_id, {}, keep_copies)
        with db.transaction() as s:
            s.execute(delete(ReviewDecision).where(ReviewDecision.task_id == task_id))
            s.execute(delete(Job).where(Job.subject_id == sub_id))
            s.execute(delete(Task).where(Task.id == task_id))
            s.execute(delete(Submission).where(Submission.id == sub_id))
        result.submissions += 1
    with db.transaction() as s:
        result.history = s.execute(
            delete(IndexHistory).where(IndexHistory.recorded_at < cutoff)).rowcount or 0
        # finished jobs (their payloads may carry identifiers: corrections, rechecks)
        result.jobs = s.execute(delete(Job).where(
            Job.state == "done", Job.updated_at < cutoff)).rowcount or 0
    blobs.restore_set_aside(time.time() - _SET_ASIDE_GRACE_SECONDS)
    if result.submissions or result.history:
        log.info("retention: purged %d completed upload(s), %d identity history row(s), "
                 "%d finished job(s), %d file(s)", result.submissions, result.history,
                 result.jobs, result.files)
    return result


def schedule_purge(pipeline: Pipeline) -> bool:
    """Queue one purge job unless one is pending (several processes schedule; one runs)."""
    from fhirbridge.pipeline.queue import enqueue

    with pipeline.db.transaction(durable=False) as s:
        pending = s.scalar(select(Job.id).where(
            Job.kind == RETENTION_JOB, Job.state.in_(("queued", "running"))).limit(1))
        if pending is not None:
            return False
        enqueue(s, RETENTION_JOB, "all")
    return True


def purge_job(pipeline: Pipeline, retention_days: float, job: ClaimedJob) -> str:
    """The job handler: purge, then complete the job."""
    purge(pipeline.db, pipeline.blobs, retention_days,
          keep_copies=not pipeline.pacs_returns_objects())
    with pipeline.db.transaction(durable=False) as s:
        pipeline.queue.complete(s, job)
    return "done"


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


__all__ = ["PurgeResult", "RETENTION_JOB", "blob_paths_of", "purge", "purge_job",
           "release_files", "schedule_purge"]
