"""Operations: /healthz, /readyz, /metrics, /fhir/metadata, and the operator's job list."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select

from fhirbridge.api.deps import require_operator, services_of
from fhirbridge.api.responses import fhir_response
from fhirbridge.fhir.capability import capability_statement
from fhirbridge.fhir.outcome import FhirError
from fhirbridge.store.models import Job

router = APIRouter()


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    svc = services_of(request)
    checks = {"database": svc.db.ping(), "pacs": svc.pacs.ping()}
    if svc.ehr is not None:
        checks["ehr"] = svc.ehr.ping()
    ok = all(checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks},
                        status_code=200 if ok else 503)


@router.get("/metrics")
def metrics(request: Request) -> Response:
    svc = services_of(request)
    with svc.db.session() as s:
        for state, n in s.execute(select(Job.state, func.count()).group_by(Job.state)):
            svc.metrics.jobs.labels(state=state).set(n)
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/fhir/metadata")
def metadata() -> Response:
    return fhir_response(capability_statement())


@router.get("/admin/jobs", dependencies=[Depends(require_operator)])
def list_jobs(request: Request, state: str = "failed") -> JSONResponse:
    with services_of(request).db.session() as s:
        jobs = list(s.scalars(select(Job).where(Job.state == state).order_by(Job.id).limit(1000)))
    return JSONResponse([{"id": j.id, "kind": j.kind, "subject": j.subject_id, "state": j.state,
                          "attempts": j.attempts, "last_error": j.last_error,
                          "updated_at": j.updated_at.isoformat() if j.updated_at else None}
                         for j in jobs])


@router.post("/admin/jobs/{job_id}/retry", dependencies=[Depends(require_operator)])
def retry_job(job_id: int, request: Request) -> JSONResponse:
    if not services_of(request).queue.retry(job_id):
        raise FhirError(404, "not-found", "no failed job with that id")
    return JSONResponse({"id": job_id, "state": "queued"})


@router.post("/admin/ehr-recheck", dependencies=[Depends(require_operator)])
def ehr_recheck(request: Request) -> JSONResponse:
    """Re-read every stored patient at the EHR now (merges, demographic changes)."""
    from fhirbridge.pipeline.ehr_recheck import schedule_recheck

    svc = services_of(request)
    if svc.ehr is None:
        raise FhirError(409, "business-rule", "no EHR is configured")
    queued = schedule_recheck(svc.pipeline)
    return JSONResponse({"queued": queued}, status_code=202)
