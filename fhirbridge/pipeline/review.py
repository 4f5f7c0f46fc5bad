"""The review queue: uploads held because identity was doubtful, and a person's decision —
confirm a patient (the pipeline continues with that patient) or reject. Every decision is
recorded with who and when — the reviewer is the credential's identity, and the decision's
AuditEvent (IHE BALP Update of the Task) is written in the same transaction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from fhirbridge.audit import Agent, AuditRecorder, review_event
from fhirbridge.identity.model import review_summary
from fhirbridge.pipeline.intake import UPLOAD_JOB
from fhirbridge.pipeline.process import describe_upload
from fhirbridge.pipeline.queue import enqueue
from fhirbridge.store.db import Database
from fhirbridge.store.models import ReviewDecision, Submission, Task


class ReviewError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


@dataclass(frozen=True)
class HeldItem:
    task_id: str
    focus: str
    reason_code: str
    reason_text: str
    candidates: list[dict[str, Any]]  # review_summary of each candidate (PHI)
    self_reported: dict[str, Any] | None  # what the patient typed (PHI), evidence only
    subject: dict[str, Any]  # the upload's subject as sent
    held_since: datetime


def list_held(db: Database) -> list[HeldItem]:
    with db.session() as s:
        rows = list(s.execute(select(Task, Submission)
                              .join(Submission, Submission.id == Task.submission_id)
                              .where(Task.status == "on-hold").order_by(Task.last_modified)))
    items = []
    for t, sub in rows:
        resource = json.loads(sub.resource_json)
        try:
            reported = describe_upload(sub.resource_type, resource).self_reported
        except Exception:  # noqa: BLE001 - a stored upload that no longer parses
            reported = None
        cands = [c if isinstance(c, dict) else {"ref": c}
                 for c in json.loads(t.candidates_json or "[]")]
        items.append(HeldItem(t.id, t.focus, t.reason_code, t.reason_text, cands,
                              review_summary(reported) if reported is not None else None,
                              resource.get("subject") or {}, t.last_modified))
    return items


def decide(db: Database, task_id: str, *, decision: str, reviewer: str, patient_ref: str = "",
           comment: str = "", audit: AuditRecorder | None = None,
           agent: Agent | None = None) -> ReviewDecision:
    """`reviewer` is who the credential proves the caller is (never a value from the
    request body); `agent` the same identity for the AuditEvent (address, client)."""
    if decision not in ("confirm", "reject"):
        raise ReviewError(400, "decision must be confirm or reject")
    if not reviewer.strip():
        raise ReviewError(400, "reviewer is required")
    if decision == "confirm" and not (patient_ref.startswith("Patient/")
                                      or patient_ref.startswith("index:")):
        raise ReviewError(400, "confirm needs patient: Patient/{id} (EHR) or index:{key}")
    with db.transaction() as s:
        task = s.get(Task, task_id)
        if task is None:
            raise ReviewError(404, "no such Task")
        if task.status != "on-hold":
            raise ReviewError(409, "the Task is not on hold")
        record = ReviewDecision(task_id=task_id, decision=decision, patient_ref=patient_ref,
                                reviewer=reviewer.strip()[:128], comment=comment[:2000])
        s.add(record)
        if decision == "confirm":
            task.status, task.reason_code, task.reason_text = (
                "requested", "confirmed-by-reviewer", "identity confirmed by a reviewer")
            enqueue(s, UPLOAD_JOB, task.submission_id, {"confirmed_patient": {
                "ref": patient_ref, "reviewer": record.reviewer}})
        else:
            task.status, task.reason_code, task.reason_text = (
                "failed", "rejected-by-reviewer", "rejected by a reviewer")
        row = None
        if audit is not None:
            row = review_event(task_id=task_id, decision=decision, patient_ref=patient_ref,
                               agent=agent or Agent(record.reviewer),
                               source_id=audit.source_id)
            audit.insert(s, [row])
    if audit is not None and row is not None:
        audit.forward([row])
    return record


def decisions_for(db: Database, task_id: str) -> list[ReviewDecision]:
    with db.session() as s:
        return list(s.scalars(select(ReviewDecision).where(ReviewDecision.task_id == task_id)
                              .order_by(ReviewDecision.id)))
