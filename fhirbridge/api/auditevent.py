"""`GET /fhir/AuditEvent?patient=…&date=…&agent=…` and `GET /fhir/AuditEvent/{id}`: the audit
trail as FHIR R4 AuditEvent (search parameters of FHIR R4 AuditEvent; scope AuditEvent.rs).
"""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy import ColumnElement, and_, func, or_, select

from fhirbridge.api.auth import require_scope
from fhirbridge.api.deps import services_of
from fhirbridge.api.responses import fhir_response
from fhirbridge.fhir.outcome import FhirError
from fhirbridge.store.models import AuditEventRecord

# SMART scope system/AuditEvent.rs (without [auth]: loopback clients, like all of /fhir)
router = APIRouter(dependencies=[Depends(require_scope("AuditEvent", "rs"))])

KNOWN = {"patient", "date", "agent", "entity", "type", "subtype", "outcome", "action",
         "_count", "_cursor"}
MAX_COUNT = 1000
_PREFIXES = ("ge", "le", "gt", "lt", "eq")


def _bound_patient(request: Request) -> str:
    """A patient-bound token (SMART `patient/` scopes) sees that patient's events only."""
    caller = getattr(request.state, "caller", None)
    patient = str(getattr(caller, "patient", "") or "")
    return f"Patient/{patient}" if patient else ""


def _date_range(value: str) -> tuple[datetime, datetime]:
    """The instant range a FHIR date/dateTime value covers (FHIR R4 search 3.1.1.4.2.5)."""
    try:
        if len(value) == 4:
            start = datetime(int(value), 1, 1, tzinfo=timezone.utc)
            return start, start.replace(year=start.year + 1)
        if len(value) == 7:
            start = datetime.strptime(value, "%Y-%m").replace(tzinfo=timezone.utc)
            nxt = (start + timedelta(days=32)).replace(day=1)
            return start, nxt
        if len(value) == 10:
            start = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=timezone.utc)
            return start, start + timedelta(days=1)
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise FhirError(400, "invalid", "date must be a FHIR date or dateTime, optionally "
                        "prefixed with ge, le, gt, lt or eq", expression="date") from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    at = at.astimezone(timezone.utc)
    step = timedelta(microseconds=1) if at.microsecond else timedelta(seconds=1)
    return at, at + step


def _date_clause(raw: str) -> ColumnElement[bool]:
    prefix, value = ("eq", raw)
    if raw[:2] in _PREFIXES:
        prefix, value = raw[:2], raw[2:]
    start, end = _date_range(value)
    col = AuditEventRecord.recorded
    # stored as UTC; compare naive UTC on SQLite (its DATETIME keeps no zone)
    return {"ge": col >= start, "gt": col >= end, "le": col < end, "lt": col < start,
            "eq": (col >= start) & (col < end)}[prefix]


def _patient_value(value: str) -> str:
    value = value.split("/fhir/")[-1]
    if "|" in value:  # an ADT event's patient: its identifier (system|value)
        return f"identifier:{value}"
    return value if value.startswith("Patient/") else f"Patient/{value}"


def _where(request: Request) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    for key, value in request.query_params.multi_items():
        if key not in KNOWN:
            raise FhirError(400, "not-supported", f"unknown search parameter {key[:40]!r}; "
                            f"supported: {', '.join(sorted(KNOWN))}")
        if key in ("_count", "_cursor"):
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


def _int_param(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        n = int(raw)
    except ValueError:
        raise FhirError(400, "invalid", f"{name} must be a whole number",
                        expression=name) from None
    if n < 0:
        raise FhirError(400, "invalid", f"{name} must not be negative", expression=name)
    return n


def _cursor(request: Request) -> ColumnElement[bool] | None:
    """The `next` link's position: events older than the last one of the previous page
    (keyset paging: events recorded meanwhile, such as this search's own, do not shift it)."""
    raw = request.query_params.get("_cursor")
    if raw is None:
        return None
    try:
        stamp, _, last_id = base64.urlsafe_b64decode(raw.encode()).decode().partition("|")
        at = datetime.fromisoformat(stamp)
    except (ValueError, UnicodeDecodeError):
        raise FhirError(400, "invalid", "_cursor is not one this server gave",
                        expression="_cursor") from None
    col = AuditEventRecord.recorded
    return or_(col < at, and_(col == at, AuditEventRecord.id < last_id))


@router.get("/fhir/AuditEvent")
def search_audit(request: Request) -> Response:
    where = _where(request)
    count = min(_int_param(request, "_count", 100), MAX_COUNT)
    after = _cursor(request)
    q = (select(AuditEventRecord.resource_json, AuditEventRecord.recorded,
                AuditEventRecord.id)
         .where(*where, *([after] if after is not None else []))
         .order_by(AuditEventRecord.recorded.desc(), AuditEventRecord.id.desc())
         .limit(count + 1))
    with services_of(request).db.session() as s:
        total = s.scalar(select(func.count()).select_from(AuditEventRecord).where(*where)) or 0
        rows = list(s.execute(q))
    base = services_of(request).settings.fhir_base_url
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "_cursor"]
    links = [{"relation": "self", "url": str(request.url)}]
    if len(rows) > count and count > 0:
        last = rows[count - 1]
        token = base64.urlsafe_b64encode(
            f"{last.recorded.isoformat()}|{last.id}".encode()).decode()
        links.append({"relation": "next", "url": f"{base}/AuditEvent?" + urlencode(
            params + [("_cursor", token)])})
    entries = []
    for raw, _, _ in rows[:count]:
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
