"""`GET /fhir/Task/{id}` and `GET /fhir/Task?focus=…` (FHIR R4 Task read and search)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import func, select

from fhirbridge.api.deps import services_of
from fhirbridge.api.responses import fhir_response
from fhirbridge.fhir.outcome import FhirError
from fhirbridge.fhir.task import searchset, task_resource
from fhirbridge.store.models import Task

router = APIRouter()


@router.get("/fhir/Task/{task_id}")
def read_task(task_id: str, request: Request) -> Response:
    with services_of(request).db.session() as s:
        task = s.get(Task, task_id)
    if task is None:
        raise FhirError(404, "not-found", "no such Task")
    return fhir_response(task_resource(task))


@router.get("/fhir/Task")
def search_task(request: Request, focus: str | None = None, status: str | None = None,
                _count: int = 100) -> Response:
    where = []
    if focus:
        where.append(Task.focus == focus.split("/fhir/")[-1])
    if status:
        where.append(Task.status.in_(status.split(",")))
    q = select(Task).where(*where).order_by(Task.authored_on.desc())
    with services_of(request).db.session() as s:
        total = s.scalar(select(func.count()).select_from(Task).where(*where)) or 0
        tasks = list(s.scalars(q.limit(max(0, min(_count, 1000)))))
    return fhir_response(searchset([task_resource(t) for t in tasks], str(request.url),
                                   total=total))
