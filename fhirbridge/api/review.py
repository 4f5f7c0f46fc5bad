"""The review queue's JSON API: `GET /review`, `POST /review/{task_id}` (confirm / reject).

The reviewer recorded with a decision is the identity the credential proves (token `sub`,
"admin-token", "loopback@addr"); a `reviewer` still sent in the body is ignored."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from fhirbridge.api.deps import require_operator, services_of
from fhirbridge.audit.middleware import agent_of
from fhirbridge.fhir.outcome import FhirError
from fhirbridge.pipeline.review import ReviewError, decide, decisions_for, list_held

router = APIRouter(dependencies=[Depends(require_operator)])


class Decision(BaseModel):
    decision: str  # confirm | reject
    # no `reviewer`: who decided comes from the credential; old clients that still send one
    # are not refused (pydantic ignores unknown fields) and the value is never stored
    patient: str = ""  # Patient/{id} or index:{key}, for confirm
    comment: str = ""


@router.get("/review")
def held(request: Request) -> list[dict[str, Any]]:
    return [{"task": f"Task/{h.task_id}", "focus": h.focus, "reason": h.reason_code,
             "detail": h.reason_text, "candidates": h.candidates,
             "selfReported": h.self_reported, "subject": h.subject,
             "held_since": h.held_since.isoformat()} for h in list_held(services_of(request).db)]


@router.post("/review/{task_id}")
def review(task_id: str, body: Decision, request: Request) -> JSONResponse:
    svc = services_of(request)
    agent = agent_of(request.scope, 200)  # the caller require_operator proved
    # the request's own AuditEvent (middleware) names the Task and the confirmed patient
    noted = getattr(request.state, "audit_entities", None) or []
    request.state.audit_entities = noted
    noted.append((f"Task/{task_id}", body.patient if body.patient.startswith("Patient/")
                  else ""))
    try:
        rec = decide(svc.db, task_id, decision=body.decision, reviewer=agent.who,
                     patient_ref=body.patient, comment=body.comment, audit=svc.audit,
                     agent=agent)
    except ReviewError as exc:
        raise FhirError(exc.status, "invalid" if exc.status == 400 else
                        ("not-found" if exc.status == 404 else "conflict"), exc.text) from None
    return JSONResponse({"task": f"Task/{task_id}", "decision": rec.decision,
                         "patient": rec.patient_ref, "reviewer": rec.reviewer,
                         "decided_at": rec.decided_at.isoformat()})


@router.get("/review/{task_id}/decisions")
def history(task_id: str, request: Request) -> list[dict[str, Any]]:
    return [{"decision": d.decision, "patient": d.patient_ref, "reviewer": d.reviewer,
             "comment": d.comment, "decided_at": d.decided_at.isoformat()}
            for d in decisions_for(services_of(request).db, task_id)]
