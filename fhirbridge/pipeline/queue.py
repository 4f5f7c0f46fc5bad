"""The durable job queue: claim with a lease, finish, retry with exponential back-off.

A claimed job whose lease expires (worker killed) is claimed again; every step it runs is
idempotent, so running it twice is harmless.

The statements a worker runs for every job are built once (bind parameters) and run on the
session's connection: building a statement and the ORM's bulk-update path cost about
0.4 ms per statement, ten times what SQLite needs (docs/decisions.md, "Photo pipeline speed").
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Select, bindparam, or_, select, update
from sqlalchemy.orm import Session

from fhirbridge.store.db import Database
from fhirbridge.store.models import Job, utcnow

# Due: queued and due, or running with an expired lease.
_DUE = or_((Job.state == "queued") & (Job.next_attempt_at <= bindparam("now")),
           (Job.state == "running") & (Job.lease_expires_at < bindparam("now")))
_OF_KINDS = Job.kind.in_(bindparam("kinds", expanding=True))
_TAKE = (update(Job).where(Job.id == bindparam("job_id"))
         .values(state="running", lease_owner=bindparam("owner"),
                 lease_expires_at=bindparam("expires"), attempts=Job.attempts + 1,
                 updated_at=bindparam("now"))
         .returning(Job.id, Job.kind, Job.subject_id, Job.payload_json, Job.attempts))
# A claim still holds its job: `attempts` grows with every claim, so a worker whose lease
# expired and whose job was claimed again no longer matches (fencing token).
_STILL_OURS = ((Job.id == bindparam("job_id")) & (Job.state == "running")
               & (Job.attempts == bindparam("attempt")))
_FINISH = update(Job).where(_STILL_OURS).values(
    state=bindparam("new_state"), lease_owner="", lease_expires_at=None, last_error="")


def _due(kinds: bool, *, order: bool = True, skip_locked: bool = False) -> Select[Any]:
    q = select(Job.id).where(_DUE)
    if kinds:
        q = q.where(_OF_KINDS)
    if order:
        q = q.order_by(Job.next_attempt_at, Job.id)
    q = q.limit(1)
    return q.with_for_update(skip_locked=True) if skip_locked else q


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    kind: str
    subject_id: str
    payload: dict[str, Any]
    attempts: int  # including this one


def enqueue(session: Session, kind: str, subject_id: str, payload: dict[str, Any] | None = None,
            *, delay_seconds: float = 0.0) -> Job:
    """Add a job inside the caller's transaction (so it commits with what it refers to)."""
    job = Job(
        kind=kind,
        subject_id=subject_id,
        payload_json=json.dumps(payload or {}),
        state="queued",
        next_attempt_at=utcnow() + timedelta(seconds=delay_seconds),
    )
    session.add(job)
    return job


class JobQueue:
    def __init__(self, db: Database, *, lease_seconds: float = 300.0, max_attempts: int = 8,
                 backoff_base_seconds: float = 2.0, backoff_max_seconds: float = 600.0) -> None:
        self.db = db
        self.lease = timedelta(seconds=lease_seconds)
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base_seconds
        self.backoff_max = backoff_max_seconds
        # (peek, next) for claims with and without a kinds filter
        self._claim_queries = {k: (_due(k, order=False), _due(k, skip_locked=not db.is_sqlite))
                               for k in (False, True)}

    def claim(self, owner: str, kinds: tuple[str, ...] | None = None,
              on_claim: Callable[[Session, ClaimedJob], None] | None = None, *,
              look_first: bool = True) -> ClaimedJob | None:
        """Take the oldest due job: queued and due, or running with an expired lease.
        `on_claim` runs inside the claiming transaction (e.g. Task → in-progress).
        `look_first=False` skips the read that keeps idle polls off the write lock (for a
        worker whose last claim found work: the queue is probably not empty)."""
        now = utcnow()
        peek, take_next = self._claim_queries[bool(kinds)]
        params: dict[str, Any] = {"now": now, **({"kinds": list(kinds)} if kinds else {})}
        if self.db.is_sqlite and look_first:
            # Look before taking the write lock: an idle poll is a read (WAL readers never
            # block or wait for the writer), so idle workers don't queue behind intake.
            with self.db.session() as s:
                if s.connection().execute(peek, params).first() is None:
                    return None
        with self.db.transaction(durable=False) as s:
            conn = s.connection()
            job_id = conn.execute(take_next, params).scalar_one_or_none()
            if job_id is None:
                return None
            row = conn.execute(_TAKE, {"job_id": job_id, "owner": owner,
                                       "expires": now + self.lease, "now": now}).one()
            claimed = ClaimedJob(row.id, row.kind, row.subject_id, json.loads(row.payload_json),
                                 row.attempts)
            if on_claim is not None:
                on_claim(s, claimed)
        return claimed

    def complete(self, session: Session, job: ClaimedJob, state: str = "done") -> None:
        """Mark done (or held) inside the transaction that records the step's result.
        A no-op when the lease was lost to another worker (it finishes the job)."""
        session.connection().execute(_FINISH, {"job_id": job.id, "attempt": job.attempts,
                                                "new_state": state})

    def fail(self, job: ClaimedJob, error: str, *, retryable: bool = True) -> str:
        """Schedule a retry with exponential back-off and jitter, or give up: 'failed'.
        'lost' when the lease expired and another worker claimed the job (nothing changed)."""
        with self.db.transaction(durable=False) as s:
            if retryable and job.attempts < self.max_attempts:
                delay = min(self.backoff_max, self.backoff_base * 2 ** (job.attempts - 1))
                delay *= random.uniform(0.8, 1.2)
                res = s.connection().execute(
                    update(Job).where(_STILL_OURS)
                    .values(state="queued", lease_owner="", lease_expires_at=None,
                            last_error=error[:2000],
                            next_attempt_at=utcnow() + timedelta(seconds=delay)),
                    {"job_id": job.id, "attempt": job.attempts})
                return "queued" if res.rowcount else "lost"
            res = s.connection().execute(
                update(Job).where(_STILL_OURS)
                .values(state="failed", lease_owner="", lease_expires_at=None,
                        last_error=error[:2000]),
                {"job_id": job.id, "attempt": job.attempts})
            return "failed" if res.rowcount else "lost"

    def list_failed(self) -> list[Job]:
        with self.db.session() as s:
            return list(s.scalars(select(Job).where(Job.state == "failed").order_by(Job.id)))

    def retry(self, job_id: int) -> bool:
        """Operator retry of a failed job: attempts reset, due now."""
        with self.db.transaction() as s:
            res = s.execute(
                update(Job).where(Job.id == job_id, Job.state == "failed")
                .values(state="queued", attempts=0, next_attempt_at=utcnow(), last_error="")
            )
            return bool(res.rowcount)

    def next_due_in(self) -> float | None:
        with self.db.session() as s:
            t = s.scalar(select(Job.next_attempt_at).where(Job.state == "queued")
                         .order_by(Job.next_attempt_at).limit(1))
        if t is None:
            return None
        if t.tzinfo is None:
            t = t.replace(tzinfo=timezone.utc)
        return max(0.0, (t - datetime.now(timezone.utc)).total_seconds())
