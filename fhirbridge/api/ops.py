"""Operations: /healthz, /readyz, /metrics, /fhir/metadata, and the operator's job list."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path

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


READY_CACHE_SECONDS = 5.0  # /readyz answers from a probe at most this old
# data_dir needs this much free space to be ready: 64 MiB (an upload of the default
# http.max_body_bytes), or 1 % of a smaller file system
DISK_MIN_FREE_BYTES = 64 * 1024 * 1024
DISK_MIN_FREE_FRACTION = 0.01


def disk_has_room(path: Path) -> bool:
    """Free space (as an unprivileged writer sees it) in the file system holding `path`."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return False
    return usage.free >= min(DISK_MIN_FREE_BYTES, int(usage.total * DISK_MIN_FREE_FRACTION))


class Readiness:
    """The last probe of every dependency, kept `max_age` seconds: a flood of /readyz calls
    costs one probe (one C-ECHO association, one EHR request) per period, and only one probe
    runs at a time; callers meanwhile get the last answer."""

    def __init__(self, probes: dict[str, Callable[[], bool]],
                 max_age: float = READY_CACHE_SECONDS) -> None:
        self.probes = probes
        self.max_age = max_age
        self._checks: dict[str, bool] | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    def _probe(self) -> dict[str, bool]:
        checks = {}
        for name, probe in self.probes.items():
            try:
                checks[name] = bool(probe())
            except Exception:  # noqa: BLE001 - an unreachable dependency is "not ready"
                checks[name] = False
        return checks

    async def checks(self) -> dict[str, bool]:
        if self._checks is not None and time.monotonic() - self._at < self.max_age:
            return self._checks
        if self._lock.locked() and self._checks is not None:
            return self._checks  # a probe is in flight: the last answer meanwhile
        async with self._lock:
            if self._checks is None or time.monotonic() - self._at >= self.max_age:
                self._checks = await asyncio.to_thread(self._probe)
                self._at = time.monotonic()
            return self._checks


def _readiness(request: Request) -> Readiness:
    ready = getattr(request.app.state, "readiness", None)
    if ready is None:
        svc = services_of(request)
        probes: dict[str, Callable[[], bool]] = {
            "database": svc.db.ping, "pacs": svc.pacs.ping,
            "disk": lambda: disk_has_room(svc.settings.data_dir)}
        if svc.ehr is not None:
            probes["ehr"] = svc.ehr.ping
        ready = request.app.state.readiness = Readiness(probes)
    return ready


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    checks = await _readiness(request).checks()
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
def metadata(request: Request) -> Response:
    """Open to all (no token): with [auth], rest.security carries the OAuth endpoints."""
    from fhirbridge.api.auth import oauth_uris

    verifier = services_of(request).verifier
    return fhir_response(capability_statement(oauth_uris(verifier) if verifier else None,
                                              services_of(request).settings.fhir_base_url))


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
    # ids are 64-bit database integers: a larger one names no job (and would overflow the driver)
    if not 0 < job_id < 2**63 or not services_of(request).queue.retry(job_id):
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
