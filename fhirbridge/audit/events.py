"""Pure builders of FHIR R4 AuditEvent resources shaped as IHE Basic Audit Log Patterns (BALP):
RESTful interactions, ADT-driven patient changes (ITI-8 style) and review decisions. No I/O.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

# -- code systems (FHIR R4 AuditEvent bindings, DICOM PS3.16 CID 400-405, BALP) ----------------
EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL = "http://hl7.org/fhir/restful-interaction"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
IHE_EVENT = "urn:ihe:event-type-code"
BALP = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit."

# restful-interaction code → AuditEvent.action (BALP: a search is Execute)
ACTIONS = {"create": "C", "read": "R", "vread": "R", "search-type": "E", "search-system": "E",
           "history-instance": "R", "update": "U", "patch": "U", "delete": "D",
           "transaction": "E", "batch": "E", "operation": "E"}
_PROFILES = {("create", False): "Create", ("create", True): "PatientCreate",
             ("read", False): "Read", ("read", True): "PatientRead",
             ("vread", False): "Read", ("vread", True): "PatientRead",
             ("search-type", False): "Query", ("search-type", True): "PatientQuery",
             ("update", False): "Update", ("update", True): "PatientUpdate",
             ("delete", False): "Delete", ("delete", True): "PatientDelete"}

# HL7 v2 ADT trigger → action on the patient record (merge retires the prior record: D)
ADT_ACTIONS = {"A01": "C", "A04": "C", "A05": "C", "A28": "C", "A40": "D", "A47": "U"}


@dataclass(frozen=True)
class Agent:
    """Who asked: a token's `sub` (+ `client_id`), an operator, or an MLLP peer."""

    who: str  # sub | "admin-token" | "loopback@addr" | "unauthenticated" | MLLP peer
    alt: str = ""  # client_id | MSH-3|MSH-4 sending application|facility
    address: str = ""  # network address (IP) of the client
    kind: str = ""  # token | loopback | admin-token | unauthenticated | mllp


@dataclass(frozen=True)
class Entity:
    """What was touched. `kind`: object (a resource), patient, query or message."""

    kind: str
    reference: str = ""  # "Media/123", "Patient/9", "Task/…"
    identifier: tuple[str, str] | None = None  # (system, value), when there is no reference
    query: bytes = b""  # search: the query string as received (BALP: base64 in entity.query)
    detail: tuple[tuple[str, str], ...] = ()  # (type, valueString)


@dataclass(frozen=True)
class AuditRow:
    """One AuditEvent: its search columns and the resource (what the recorder inserts)."""

    id: str
    recorded: datetime
    type: str
    subtype: str
    action: str
    outcome: str
    agent_who: str
    agent_alt: str
    patient_ref: str
    entity_ref: str
    resource: dict[str, Any] = field(repr=False)

    def columns(self) -> dict[str, Any]:
        import json

        return {"id": self.id, "recorded": self.recorded, "type": self.type,
                "subtype": self.subtype, "action": self.action, "outcome": self.outcome,
                "agent_who": self.agent_who[:256], "agent_alt": self.agent_alt[:256],
                "patient_ref": self.patient_ref[:256], "entity_ref": self.entity_ref[:256],
                "resource_json": json.dumps(self.resource, separators=(",", ":"))}


def outcome_of(status: int) -> str:
    """AuditEvent.outcome (R4 audit-event-outcome): 0 success, 4 minor failure (the request
    was refused: 4xx), 8 serious failure (5xx)."""
    if status < 400:
        return "0"
    return "4" if status < 500 else "8"


def interaction_of(method: str, path: str) -> tuple[str, str, str]:
    """(restful-interaction code, resource type, resource id) for a request to fhirbridge.
    Operator paths (`/review`, `/admin`) are `operation` (POST) or `search-type` (GET)."""
    parts = [p for p in path.split("/") if p]
    method = method.upper()
    if not parts or parts[0] != "fhir":
        kind = "operation" if method not in ("GET", "HEAD") else (
            "read" if len(parts) >= 2 and parts[0] == "review" else "search-type")
        return kind, parts[0] if parts else "", "/".join(parts[1:])
    rest = parts[1:]
    if not rest:
        return ("transaction" if method == "POST" else "search-system"), "", ""
    rtype = rest[0]
    rid = rest[1] if len(rest) > 1 else ""
    if rtype.startswith("$") or rid.startswith("$"):
        return "operation", rtype, ""
    if method in ("GET", "HEAD"):
        if not rid:
            return "search-type", rtype, ""
        if len(rest) > 3 and rest[2] == "_history":
            return "vread", rtype, rid
        if len(rest) == 3 and rest[2] == "_history":
            return "history-instance", rtype, rid
        return "read", rtype, rid
    if method == "POST":
        return ("search-type" if rid == "_search" else "create"), rtype, ""
    if method == "PUT":
        return "update", rtype, rid
    if method == "PATCH":
        return "patch", rtype, rid
    if method == "DELETE":
        return "delete", rtype, rid
    return "operation", rtype, rid


def _coding(system: str, code: str, display: str = "") -> dict[str, str]:
    c = {"system": system, "code": code}
    if display:
        c["display"] = display
    return c


def _instant(at: datetime) -> str:
    return at.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _agents(agent: Agent, source_id: str, server_address: str) -> list[dict[str, Any]]:
    """BALP: the client is the Source Role ID (DCM 110153, the requestor), the server the
    Destination Role ID (DCM 110152)."""
    client: dict[str, Any] = {
        "type": {"coding": [_coding(DCM, "110153", "Source Role ID")]},
        "who": {"identifier": {"value": agent.who or "unknown"}},
        "requestor": True,
    }
    if agent.alt:
        client["who"]["display"] = agent.alt
        client["altId"] = agent.alt
    if agent.address:
        client["network"] = {"address": agent.address, "type": "2"}  # 2 = IP address
    server: dict[str, Any] = {
        "type": {"coding": [_coding(DCM, "110152", "Destination Role ID")]},
        "who": {"display": source_id},
        "requestor": False,
    }
    if server_address:
        server["network"] = {"address": server_address, "type": "5"}  # 5 = URI
    return [client, server]


def _entity(e: Entity) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if e.reference:
        out["what"] = {"reference": e.reference}
    elif e.identifier is not None:
        out["what"] = {"identifier": {"system": e.identifier[0], "value": e.identifier[1]}
                       if e.identifier[0] else {"value": e.identifier[1]}}
    if e.kind == "patient":  # BALP entity:patient — type 1 Person, role 1 Patient
        out["type"] = _coding(ENTITY_TYPE, "1", "Person")
        out["role"] = _coding(OBJECT_ROLE, "1", "Patient")
    elif e.kind == "query":  # BALP entity:query — role 24 Query, query = base64
        out["type"] = _coding(ENTITY_TYPE, "2", "System Object")
        out["role"] = _coding(OBJECT_ROLE, "24", "Query")
        out["query"] = base64.b64encode(e.query).decode("ascii")
    elif e.kind == "message":  # an HL7 v2 message (MSH-10)
        out["type"] = _coding(ENTITY_TYPE, "2", "System Object")
        out["role"] = _coding(OBJECT_ROLE, "3", "Report")
    else:  # BALP entity:data — type 2 System Object, role 4 Domain Resource
        out["type"] = _coding(ENTITY_TYPE, "2", "System Object")
        out["role"] = _coding(OBJECT_ROLE, "4", "Domain Resource")
    if e.detail:
        out["detail"] = [{"type": t, "valueString": v} for t, v in e.detail]
    return out


def patient_key(e: Entity) -> str:
    """The searchable patient column: "Patient/{id}", or "identifier:{system}|{value}"."""
    if e.reference:
        return e.reference
    if e.identifier is not None:
        return f"identifier:{e.identifier[0]}|{e.identifier[1]}"
    return ""


def build(*, type_coding: dict[str, str], subtype: dict[str, str] | None, action: str,
          outcome: str, outcome_desc: str, agent: Agent, entities: list[Entity],
          source_id: str, server_address: str = "", profile: str = "",
          recorded: datetime | None = None, event_id: str | None = None) -> AuditRow:
    """An AuditEvent and its columns, from plain data."""
    at = recorded or datetime.now(timezone.utc)
    rid = event_id or uuid.uuid4().hex
    resource: dict[str, Any] = {"resourceType": "AuditEvent", "id": rid}
    if profile:
        resource["meta"] = {"profile": [BALP + profile]}
    resource["type"] = type_coding
    if subtype is not None:
        resource["subtype"] = [subtype]
    resource.update({
        "action": action,
        "recorded": _instant(at),
        "outcome": outcome,
        "agent": _agents(agent, source_id, server_address),
        "source": {"observer": {"display": source_id},
                   "type": [_coding(SOURCE_TYPE, "4", "Application Server")]},
    })
    if outcome_desc:
        resource["outcomeDesc"] = outcome_desc
    if entities:
        resource["entity"] = [_entity(e) for e in entities]
    patient = next((patient_key(e) for e in entities if e.kind == "patient"), "")
    obj = next((e.reference or (f"{e.identifier[0]}|{e.identifier[1]}" if e.identifier
                                else "") for e in entities if e.kind in ("object", "message")),
               "")
    return AuditRow(rid, at, type_coding["code"], (subtype or {}).get("code", ""), action,
                    outcome, agent.who, agent.alt, patient, obj, resource)


def rest_event(*, interaction: str, status: int, agent: Agent, entities: list[Entity],
               source_id: str, server_address: str = "", recorded: datetime | None = None
               ) -> AuditRow:
    """BALP RESTful pattern: type `rest`, subtype the interaction, entities the resource, the
    patient and (for a search) the query. A refused request keeps the same shape with
    outcome 4/8 and no BALP success profile."""
    outcome = outcome_of(status)
    has_patient = any(e.kind == "patient" for e in entities)
    profile = _PROFILES.get((interaction, has_patient), "") if outcome == "0" else ""
    return build(type_coding=_coding(EVENT_TYPE, "rest", "Restful Operation"),
                 subtype=_coding(RESTFUL, interaction), action=ACTIONS.get(interaction, "E"),
                 outcome=outcome, outcome_desc=f"HTTP {status}", agent=agent,
                 entities=entities, source_id=source_id, server_address=server_address,
                 profile=profile, recorded=recorded)


def adt_event(*, event_type: str, control_id: str, patient: tuple[str, str] | None,
              agent: Agent, source_id: str, recorded: datetime | None = None) -> AuditRow:
    """An ADT-driven patient change, ITI-8 Patient Identity Feed style: type DICOM 110110
    Patient Record, subtype ITI-8, action C/U/D, entities the patient (by identifier) and
    the message (MSH-10, detail MSH-9.2)."""
    entities = []
    if patient is not None:
        entities.append(Entity("patient", identifier=patient))
    entities.append(Entity("message", identifier=("urn:hl7v2:MSH-10", control_id),
                           detail=(("MSH-9.2", event_type),)))
    return build(type_coding=_coding(DCM, "110110", "Patient Record"),
                 subtype=_coding(IHE_EVENT, "ITI-8", "Patient Identity Feed"),
                 action=ADT_ACTIONS.get(event_type, "U"), outcome="0",
                 outcome_desc=f"ADT {event_type} applied", agent=agent, entities=entities,
                 source_id=source_id, recorded=recorded)


def review_event(*, task_id: str, decision: str, patient_ref: str, agent: Agent,
                 source_id: str, recorded: datetime | None = None) -> AuditRow:
    """A reviewer's decision on a held upload: rest `update` of the Task (BALP Update), the
    confirmed patient as entity:patient, the decision as entity detail."""
    entities = [Entity("object", reference=f"Task/{task_id}",
                       detail=(("decision", decision),))]
    if patient_ref.startswith("Patient/"):
        entities.append(Entity("patient", reference=patient_ref))
    elif patient_ref.startswith("index:"):
        entities.append(Entity("patient", identifier=("urn:fhirbridge:index",
                                                      patient_ref.split(":", 1)[1])))
    has_patient = len(entities) > 1
    return build(type_coding=_coding(EVENT_TYPE, "rest", "Restful Operation"),
                 subtype=_coding(RESTFUL, "update"), action="U", outcome="0",
                 outcome_desc=f"review {decision}", agent=agent, entities=entities,
                 source_id=source_id, profile=_PROFILES[("update", has_patient)],
                 recorded=recorded)
