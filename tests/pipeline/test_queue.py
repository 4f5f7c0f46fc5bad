"""The durable job queue on SQLite and PostgreSQL: a killed worker's job is run again, failures
back off and end `failed` for an operator to retry, and concurrent workers complete each job
exactly once."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter

import pytest
from sqlalchemy import create_engine, text

from fhirbridge.pipeline.queue import JobQueue, enqueue
from fhirbridge.store.db import Database

PG_URL = os.environ.get("FHIRBRIDGE_TEST_POSTGRES_URL", "")


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path / 'q.db'}")
        database.create_schema()
        yield database
        database.dispose()
        return
    if not PG_URL:
        pytest.skip("FHIRBRIDGE_TEST_POSTGRES_URL not set: PostgreSQL backend not tested")
    schema = f"t_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL)
    with admin.begin() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in PG_URL else "?"
    database = Database(f"{PG_URL}{sep}options=-csearch_path%3D{schema}")
    database.create_schema()
    yield database
    database.dispose()
    with admin.begin() as c:
        c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def add(db: Database, n: int = 1) -> None:
    with db.transaction() as s:
        for i in range(n):
            enqueue(s, "upload", f"sub-{i}")


def test_killed_worker_job_runs_again(db):
    q = JobQueue(db, lease_seconds=0.3)
    add(db)
    first = q.claim("dead-worker")
    assert first is not None and first.attempts == 1
    assert q.claim("other") is None  # leased
    time.sleep(0.4)
    again = q.claim("other")
    assert again is not None and again.id == first.id and again.attempts == 2
    with db.transaction() as s:
        q.complete(s, again)
    assert q.claim("other") is None


def test_failures_back_off_then_fail_and_can_be_retried(db):
    q = JobQueue(db, max_attempts=2, backoff_base_seconds=0.2, backoff_max_seconds=0.2)
    add(db)
    job = q.claim("w")
    assert q.fail(job, "EhrUnavailable: EHR answered HTTP 503") == "queued"
    assert q.claim("w") is None  # backing off
    time.sleep(0.3)
    job = q.claim("w")
    assert job is not None and job.attempts == 2
    assert q.fail(job, "EhrUnavailable: EHR answered HTTP 503") == "failed"
    failed = q.list_failed()
    assert [j.id for j in failed] == [job.id] and "503" in failed[0].last_error
    assert q.retry(job.id)
    again = q.claim("w")
    assert again is not None and again.id == job.id and again.attempts == 1


def test_concurrent_workers_complete_each_job_once(db):
    q = JobQueue(db)
    add(db, 400)
    done: Counter[int] = Counter()
    lock = threading.Lock()

    def work(owner: str) -> None:
        while (job := q.claim(owner)) is not None:
            with db.transaction() as s:
                q.complete(s, job)
            with lock:
                done[job.id] += 1

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(done) == 400 and set(done.values()) == {1}
