"""`GET /fhir/Task/{id}` and `GET /fhir/Task?focus=…` (FHIR R4 Task read and search).

SMART scopes `Task.r` / `Task.s`; a patient-bound token sees its patient's Tasks only."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy import func, or_, select

from fhirbridge.api.auth import Caller, note_audit, require_scope
from fhirbridge.api.deps import services_of
from fhirbridge.api.responses import fhir_response, version_headers, version_of
from fhirbridge.api.search import (
    count_of,
    date_clause,
    keyset_page,
    page_links,
    patient_reference,
    self_link,
    supported_parameters,
    values_of,
)
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
    # a Task changes as its upload is processed: its version is its last-modified instant in
    # ms, a weak validator (R4 http.html#versioning; no _history of Tasks is kept)
    version = version_of(task.last_modified)
    resource = task_resource(task)
    resource["meta"] = dict(resource.get("meta") or {}, versionId=version)
    return fhir_response(resource, headers=version_headers(version, task.last_modified))


TASK_PARAMETERS = frozenset({"_id", "focus", "patient", "subject", "status", "_lastUpdated",
                             "_summary", "_cursor"})


def task_conditions(kept: list[tuple[str, str]]) -> list[Any]:
    """R4 Task search parameters: `_id`, `focus`, `patient`/`subject` (the patient the upload
    was bound to or stored under: an unknown patient matches nothing), `status`,
    `_lastUpdated` (prefixes). Comma = OR, a repeated parameter = AND."""
    where: list[Any] = []
    for values in values_of(kept, "_id"):
        where.append(Task.id.in_(values))
    for values in values_of(kept, "focus"):
        where.append(Task.focus.in_([v.split("/fhir/")[-1].split("/_history")[0]
                                     for v in values]))
    for name in ("patient", "subject"):
        for values in values_of(kept, name):
            where.append(or_(*[submission_of_patient(patient_reference(v)) for v in values]))
    for values in values_of(kept, "status"):
        where.append(Task.status.in_(values))
    for values in values_of(kept, "_lastUpdated"):
        where.append(or_(*[date_clause(Task.last_modified, v, "_lastUpdated") for v in values]))
    summary = [v for v in values_of(kept, "_summary")]
    if summary and summary != [["count"]]:
        raise FhirError(400, "not-supported", "_summary supports count only",
                        expression="_summary")
    return where


@router.get("/fhir/Task")
def search_task(request: Request,
                caller: Caller = Depends(require_scope("Task", "s"))) -> Response:
    kept = supported_parameters(request, TASK_PARAMETERS)
    where = task_conditions(kept)
    count = 0 if ("_summary", "count") in kept else count_of(kept)
    if caller.patient:  # whatever the query says, only the token's patient
        where.append(submission_of_patient(caller.bound_patient))
    joined = select(Task, Submission.bound_patient).join(Submission,
                                                         Submission.id == Task.submission_id)
    total_q = select(func.count()).select_from(Task).join(
        Submission, Submission.id == Task.submission_id).where(*where)
    with services_of(request).db.session() as s:
        total = s.scalar(total_q) or 0
        # newest first, keyset on (authoredOn, id): uploads arriving while a client pages
        # land before its first page and never shift the next ones
        rows, nxt, prev = keyset_page(s, joined.where(*where), [Task.authored_on, Task.id],
                                      True, kept, count,
                                      lambda row: [row[0].authored_on, row[0].id])
    for task, bound in rows:
        note_audit(request, f"Task/{task.id}", bound)
    base = services_of(request).settings.fhir_base_url
    bundle = searchset([task_resource(t) for t, _ in rows],
                       self_link(base, "Task", kept), total=total, base=base)
    bundle["link"] += page_links(base, "Task", kept, nxt, prev)
    return fhir_response(bundle)
