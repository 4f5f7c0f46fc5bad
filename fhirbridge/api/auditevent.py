"""`GET /fhir/AuditEvent?patient=…&date=…&agent=…` and `GET /fhir/AuditEvent/{id}`: the audit
trail as FHIR R4 AuditEvent (search parameters of FHIR R4 AuditEvent; scope AuditEvent.rs).
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy import ColumnElement, func, or_, select

from fhirbridge.api.auth import require_scope
from fhirbridge.api.deps import services_of
from fhirbridge.api.responses import fhir_response
from fhirbridge.api.search import (
    count_of,
    date_clause,
    keyset_page,
    page_links,
    self_link,
    supported_parameters,
)
from fhirbridge.fhir.outcome import FhirError
from fhirbridge.store.models import AuditEventRecord

# SMART scope system/AuditEvent.rs (without [auth]: loopback clients, like all of /fhir)
router = APIRouter(dependencies=[Depends(require_scope("AuditEvent", "rs"))])

KNOWN = {"patient", "date", "agent", "entity", "type", "subtype", "outcome", "action",
         "_count", "_cursor"}


def _bound_patient(request: Request) -> str:
    """A patient-bound token (SMART `patient/` scopes) sees that patient's events only."""
    caller = getattr(request.state, "caller", None)
    patient = str(getattr(caller, "patient", "") or "")
    return f"Patient/{patient}" if patient else ""


def _date_clause(raw: str) -> ColumnElement[bool]:
    return date_clause(AuditEventRecord.recorded, raw)


def _patient_value(value: str) -> str:
    value = value.split("/fhir/")[-1]
    if "|" in value:  # an ADT event's patient: its identifier (system|value)
        return f"identifier:{value}"
    return value if value.startswith("Patient/") else f"Patient/{value}"


def _where(request: Request) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    for key, value in supported_parameters(request, KNOWN):
        if key in ("_count", "_cursor", "_format"):
            continue
        values = [v for v in value.split(",") if v]  # a comma is OR (FHIR search 3.1.1.4)
        if not values:
            raise FhirError(400, "invalid", f"{key} needs a value", expression=key)
        if key == "date":
            where.append(or_(*[_date_clause(v) for v in values]))
        elif key == "patient":
            where.append(AuditEventRecord.patient_ref.in_([_patient_value(v) for v in values]))
        elif key == "agent":
            where.append(or_(AuditEventRecord.agent_who.in_(values),
                             AuditEventRecord.agent_alt.in_(values)))
        elif key == "entity":
            where.append(AuditEventRecord.entity_ref.in_(
                [v.split("/fhir/")[-1] for v in values]))
        else:  # type, subtype, outcome, action: token (a system| prefix is ignored)
            column = getattr(AuditEventRecord, key)
            where.append(column.in_([v.split("|")[-1] for v in values]))
    bound = _bound_patient(request)
    if bound:
        where.append(AuditEventRecord.patient_ref == bound)
    return where


@router.get("/fhir/AuditEvent")
def search_audit(request: Request) -> Response:
    where = _where(request)
    kept = supported_parameters(request, KNOWN)
    count = count_of(kept)
    col = AuditEventRecord
    with services_of(request).db.session() as s:
        total = s.scalar(select(func.count()).select_from(col).where(*where)) or 0
        # newest first, keyset on (recorded, id): events recorded meanwhile, such as this
        # search's own, do not shift a page
        rows, nxt, prev = keyset_page(s, select(col.resource_json, col.recorded, col.id)
                                      .where(*where), [col.recorded, col.id], True, kept,
                                      count, lambda row: [row.recorded, row.id])
    base = services_of(request).settings.fhir_base_url
    links = [{"relation": "self", "url": self_link(base, "AuditEvent", kept)}]
    links += page_links(base, "AuditEvent", kept, nxt, prev)
    entries = []
    for raw, _, _ in rows:
        r = json.loads(raw)
        entries.append({"fullUrl": f"{base}/AuditEvent/{r['id']}", "resource": r,
                        "search": {"mode": "match"}})
    return fhir_response({"resourceType": "Bundle", "type": "searchset", "total": total,
                          "link": links, "entry": entries})


@router.get("/fhir/AuditEvent/{event_id}")
def read_audit(event_id: str, request: Request) -> Response:
    with services_of(request).db.session() as s:
        rec = s.get(AuditEventRecord, event_id)
    bound = _bound_patient(request)
    if rec is None or (bound and rec.patient_ref != bound):
        raise FhirError(404, "not-found", "no such AuditEvent")
    return fhir_response(json.loads(rec.resource_json))
