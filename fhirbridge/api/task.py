"""`GET /fhir/Task/{id}` and `GET /fhir/Task?focus=…` (FHIR R4 Task read and search).

SMART scopes `Task.r` / `Task.s`; a patient-bound token sees its patient's Tasks only."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy import func, select

from fhirbridge.api.auth import Caller, note_audit, require_scope
from fhirbridge.api.deps import services_of
from fhirbridge.api.responses import fhir_response
from fhirbridge.api.uploads import submission_of_patient
from fhirbridge.fhir.outcome import FhirError
from fhirbridge.fhir.task import searchset, task_resource
from fhirbridge.store.models import Submission, Task

router = APIRouter()


@router.get("/fhir/Task/{task_id}")
def read_task(task_id: str, request: Request,
              caller: Caller = Depends(require_scope("Task", "r"))) -> Response:
    q = select(Task, Submission.bound_patient).join(Submission,
                                                    Submission.id == Task.submission_id)
    q = q.where(Task.id == task_id)
    if caller.patient:  # another patient's Task: as if it did not exist
        q = q.where(submission_of_patient(caller.bound_patient))
    with services_of(request).db.session() as s:
        row = s.execute(q).first()
    if row is None:
        raise FhirError(404, "not-found", "no such Task")
    task, bound = row
    note_audit(request, f"Task/{task.id}", bound)
    return fhir_response(task_resource(task))


@router.get("/fhir/Task")
def search_task(request: Request, focus: str | None = None, status: str | None = None,
                _count: int = 100,
                caller: Caller = Depends(require_scope("Task", "s"))) -> Response:
    where = []
    if focus:
        where.append(Task.focus == focus.split("/fhir/")[-1])
    if status:
        where.append(Task.status.in_(status.split(",")))
    if caller.patient:  # whatever the query says, only the token's patient
        where.append(submission_of_patient(caller.bound_patient))
    joined = select(Task, Submission.bound_patient).join(Submission,
                                                         Submission.id == Task.submission_id)
    q = joined.where(*where).order_by(Task.authored_on.desc())
    count = select(func.count()).select_from(Task).join(
        Submission, Submission.id == Task.submission_id).where(*where)
    with services_of(request).db.session() as s:
        total = s.scalar(count) or 0
        rows = list(s.execute(q.limit(max(0, min(_count, 1000)))))
    for task, bound in rows:
        note_audit(request, f"Task/{task.id}", bound)
    return fhir_response(searchset([task_resource(t) for t, _ in rows], str(request.url),
                                   total=total))
