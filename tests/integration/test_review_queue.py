"""The review queue as a reviewer uses it, against the real FHIR server and Orthanc: a doubtful
upload is held with its candidates' demographics and what the patient typed; confirming one
continues the pipeline with that patient; rejecting fails the Task; every decision is kept;
only operators reach it."""

from __future__ import annotations

import io
import uuid

import httpx
import pydicom
import pytest

from tests.integration.test_photo_end_to_end import MRN_SYSTEM, unique_photo, with_photo
from tests.support.service import FhirbridgeService

FHIR_JSON = {"Content-Type": "application/fhir+json"}


@pytest.fixture(scope="module")
def twins(fhir_server):
    """Two EHR Patients sharing an identifier from another (portal) domain: ambiguous."""
    portal_id = f"P-{uuid.uuid4().hex[:8]}"
    out = []
    for given, mrn in (("Ana", f"MRN-A-{portal_id}"), ("Eva", f"MRN-E-{portal_id}")):
        res = {"resourceType": "Patient", "active": True,
               "identifier": [{"system": MRN_SYSTEM, "value": mrn},
                              {"system": "urn:portal", "value": portal_id}],
               "name": [{"family": "Kovač", "given": [given]}],
               "birthDate": "1999-09-09", "gender": "female"}
        r = httpx.post(f"{fhir_server.base_url}/Patient", json=res, headers=FHIR_JSON,
                       timeout=10)
        assert r.status_code == 201, r.text
        out.append(r.json())
    return portal_id, out


@pytest.fixture(scope="module")
def svc(tmp_path_factory, orthanc, fhir_server):
    service = FhirbridgeService(tmp_path_factory.mktemp("fb-review"), pacs_url=orthanc.dicom_url,
                                ehr_url=fhir_server.base_url)
    yield service.start()
    service.stop()


def held_upload(svc: FhirbridgeService, portal_id: str) -> tuple[str, dict]:
    media = with_photo({"resourceType": "Media", "status": "completed",
                        "subject": {"identifier": {"system": "urn:portal", "value": portal_id}},
                        "contained": [{"resourceType": "Patient", "id": "self",
                                       "name": [{"family": "Kovac", "given": ["Ana"]}],
                                       "birthDate": "1999-09-09"}]}, unique_photo())
    r = svc.post_media(media)
    assert r.status_code == 201, r.text
    focus = f"Media/{r.json()['id']}"
    task = svc.wait_task(focus)
    assert task["status"] == "on-hold", task
    return focus, task


def test_held_upload_shows_candidates_and_confirm_continues(svc, twins, orthanc):
    portal_id, (ana, eva) = twins
    focus, task = held_upload(svc, portal_id)
    # the Task (seen by the portal) carries no candidate demographics
    assert "Kova" not in str(task) and "1999" not in str(task)
    [item] = [i for i in svc.client.get("/review").json() if i["focus"] == focus]
    assert item["reason"] == "ambiguous"
    cands = {c["ref"]: c for c in item["candidates"]}
    assert set(cands) == {f"Patient/{ana['id']}", f"Patient/{eva['id']}"}
    assert cands[f"Patient/{ana['id']}"]["names"][0]["given"] == ["Ana"]
    assert cands[f"Patient/{eva['id']}"]["birthDate"] == "1999-09-09"
    assert item["selfReported"]["names"][0]["family"] == "Kovac"

    r = svc.client.post(f"/review/{task['id']}", json={
        "decision": "confirm", "reviewer": "nurse.jones", "patient": f"Patient/{ana['id']}",
        "comment": "called the patient"})
    assert r.status_code == 200, r.text
    done = svc.wait_task(focus, until=("completed", "failed"))
    assert done["status"] == "completed", done
    study = svc.client.get(f"/fhir/{done['output'][0]['valueReference']['reference']}").json()
    assert study["subject"]["reference"] == f"Patient/{ana['id']}"
    sop = study["series"][0]["instance"][0]["uid"]
    ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(orthanc.find_instances(sop)[0])))
    assert ds.PatientID == ana["identifier"][0]["value"] and str(ds.PatientName) == "Kovač^Ana"
    history = svc.client.get(f"/review/{task['id']}/decisions").json()
    # the reviewer is who the credential proves (here: a loopback operator), not the body's
    assert [(h["decision"], h["reviewer"]) for h in history] == [("confirm",
                                                                  "loopback@127.0.0.1")]
    assert all(i["focus"] != focus for i in svc.client.get("/review").json())


def test_reject_fails_the_task_and_a_second_decision_conflicts(svc, twins):
    portal_id, _ = twins
    focus, task = held_upload(svc, portal_id)
    r = svc.client.post(f"/review/{task['id']}", json={"decision": "reject",
                                                        "reviewer": "dr.who"})
    assert r.status_code == 200, r.text
    assert svc.client.get(f"/fhir/Task/{task['id']}").json()["status"] == "failed"
    again = svc.client.post(f"/review/{task['id']}", json={"decision": "reject",
                                                            "reviewer": "dr.who"})
    assert again.status_code == 409


def test_operator_endpoints_need_the_token_when_one_is_set(tmp_path):
    svc = FhirbridgeService(tmp_path / "fb", env={"FHIRBRIDGE_HTTP__ADMIN_TOKEN": "s3cret"})
    svc.start()
    try:
        assert svc.client.get("/review").status_code == 401
        assert svc.client.get("/admin/jobs").status_code == 401
        ok = svc.client.get("/review", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json() == []
        assert svc.client.get("/healthz").status_code == 200  # probes stay open
    finally:
        svc.stop()
