"""ASGI middleware: one FHIR AuditEvent (IHE BALP RESTful pattern) per request to `/fhir/*`,
`/review*` and `/admin/*` — refused requests included — written BEFORE the answer starts.

The row is written when the application sends `http.response.start` (the status is known then),
in a thread (the database is synchronous), and only then is the answer let through. If the row
cannot be written, the client gets 503 instead of the answer: a hospital would rather refuse
than act unaudited. A create whose own transaction had already committed cannot be undone by
that 503; it is logged (without PHI) and the client's retry is answered from the stored copy
(the upload's idempotency key).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from fhirbridge.api.auth import is_loopback
from fhirbridge.audit.events import Agent, Entity, interaction_of, rest_event
from fhirbridge.audit.recorder import AuditRecorder
from fhirbridge.fhir.outcome import operation_outcome

log = logging.getLogger("fhirbridge.audit")
Scope = dict[str, Any]

AUDITED_PREFIXES = ("/fhir", "/review", "/admin")
NOT_AUDITED = frozenset({"/fhir/metadata", "/fhir/.well-known/smart-configuration"})
_UPLOAD_TYPES = ("Media", "DocumentReference")


def audited(path: str) -> bool:
    path = path.rstrip("/") or "/"
    if path in NOT_AUDITED or "/.well-known/" in path:
        return False
    return any(path == p or path.startswith(p + "/") for p in AUDITED_PREFIXES)


def _address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else ""


def agent_of(scope: Scope, status: int) -> Agent:
    """Who made the request, from the proven credential only (never from the body): the
    Caller that authentication left in `request.state.caller` (token `sub` + `client_id`,
    the admin token, a loopback client: `fhirbridge.api.auth`), "unauthenticated" for a 401,
    else the network address."""
    state = scope.get("state") or {}
    address = _address(scope)
    caller = state.get("caller") if isinstance(state, dict) else None
    if caller is not None:
        who = str(getattr(caller, "who", "") or "")
        client_id = str(getattr(caller, "client_id", "") or "")
        return Agent(who or "unknown", client_id if client_id != who else "",
                     str(getattr(caller, "address", "") or address),
                     str(getattr(caller, "kind", "") or "token"))
    if status == 401:
        return Agent("unauthenticated", "", address, "unauthenticated")
    if is_loopback(address):
        return Agent(f"loopback@{address}", "", address, "loopback")
    return Agent(f"anonymous@{address}", "", address, "anonymous")


def _location_ref(headers: list[tuple[bytes, bytes]], rtype: str) -> str:
    """`Media/{id}` from a create's Location header (…/Media/{id}/_history/1)."""
    for k, v in headers:
        if k.lower() == b"location":
            parts = bytes(v).decode("latin-1").split("/")
            for i in range(len(parts) - 1):
                if parts[i] == rtype and parts[i + 1]:
                    return f"{rtype}/{parts[i + 1]}"
    return ""


def patient_entity(subject: Any) -> Entity | None:
    """entity:patient from a reference ("Patient/9", an absolute URL) or an identifier."""
    if isinstance(subject, str):
        subject = {"reference": subject}
    if not isinstance(subject, dict):
        return None
    ref = subject.get("reference")
    if isinstance(ref, str) and "Patient/" in ref:
        tail = ref[ref.rindex("Patient/"):].split("/_history")[0]
        return Entity("patient", reference=tail)
    ident = subject.get("identifier")
    if isinstance(ident, dict) and ident.get("value"):
        return Entity("patient", identifier=(str(ident.get("system") or ""),
                                             str(ident["value"])))
    return None


class AuditMiddleware:
    """`lookup_patient(reference)` (blocking) returns the subject of a stored resource
    ("Media/1" → its subject) so reads and creates carry BALP's entity:patient."""

    def __init__(self, app: Any, recorder: AuditRecorder, *,
                 lookup_patient: Callable[[str], Any] | None = None) -> None:
        self.app = app
        self.recorder = recorder
        self.lookup_patient = lookup_patient

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not audited(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})  # shared with request.state of the route
        started = False
        replaced = False

        async def audited_send(message: dict[str, Any]) -> None:
            nonlocal started, replaced
            if replaced:
                return  # the 503 went out instead of this answer
            if message["type"] == "http.response.start" and not started:
                started = True
                if not await self._write(scope, message["status"],
                                         list(message.get("headers") or [])):
                    replaced = True
                    await _refuse(send)
                    return
            await send(message)

        try:
            await self.app(scope, receive, audited_send)
        except Exception:
            if not started:
                started = True
                await self._write(scope, 500, [])
            raise

    async def _write(self, scope: Scope, status: int, headers: list[tuple[bytes, bytes]]
                     ) -> bool:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._record, scope, status, headers)
            return True
        except Exception as exc:  # noqa: BLE001 - answered 503 below; no PHI in the log
            log.error("audit record for a %s request could not be written (%s): answering "
                      "503", scope.get("method", ""), type(exc).__name__)
            if 200 <= status < 300 and scope.get("method") not in ("GET", "HEAD"):
                log.error("the refused request had already been carried out (HTTP %d); its "
                          "audit record is missing", status)
            return False

    def _record(self, scope: Scope, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        interaction, rtype, rid = interaction_of(scope.get("method", "GET"), scope["path"])
        entities = self._entities(scope, interaction, rtype, rid, status, headers)
        row = rest_event(interaction=interaction, status=status,
                         agent=agent_of(scope, status), entities=entities,
                         source_id=self.recorder.source_id,
                         server_address=self.recorder.server_address)
        self.recorder.record([row])

    def _entities(self, scope: Scope, interaction: str, rtype: str, rid: str, status: int,
                  headers: list[tuple[bytes, bytes]]) -> list[Entity]:
        state = scope.get("state") or {}
        noted = state.get("audit_entities") if isinstance(state, dict) else None
        entities: list[Entity] = []
        query = bytes(scope.get("query_string") or b"")
        if noted:  # what the route named (fhirbridge.api.auth.note_audit)
            for ref, patient in noted:
                if ref:
                    entities.append(_object(ref))
                p = patient_entity(patient) if patient else None
                if p is not None and p not in entities:
                    entities.append(p)
            first = entities[0] if entities else None
            if (first is not None and first.reference and scope["path"].startswith("/fhir")
                    and interaction in ("create", "read", "vread", "update")
                    and not any(e.kind == "patient" for e in entities)):
                p = self._patient_of(first.reference)  # e.g. a subject given by identifier
                if p is not None:
                    entities.append(p)
        else:
            ref = ""
            if interaction == "create" and 200 <= status < 300:
                ref = _location_ref(headers, rtype)
            elif rid:  # a read; operator paths: review/{task}, admin/jobs/{id}/retry
                ref = f"{rtype}/{rid}"
            if ref:
                entities.append(_object(ref))
                p = self._patient_of(ref) if scope["path"].startswith("/fhir") else None
                if p is not None:
                    entities.append(p)
        if interaction.startswith("search") or (query and interaction == "operation"):
            entities.insert(0, Entity("query", query=query))
            if not any(e.kind == "patient" for e in entities):
                params = dict(parse_qsl(query.decode("latin-1")))
                value = params.get("patient") or params.get("subject")
                p = patient_entity(value if "/" in (value or "") else
                                   f"Patient/{value}") if value else None
                if p is not None:
                    entities.append(p)
        return entities

    def _patient_of(self, ref: str) -> Entity | None:
        if self.lookup_patient is None:
            return None
        try:
            return patient_entity(self.lookup_patient(ref))
        except Exception:  # noqa: BLE001 - the event is still recorded, without the patient
            return None


def _object(ref: str) -> Entity:
    """entity:data — a FHIR reference, or an identifier for fhirbridge's own objects."""
    rtype = ref.split("/", 1)[0]
    if rtype and rtype[0].isupper():
        return Entity("object", reference=ref)
    return Entity("object", identifier=(f"urn:fhirbridge:{rtype}", ref.split("/", 1)[-1]))


async def _refuse(send: Any) -> None:
    body = json.dumps(operation_outcome(
        "transient", "the audit trail could not be written; the request was not answered, "
        "retry later")).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/fhir+json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
