"""The audit recorder: inserts AuditEvent rows (in the caller's transaction, or in one of its
own, durable before the answer) and hands a copy to the syslog forwarder once committed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from sqlalchemy import Connection, insert
from sqlalchemy.orm import Session

from fhirbridge.audit.events import AuditRow
from fhirbridge.store.db import Database
from fhirbridge.store.models import AuditEventRecord

_INSERT = insert(AuditEventRecord.__table__)


class Forwarder(Protocol):
    def send(self, resource: dict[str, Any]) -> None: ...
    def close(self, timeout: float = 5.0) -> None: ...


class AuditRecorder:
    """`source_id` is AuditEvent.source.observer (`[audit] source_id`); `server_address` the
    public FHIR base, recorded as the server agent's network address."""

    def __init__(self, db: Database, *, source_id: str = "fhirbridge",
                 server_address: str = "", forwarder: Forwarder | None = None) -> None:
        self.db = db
        self.source_id = source_id
        self.server_address = server_address
        self.forwarder = forwarder

    @staticmethod
    def insert(conn: Connection | Session, rows: Sequence[AuditRow]) -> None:
        """Inside the caller's transaction: the audit rows commit (or roll back) with what
        they describe. The caller forwards them (`forward`) after its commit."""
        if not rows:
            return
        c = conn.connection() if isinstance(conn, Session) else conn
        c.execute(_INSERT, [r.columns() for r in rows])

    def record(self, rows: Sequence[AuditRow]) -> None:
        """In a durable transaction of its own (the commit survives power loss before this
        returns), then forwarded. Raises when the database refuses: the caller decides."""
        with self.db.engine.connect() as conn, conn.begin():
            self.insert(conn, rows)
        self.forward(rows)

    def forward(self, rows: Iterable[AuditRow]) -> None:
        """A copy to the syslog collector, if one is configured; never raises."""
        if self.forwarder is None:
            return
        for r in rows:
            self.forwarder.send(r.resource)

    def close(self) -> None:
        if self.forwarder is not None:
            self.forwarder.close()


def subject_of(db: Database, ref: str) -> Any:
    """The patient a stored resource is about, for entity:patient: an upload's `subject`
    (Media, DocumentReference, the focus of a Task) or an ImagingStudy's patient reference."""
    import json

    from fhirbridge.store.models import ImagingStudyRecord, Submission, Task

    rtype, _, rid = ref.partition("/")
    if not rid:
        return None
    with db.session() as s:
        if rtype == "ImagingStudy":
            study = s.get(ImagingStudyRecord, rid)
            return study.patient_ref if study is not None else None
        if rtype == "Task":
            task = s.get(Task, rid)
            if task is None:
                return None
            rid = task.submission_id
        elif rtype not in ("Media", "DocumentReference"):
            return None
        sub = s.get(Submission, rid)
    if sub is None:
        return None
    return json.loads(sub.resource_json).get("subject")
