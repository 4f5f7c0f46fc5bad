"""`fhirbridge serve` towards an EHR that demands SMART Backend Services tokens: the real test
FHIR server behind an auth-checking proxy that refuses (401) any request without a token the
test IdP issued. With `[ehr] auth = "smart-backend"` uploads complete and the ImagingStudy is
written back; without credentials they fail with an EHR reason. Confused deputy: an EHR Binary
is used only when its securityContext is the upload's patient; otherwise the upload is held."""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_photo_end_to_end import media_for, unique_photo
from tests.support.idp import ec_key, private_pem
from tests.support.service import FhirbridgeService

CLIENT_ID = "fhirbridge-it"
KEY_ID = "fhirbridge-it-1"


@pytest.fixture(scope="module")
def key_file(idp, tmp_path_factory) -> Path:
    """fhirbridge's EC P-384 key; its public half registered at the IdP (ES384)."""
    key = ec_key()
    idp.register_client(CLIENT_ID, key.public_key())
    path = tmp_path_factory.mktemp("ehr-key") / "fhirbridge-ehr.pem"
    path.write_bytes(private_pem(key))
    path.chmod(0o600)
    return path


def smart_env(key_file: Path) -> dict[str, str]:
    """[ehr] by environment (FhirbridgeService writes [ehr] fhir_url itself); no token_url:
    the token endpoint comes from the EHR's smart-configuration."""
    return {"FHIRBRIDGE_EHR__AUTH": "smart-backend", "FHIRBRIDGE_EHR__CLIENT_ID": CLIENT_ID,
            "FHIRBRIDGE_EHR__PRIVATE_KEY_FILE": str(key_file),
            "FHIRBRIDGE_EHR__KEY_ID": KEY_ID}


@pytest.fixture(scope="module")
def smart_svc(tmp_path_factory, orthanc, proxy, key_file) -> Iterator[FhirbridgeService]:
    svc = FhirbridgeService(tmp_path_factory.mktemp("fb-smart"), pacs_url=orthanc.dicom_url,
                            ehr_url=proxy.fhir_url, env=smart_env(key_file))
    yield svc.start()
    svc.stop()


def ehr_studies(fhir_server, patient: dict[str, Any]) -> list[dict[str, Any]]:
    """ImagingStudies at the EHR for the patient, read behind the proxy's back."""
    bundle = httpx.get(f"{fhir_server.base_url}/ImagingStudy",
                       params={"patient": f"Patient/{patient['id']}"}, timeout=10).json()
    return [e["resource"] for e in bundle.get("entry", [])]


def ehr_create(fhir_server, resource: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{fhir_server.base_url}/{resource['resourceType']}", json=resource,
                   headers={"Content-Type": "application/fhir+json"}, timeout=10)
    assert r.status_code == 201, r.text
    return r.json()


def ehr_binary(fhir_server, photo: bytes, context: str) -> str:
    return ehr_create(fhir_server, {"resourceType": "Binary", "contentType": "image/jpeg",
                                    "securityContext": {"reference": context},
                                    "data": base64.b64encode(photo).decode()})["id"]


def upload(svc: FhirbridgeService, media: dict[str, Any]) -> str:
    r = svc.post_media(media)
    assert r.status_code == 201, r.text
    return f"Media/{r.json()['id']}"


def reason(task: dict[str, Any]) -> str:
    return task.get("statusReason", {}).get("coding", [{}])[0].get("code", "")


# --- SMART Backend Services ------------------------------------------------------------------

def test_upload_completes_through_the_protected_ehr(smart_svc, proxy, idp, fhir_server,
                                                     orthanc, patient):
    proxy.reset()
    before = len(ehr_studies(fhir_server, patient))
    focus = upload(smart_svc, media_for(patient, unique_photo()))
    task = smart_svc.wait_task(focus)
    assert task["status"] == "completed", task
    studies = ehr_studies(fhir_server, patient)
    assert len(studies) == before + 1  # written back through the proxy
    uid = studies[-1]["series"][0]["instance"][0]["uid"]
    assert len(orthanc.find_instances(uid)) == 1

    fhir = [s for s in proxy.requests("/fhir/") if "well-known" not in s.path]
    assert any(s.method == "GET" and s.path.startswith("/fhir/Patient/") for s in fhir)
    assert any(s.method == "PUT" and s.path.startswith("/fhir/ImagingStudy") for s in fhir)
    assert proxy.refused == 0
    assert all(s.token and idp.was_issued(s.token) for s in fhir)
    issued = [r for r in idp.token_requests if r["status"] == 200]
    assert 1 <= len(issued) <= 3  # one per process at most (serve + its workers), cached
    assert "eyJ" not in smart_svc.log_text()  # no token or assertion in fhirbridge's log


def test_without_credentials_the_upload_fails_with_an_ehr_reason(tmp_path, orthanc, proxy,
                                                                  fhir_server, patient):
    svc = FhirbridgeService(tmp_path / "fb-none", pacs_url=orthanc.dicom_url,
                            ehr_url=proxy.fhir_url)  # [ehr] auth = "none"
    svc.start()
    try:
        proxy.reset()
        before = len(ehr_studies(fhir_server, patient))
        instances = len(orthanc.instances())
        focus = upload(svc, media_for(patient, unique_photo()))
        task = svc.wait_task(focus, until=("completed", "failed", "on-hold"))
    finally:
        svc.stop()
    assert task["status"] == "failed", task
    assert reason(task) == "ehr-refused"
    assert "401" in task["statusReason"]["text"]
    assert proxy.refused >= 1 and all(s.status == 401 for s in proxy.requests("/fhir/Patient"))
    assert len(ehr_studies(fhir_server, patient)) == before
    assert len(orthanc.instances()) == instances  # nothing stored for an unchecked patient


def test_misconfigured_smart_backend_stops_start_up(tmp_path, proxy, key_file):
    svc = FhirbridgeService(tmp_path / "fb-bad", ehr_url=proxy.fhir_url)
    env = {**svc._env, **smart_env(key_file), "FHIRBRIDGE_EHR__CLIENT_ID": ""}
    done = subprocess.run([str(Path(sys.executable).parent / "fhirbridge"), "serve",
                           "--config", str(svc.config)], env=env, capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    svc.client.close()
    assert done.returncode == 2
    assert "[ehr] client_id" in done.stderr and "Traceback" not in done.stderr
    assert str(key_file) not in done.stderr


# --- confused deputy ------------------------------------------------------------------------

def test_ehr_binary_of_another_patient_is_held(smart_svc, proxy, fhir_server, orthanc,
                                               patient, other_patient):
    photo = unique_photo()
    binary_id = ehr_binary(fhir_server, photo, f"Patient/{other_patient['id']}")
    media = media_for(patient, photo)
    media["content"] = {"contentType": "image/jpeg", "url": f"Binary/{binary_id}"}
    instances = len(orthanc.instances())
    before = len(ehr_studies(fhir_server, patient))
    proxy.reset()
    focus = upload(smart_svc, media)
    task = smart_svc.wait_task(focus)
    assert task["status"] == "on-hold", task
    assert reason(task) == "attachment-not-patients"
    text = task["statusReason"]["text"]
    assert "patient" in text and other_patient["id"] not in text and binary_id not in text
    assert len(orthanc.instances()) == instances  # nothing in the PACS
    assert len(ehr_studies(fhir_server, patient)) == before
    binary_reads = proxy.requests(f"/fhir/Binary/{binary_id}")
    assert binary_reads and all(s.status == 200 for s in binary_reads)  # read, checked, unused


@pytest.mark.parametrize("via", ["patient", "document-reference"])
def test_ehr_binary_of_the_patient_completes(smart_svc, proxy, fhir_server, orthanc, patient,
                                             via):
    photo = unique_photo()
    context = f"Patient/{patient['id']}"
    if via == "document-reference":  # securityContext: the resource the Binary belongs to
        doc = ehr_create(fhir_server, {"resourceType": "DocumentReference", "status": "current",
                                       "subject": {"reference": context},
                                       "content": [{"attachment": {"contentType": "image/jpeg"}}]})
        context = f"DocumentReference/{doc['id']}"
    binary_id = ehr_binary(fhir_server, photo, context)
    media = media_for(patient, photo)
    media["content"] = {"contentType": "image/jpeg", "url": f"Binary/{binary_id}"}
    proxy.reset()
    focus = upload(smart_svc, media)
    task = smart_svc.wait_task(focus)
    assert task["status"] == "completed", task
    study = smart_svc.client.get(f"/fhir/{task['output'][0]['valueReference']['reference']}")
    uid = study.json()["series"][0]["instance"][0]["uid"]
    assert len(orthanc.find_instances(uid)) == 1
    assert proxy.refused == 0
