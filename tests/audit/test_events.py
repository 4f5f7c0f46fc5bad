"""The AuditEvent builder: valid FHIR R4 (fhir.resources R4B) with IHE BALP codes for every
kind of event fhirbridge records, refused requests included."""

from __future__ import annotations

import base64

import pytest
from fhir.resources.R4B.auditevent import AuditEvent

from fhirbridge.audit import Agent, Entity, adt_event, interaction_of, rest_event, review_event
from fhirbridge.audit.events import DCM, ENTITY_TYPE, EVENT_TYPE, OBJECT_ROLE, RESTFUL

CLIENT = Agent("nurse-7", "portal-app", "10.1.2.3", "token")


def valid(resource: dict) -> AuditEvent:
    return AuditEvent.model_validate(resource)


def entity(resource: dict, role: str) -> dict:
    [e] = [e for e in resource["entity"] if e["role"]["code"] == role]
    return e


def test_create_with_patient_is_balp_patient_create() -> None:
    row = rest_event(interaction="create", status=201, agent=CLIENT,
                     entities=[Entity("object", reference="Media/m1"),
                               Entity("patient", reference="Patient/p9")],
                     source_id="fhirbridge-test", server_address="https://fb.example/fhir")
    r = row.resource
    valid(r)
    assert r["type"] == {"system": EVENT_TYPE, "code": "rest", "display": "Restful Operation"}
    assert r["subtype"] == [{"system": RESTFUL, "code": "create"}]
    assert r["action"] == "C" and r["outcome"] == "0"
    assert r["meta"]["profile"][0].endswith("IHE.BasicAudit.PatientCreate")
    client, server = r["agent"]
    assert client["requestor"] is True and server["requestor"] is False
    assert client["type"]["coding"][0] == {"system": DCM, "code": "110153",
                                           "display": "Source Role ID"}
    assert client["who"]["identifier"]["value"] == "nurse-7"
    assert client["altId"] == "portal-app"
    assert client["network"] == {"address": "10.1.2.3", "type": "2"}
    assert server["type"]["coding"][0]["code"] == "110152"
    assert server["network"] == {"address": "https://fb.example/fhir", "type": "5"}
    assert r["source"]["observer"]["display"] == "fhirbridge-test"
    assert r["source"]["type"][0]["code"] == "4"
    data = entity(r, "4")
    assert data["what"] == {"reference": "Media/m1"} and data["type"]["code"] == "2"
    patient = entity(r, "1")
    assert patient["what"] == {"reference": "Patient/p9"}
    assert patient["type"] == {"system": ENTITY_TYPE, "code": "1", "display": "Person"}
    assert patient["role"]["system"] == OBJECT_ROLE
    assert (row.patient_ref, row.entity_ref, row.agent_who, row.agent_alt) == (
        "Patient/p9", "Media/m1", "nurse-7", "portal-app")


def test_search_carries_the_query_base64() -> None:
    query = b"subject:identifier=urn:mrn|123&_count=5"
    row = rest_event(interaction="search-type", status=200, agent=CLIENT,
                     entities=[Entity("query", query=query)], source_id="fb")
    valid(row.resource)
    assert row.action == "E" and row.subtype == "search-type"
    q = entity(row.resource, "24")
    assert base64.b64decode(q["query"]) == query
    assert row.resource["meta"]["profile"][0].endswith("IHE.BasicAudit.Query")


@pytest.mark.parametrize("status,outcome", [(401, "4"), (403, "4"), (404, "4"), (500, "8"),
                                            (503, "8")])
def test_refused_requests_are_failures_without_a_success_profile(status: int,
                                                                 outcome: str) -> None:
    row = rest_event(interaction="read", status=status,
                     agent=Agent("unauthenticated", address="10.9.9.9"),
                     entities=[Entity("object", reference="Media/x")], source_id="fb")
    valid(row.resource)
    assert row.outcome == outcome and row.resource["outcomeDesc"] == f"HTTP {status}"
    assert "meta" not in row.resource


def test_adt_change_names_patient_message_and_sender() -> None:
    row = adt_event(event_type="A40", control_id="MSG-1",
                    patient=("urn:oid:1.2.3", "MRN-1"),
                    agent=Agent("ADT1|HOSP", "127.0.0.1:5000 CN=engine-1", "127.0.0.1", "mllp"),
                    source_id="fb")
    r = row.resource
    valid(r)
    assert r["type"]["code"] == "110110" and r["type"]["system"] == DCM
    assert r["subtype"][0]["code"] == "ITI-8" and r["action"] == "D"
    assert entity(r, "1")["what"]["identifier"] == {"system": "urn:oid:1.2.3",
                                                     "value": "MRN-1"}
    msg = entity(r, "3")
    assert msg["what"]["identifier"]["value"] == "MSG-1"
    assert msg["detail"] == [{"type": "MSH-9.2", "valueString": "A40"}]
    assert row.patient_ref == "identifier:urn:oid:1.2.3|MRN-1"
    assert (row.agent_who, row.agent_alt) == ("ADT1|HOSP", "127.0.0.1:5000 CN=engine-1")
    assert adt_event(event_type="A08", control_id="2", patient=None, agent=Agent("a"),
                     source_id="fb").action == "U"


def test_review_decision_is_an_update_of_the_task() -> None:
    row = review_event(task_id="t1", decision="confirm", patient_ref="Patient/p1",
                       agent=Agent("admin-token", kind="admin-token"), source_id="fb")
    valid(row.resource)
    assert (row.subtype, row.action, row.entity_ref, row.patient_ref) == (
        "update", "U", "Task/t1", "Patient/p1")
    assert entity(row.resource, "4")["detail"] == [{"type": "decision",
                                                     "valueString": "confirm"}]
    reject = review_event(task_id="t2", decision="reject", patient_ref="", agent=Agent("x"),
                          source_id="fb")
    valid(reject.resource)
    assert reject.patient_ref == ""


@pytest.mark.parametrize("method,path,expected", [
    ("POST", "/fhir/Media", ("create", "Media", "")),
    ("GET", "/fhir/Media/abc", ("read", "Media", "abc")),
    ("GET", "/fhir/Media/abc/_history/1", ("vread", "Media", "abc")),
    ("GET", "/fhir/Task", ("search-type", "Task", "")),
    ("POST", "/fhir/Task/_search", ("search-type", "Task", "")),
    ("POST", "/fhir", ("transaction", "", "")),
    ("PUT", "/fhir/Media/abc", ("update", "Media", "abc")),
    ("DELETE", "/fhir/Media/abc", ("delete", "Media", "abc")),
    ("POST", "/review/t1", ("operation", "review", "t1")),
    ("GET", "/review", ("search-type", "review", "")),
    ("POST", "/admin/jobs/7/retry", ("operation", "admin", "jobs/7/retry")),
])
def test_interaction_of(method: str, path: str, expected: tuple[str, str, str]) -> None:
    assert interaction_of(method, path) == expected
