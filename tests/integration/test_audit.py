"""The audit trail through the running service (`fhirbridge serve` with [auth] on, the test
SMART IdP, real Orthanc and FHIR server, ADT over MLLP with `mllp_send`, a TLS syslog
collector): every create, read, search, refused request, review decision, operator action and
ADT change is found at `GET /fhir/AuditEvent` with the right subtype, outcome and agent, and
reaches the collector as a framed RFC 5424 message."""

from __future__ import annotations

import base64
import json
import ssl
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest

from tests.audit.test_syslog import HEADER, Collector
from tests.integration.test_identity_feed import adt, send
from tests.integration.test_photo_end_to_end import (
    MRN_SYSTEM,
    media_for,
    unique_photo,
    with_photo,
)
from tests.support.idp import IdentityProvider
from tests.support.service import FhirbridgeService
from tests.support.tls import TestCA

ADMIN = "audit-admin-token"
PORTAL_SCOPES = ("system/Media.c system/Media.r system/Task.rs system/ImagingStudy.rs")


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Collector, TestCA]]:
    ca = TestCA(tmp_path_factory.mktemp("audit-ca"))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(ca.server.cert), str(ca.server.key))
    c = Collector(ctx)
    yield c, ca
    c.close()


@pytest.fixture(scope="module")
def svc(tmp_path_factory, orthanc, fhir_server, idp, collector) -> Iterator[FhirbridgeService]:
    coll, ca = collector
    extra = (f'[auth]\nissuer = "{idp.issuer}"\njwks_url = "{idp.jwks_url}"\n\n'
             f'[audit]\nsyslog_url = "tls://127.0.0.1:{coll.port}"\n'
             f'syslog_ca_file = "{ca.ca_file}"\nsource_id = "fb-audit-test"\n')
    service = FhirbridgeService(tmp_path_factory.mktemp("fb-audit"), pacs_url=orthanc.dicom_url,
                                ehr_url=fhir_server.base_url, extra=extra,
                                env={"FHIRBRIDGE_HTTP__ADMIN_TOKEN": ADMIN})
    service.start()
    service.client.headers["Authorization"] = "Bearer " + idp.mint(
        PORTAL_SCOPES, sub="portal-1", client_id="portal", audience=service.fhir)
    yield service
    service.stop()


def bearer(idp: IdentityProvider, svc: FhirbridgeService, scope: str, **kw: Any) -> dict:
    return {"Authorization": "Bearer " + idp.mint(scope, audience=svc.fhir, **kw)}


@pytest.fixture(scope="module")
def twins(fhir_server) -> tuple[str, list[dict[str, Any]]]:
    """Two EHR patients sharing a portal identifier: an upload naming it is held."""
    portal_id = f"P-{uuid.uuid4().hex[:8]}"
    out = []
    for given in ("Ana", "Eva"):
        out.append(fhir_server.create_patient(
            "Kovač", [given], "1999-09-09", "female",
            [{"system": MRN_SYSTEM, "value": f"MRN-{given}-{portal_id}"},
             {"system": "urn:portal", "value": portal_id}]))
    return portal_id, out


@pytest.fixture(scope="module")
def story(svc, idp, patient, other_patient, twins, tmp_path_factory) -> dict[str, Any]:
    """Every kind of interaction, once, in order; what the tests look for afterwards."""
    s: dict[str, Any] = {"start": datetime.now(timezone.utc)}
    # create, read, search, read of the ImagingStudy (a portal token: sub portal-1)
    r = svc.post_media(media_for(patient, unique_photo()))
    assert r.status_code == 201, r.text
    s["media"] = f"Media/{r.json()['id']}"
    assert svc.client.get(f"/fhir/{s['media']}").status_code == 200
    task = svc.wait_task(s["media"], until=("completed", "failed"))
    assert task["status"] == "completed", task
    s["study"] = task["output"][0]["valueReference"]["reference"]
    assert svc.client.get(f"/fhir/{s['study']}").status_code == 200
    # another patient's upload
    r = svc.post_media(media_for(other_patient, unique_photo()))
    assert r.status_code == 201, r.text
    s["other_media"] = f"Media/{r.json()['id']}"
    # refused: no token (401), a token without the scope (403)
    assert httpx.get(f"{svc.fhir}/Task", timeout=10).status_code == 401
    limited = bearer(idp, svc, "system/Task.rs", sub="limited-1", client_id="limited-app")
    assert svc.client.get(f"/fhir/{s['media']}", headers=limited).status_code == 403
    # a review decision with the admin token; the body still names someone else
    portal_id, _ = twins
    held = with_photo({"resourceType": "Media", "status": "completed",
                       "subject": {"identifier": {"system": "urn:portal", "value": portal_id}}},
                      unique_photo())
    r = svc.post_media(held)
    assert r.status_code == 201, r.text
    held_task = svc.wait_task(f"Media/{r.json()['id']}")
    assert held_task["status"] == "on-hold", held_task
    s["held_task"] = held_task["id"]
    admin = {"Authorization": f"Bearer {ADMIN}"}
    r = svc.client.post(f"/review/{held_task['id']}", headers=admin,
                        json={"decision": "reject", "reviewer": "mallory"})
    assert r.status_code == 200, r.text
    s["decision"] = r.json()
    s["decisions"] = svc.client.get(f"/review/{held_task['id']}/decisions", headers=admin).json()
    # operator actions
    assert svc.client.post("/admin/ehr-recheck", headers=admin).status_code == 202
    assert svc.client.post("/admin/jobs/999999/retry", headers=admin).status_code == 404
    # an A08 over MLLP
    time.sleep(0.01)
    s["before_adt"] = datetime.now(timezone.utc)
    mrn = f"MRN-A08-{uuid.uuid4().hex[:6]}"
    s["adt_mrn"] = mrn
    message = adt("A08", f"PID|1||{mrn}^^^HOSP^MR||Nowak^Jan||19700101|M")
    s["control_id"] = message.split("|")[9]
    assert "MSA|AA" in send(svc, tmp_path_factory.mktemp("adt"), message)
    return s


def search(svc: FhirbridgeService, idp: IdentityProvider, **params: Any) -> list[dict]:
    r = svc.client.get("/fhir/AuditEvent", params=params, headers=bearer(
        idp, svc, "system/AuditEvent.rs", sub="auditor-1", client_id="siem"))
    assert r.status_code == 200, r.text
    bundle = r.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    return [e["resource"] for e in bundle.get("entry", [])]


def who(event: dict) -> str:
    return event["agent"][0]["who"]["identifier"]["value"]


def subtype(event: dict) -> str:
    return event["subtype"][0]["code"]


def refs(event: dict, role: str) -> list[str]:
    return [e["what"].get("reference") or "{system}|{value}".format(**e["what"]["identifier"])
            for e in event.get("entity", []) if e["role"]["code"] == role and "what" in e]


def test_create_read_search_are_audited_with_the_token_identity(svc, idp, story, patient):
    events = search(svc, idp, agent="portal-1", _count=1000)
    created = [e for e in events if subtype(e) == "create" and story["media"] in refs(e, "4")]
    assert len(created) == 1
    [c] = created
    assert c["action"] == "C" and c["outcome"] == "0"
    assert c["agent"][0]["altId"] == "portal" and c["agent"][0]["requestor"] is True
    assert c["agent"][0]["network"]["address"] == "127.0.0.1"
    assert refs(c, "1") == [f"Patient/{patient['id']}"]
    assert c["source"]["observer"]["display"] == "fb-audit-test"
    reads = [e for e in events if subtype(e) == "read"]
    assert any(story["media"] in refs(e, "4") for e in reads)
    study = [e for e in reads if story["study"] in refs(e, "4")]
    assert study and refs(study[0], "1") == [f"Patient/{patient['id']}"]
    searches = [e for e in events if subtype(e) == "search-type"]
    assert any(base64.b64decode(q["query"]).decode().startswith("focus=")
               for e in searches for q in e["entity"] if q["role"]["code"] == "24")


def test_refused_requests_are_audited(svc, idp, story):
    [unauth] = [e for e in search(svc, idp, agent="unauthenticated")
                if subtype(e) == "search-type"]
    assert unauth["outcome"] == "4" and unauth["outcomeDesc"] == "HTTP 401"
    assert unauth["agent"][0]["network"]["address"] == "127.0.0.1"
    [forbidden] = search(svc, idp, agent="limited-1")
    assert forbidden["outcome"] == "4" and forbidden["outcomeDesc"] == "HTTP 403"
    assert subtype(forbidden) == "read" and story["media"] in refs(forbidden, "4")
    assert forbidden["agent"][0]["altId"] == "limited-app"
    # found by client_id too, and by outcome
    assert [e["id"] for e in search(svc, idp, agent="limited-app")] == [forbidden["id"]]
    assert forbidden["id"] in [e["id"] for e in search(svc, idp, outcome="4", _count=1000)]


def test_review_decision_records_the_credential_not_the_body(svc, idp, story):
    assert story["decision"]["reviewer"] == "admin-token"
    assert [d["reviewer"] for d in story["decisions"]] == ["admin-token"]
    assert "mallory" not in json.dumps(story["decisions"])
    events = search(svc, idp, entity=f"Task/{story['held_task']}")
    by_subtype = {subtype(e): e for e in events if subtype(e) != "search-type"}
    assert set(by_subtype) == {"update", "operation"}  # the decision + the request itself
    decision = by_subtype["update"]
    assert who(decision) == "admin-token" and decision["action"] == "U"
    assert decision["entity"][0]["detail"] == [{"type": "decision", "valueString": "reject"}]
    assert who(by_subtype["operation"]) == "admin-token"
    assert all("mallory" not in json.dumps(e) for e in events)


def test_operator_actions_are_audited(svc, idp, story):
    ops = [e for e in search(svc, idp, agent="admin-token", subtype="operation", _count=1000)]
    recheck = [e for e in ops if "urn:fhirbridge:admin|ehr-recheck" in refs(e, "4")]
    retry = [e for e in ops if "urn:fhirbridge:admin|jobs/999999/retry" in refs(e, "4")]
    assert len(recheck) == 1 and recheck[0]["outcome"] == "0"
    assert len(retry) == 1 and retry[0]["outcome"] == "4"


def test_adt_change_is_audited_with_the_sender_and_peer(svc, idp, story):
    [event] = search(svc, idp, type="110110", patient=f"{MRN_SYSTEM}|{story['adt_mrn']}")
    assert who(event) == "ADT|HOSP"
    assert event["agent"][0]["altId"].startswith("127.0.0.1:")  # the MLLP peer
    assert event["action"] == "U" and subtype(event) == "ITI-8"
    assert refs(event, "3") == [f"urn:hl7v2:MSH-10|{story['control_id']}"]
    assert [e["id"] for e in search(svc, idp, agent="ADT|HOSP")] == [event["id"]]


def test_patient_and_date_filters(svc, idp, story, patient, other_patient):
    mine = search(svc, idp, patient=f"Patient/{patient['id']}", _count=1000)
    assert {subtype(e) for e in mine} >= {"create", "read"}
    assert all(refs(e, "1") == [f"Patient/{patient['id']}"] for e in mine)
    assert not any(story["other_media"] in refs(e, "4") for e in mine)
    theirs = search(svc, idp, patient=other_patient["id"])  # a bare id works too
    assert [story["other_media"]] == [r for e in theirs for r in refs(e, "4")]
    after = search(svc, idp, date=f"ge{story['before_adt'].isoformat()}", _count=1000)
    assert any(e["type"]["code"] == "110110" for e in after)
    assert not any(subtype(e) == "create" for e in after)
    before = search(svc, idp, date=[f"ge{story['start'].isoformat()}",
                                    f"lt{story['before_adt'].isoformat()}"], _count=1000)
    assert any(subtype(e) == "create" for e in before)
    assert not any(e["type"]["code"] == "110110" for e in before)
    today = datetime.now(timezone.utc).date().isoformat()
    assert len(search(svc, idp, date=today, _count=1000)) >= len(after)


def test_search_paging_scope_and_bad_parameters(svc, idp, story):
    token = bearer(idp, svc, "system/AuditEvent.rs")
    r = svc.client.get("/fhir/AuditEvent", params={"_count": 2}, headers=token)
    bundle = r.json()
    assert len(bundle["entry"]) == 2 and bundle["total"] > 2
    [nxt] = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
    page2 = svc.client.get(nxt, headers=token).json()
    assert not {e["resource"]["id"] for e in page2["entry"]} & {
        e["resource"]["id"] for e in bundle["entry"]}
    one = bundle["entry"][0]["resource"]
    assert svc.client.get(f"/fhir/AuditEvent/{one['id']}", headers=token).json() == one
    bad = svc.client.get("/fhir/AuditEvent", params={"name": "x"}, headers=token)
    assert bad.status_code == 400 and bad.json()["resourceType"] == "OperationOutcome"
    assert svc.client.get("/fhir/AuditEvent", params={"date": "yesterday"},
                          headers=token).status_code == 400
    # the portal's token has no AuditEvent scope
    assert svc.client.get("/fhir/AuditEvent").status_code == 403


def test_syslog_collector_gets_each_event(svc, idp, story, collector):
    coll, _ = collector
    events = search(svc, idp, _count=1000)
    frames = coll.wait(len(events))
    got = {}
    for f in frames:
        m = HEADER.match(f)
        assert m, f[:100]
        assert m.group(4) == b"fb-audit-test"
        body = json.loads(m.group(8))
        got[body["id"]] = (int(m.group(1)), body)
    for e in events:
        assert e["id"] in got, (subtype(e), e["outcome"])
        pri, body = got[e["id"]]
        assert body == e
        assert pri == {"0": 85, "4": 84, "8": 83}[e["outcome"]]


def test_no_answer_without_its_audit_record(tmp_path):
    """When the audit row cannot be written, the client gets 503, not the answer."""
    import sqlite3

    service = FhirbridgeService(tmp_path / "fb").start()
    try:
        assert service.client.get("/fhir/Task").status_code == 200
        with sqlite3.connect(service.data_dir / "fhirbridge.db") as db:
            db.execute("DROP TABLE audit_event")  # the audit trail breaks
        r = service.client.get("/fhir/Task")
        assert r.status_code == 503
        assert r.json()["resourceType"] == "OperationOutcome"
        assert "audit" in r.json()["issue"][0]["diagnostics"]
        assert "Traceback" not in service.log_text()
    finally:
        service.stop()
