"""JobQueue against both backends: SQLite (WAL, BEGIN IMMEDIATE) and PostgreSQL (SKIP LOCKED).

PostgreSQL runs when FHIRBRIDGE_TEST_POSTGRES_URL is set (CI sets it); each test gets a fresh
schema, dropped afterwards.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import select

from fhirbridge.pipeline.queue import ClaimedJob, JobQueue, enqueue
from fhirbridge.store.db import Database
from tests.support.databases import fresh_database
from fhirbridge.store.models import Job



@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    yield from fresh_database(request.param, tmp_path)


def _add(db: Database, n: int = 1, kind: str = "ingest", **kw: float) -> list[int]:
    with db.transaction() as s:
        jobs = [enqueue(s, kind, f"sub-{i}", {"i": i}, **kw) for i in range(n)]
        s.flush()
        return [j.id for j in jobs]


def _job(db: Database, job_id: int) -> Job:
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


def test_enqueue_claim_complete(db: Database) -> None:
    q = JobQueue(db)
    (job_id,) = _add(db)
    job = q.claim("w1")
    assert job is not None
    assert (job.id, job.kind, job.subject_id, job.payload, job.attempts) == (
        job_id, "ingest", "sub-0", {"i": 0}, 1)
    row = _job(db, job_id)
    assert row.state == "running" and row.lease_owner == "w1"
    assert row.lease_expires_at is not None
    assert q.claim("w2") is None  # leased: not claimable by another worker
    with db.transaction() as s:
        q.complete(s, job)
    row = _job(db, job_id)
    assert row.state == "done" and row.lease_owner == "" and row.lease_expires_at is None
    assert q.claim("w1") is None


def test_claim_nothing_due(db: Database) -> None:
    q = JobQueue(db)
    assert q.claim("w1") is None  # empty queue
    _add(db, delay_seconds=3600)
    assert q.claim("w1") is None  # queued, not yet due
    assert q.next_due_in() is not None and q.next_due_in() > 3000
    _add(db, kind="other")
    assert q.claim("w1", kinds=("ingest",)) is None  # due, but another kind
    assert q.claim("w1", kinds=("other",)) is not None


def test_expired_lease_is_reclaimed(db: Database) -> None:
    q = JobQueue(db, lease_seconds=0.2)
    (job_id,) = _add(db)
    dead = q.claim("dead")
    assert dead is not None and dead.attempts == 1
    assert q.claim("alive") is None  # lease still held
    time.sleep(0.4)
    again = q.claim("alive")
    assert again is not None
    assert again.id == job_id and again.attempts == 2
    row = _job(db, job_id)
    assert row.state == "running" and row.lease_owner == "alive"
    assert row.attempts == 2


def test_fail_backoff_then_failed_then_retry(db: Database) -> None:
    q = JobQueue(db, max_attempts=3, backoff_base_seconds=0.0, backoff_max_seconds=60.0)
    (job_id,) = _add(db)

    # First failure with a real back-off: rescheduled into the future, not claimable now.
    qb = JobQueue(db, max_attempts=3, backoff_base_seconds=30.0)
    job = qb.claim("w1")
    assert job is not None and job.attempts == 1
    before = datetime.now(timezone.utc)
    assert qb.fail(job, "boom 1") == "queued"
    row = _job(db, job_id)
    assert row.state == "queued" and row.last_error == "boom 1"
    assert row.lease_owner == "" and row.lease_expires_at is None
    wait = (_aware(row.next_attempt_at) - before).total_seconds()
    assert 30 * 0.8 - 1 <= wait <= 30 * 1.2 + 1
    assert qb.claim("w1") is None
    assert 20 < qb.next_due_in() <= 37  # type: ignore[operator]

    # Make it due again, then fail until max_attempts (zero back-off).
    with db.transaction() as s:
        s.get(Job, job_id).next_attempt_at = datetime.now(timezone.utc)  # type: ignore[union-attr]
    job = q.claim("w1")
    assert job is not None and job.attempts == 2
    assert q.fail(job, "boom 2") == "queued"
    job = q.claim("w1")
    assert job is not None and job.attempts == 3
    assert q.fail(job, "boom 3") == "failed"

    row = _job(db, job_id)
    assert row.state == "failed" and row.last_error == "boom 3" and row.attempts == 3
    assert q.claim("w1") is None
    assert [j.id for j in q.list_failed()] == [job_id]

    assert q.retry(job_id) is True
    assert q.retry(job_id) is False  # no longer failed
    assert q.list_failed() == []
    row = _job(db, job_id)
    assert row.state == "queued" and row.attempts == 0 and row.last_error == ""
    job = q.claim("w2")
    assert job is not None and job.id == job_id and job.attempts == 1


def test_non_retryable_fails_immediately(db: Database) -> None:
    q = JobQueue(db)
    (job_id,) = _add(db)
    job = q.claim("w1")
    assert job is not None
    assert q.fail(job, "bad input", retryable=False) == "failed"
    assert [j.id for j in q.list_failed()] == [job_id]


def test_concurrent_workers_complete_each_job_once(db: Database) -> None:
    n_jobs, n_workers = 500, 4
    ids = _add(db, n_jobs)
    q = JobQueue(db)
    claims: Counter[int] = Counter()
    completions: Counter[int] = Counter()
    lock = threading.Lock()
    errors: list[BaseException] = []
    start = threading.Barrier(n_workers)

    def worker(name: str) -> None:
        try:
            start.wait()
            while True:
                job: ClaimedJob | None = q.claim(name)
                if job is None:
                    return
                with lock:
                    claims[job.id] += 1
                with db.transaction() as s:
                    q.complete(s, job)
                with lock:
                    completions[job.id] += 1
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "workers hung"
    assert errors == []
    assert set(claims) == set(ids)
    assert [i for i, c in claims.items() if c != 1] == [], "jobs claimed more than once"
    assert [i for i, c in completions.items() if c != 1] == []
    assert sum(completions.values()) == n_jobs
    with db.session() as s:
        states = Counter(s.scalars(select(Job.state)))
    assert states == {"done": n_jobs}


def test_stale_owner_cannot_requeue_or_finish_a_reclaimed_job(db: Database) -> None:
    """A worker whose lease expired (and whose job was claimed again) must not change the job:
    its fail() would otherwise re-queue it under the live owner (a third, concurrent claim)."""
    q = JobQueue(db, lease_seconds=0.2, backoff_base_seconds=0.0)
    (job_id,) = _add(db)
    stale = q.claim("slow")
    assert stale is not None
    time.sleep(0.4)
    live = q.claim("live")
    assert live is not None and live.id == job_id and live.attempts == 2

    assert q.fail(stale, "late failure") == "lost"
    row = _job(db, job_id)
    assert row.state == "running" and row.lease_owner == "live" and row.last_error == ""
    assert q.claim("third") is None  # still leased to "live"

    with db.transaction() as s:
        q.complete(s, stale, state="held")
    assert _job(db, job_id).state == "running"

    with db.transaction() as s:
        q.complete(s, live)
    assert _job(db, job_id).state == "done"
