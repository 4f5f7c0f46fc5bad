"""A portal photo becomes a DICOM photo in a real PACS (Orthanc, by C-STORE and STOW-RS) and
an ImagingStudy in a real FHIR server, through `fhirbridge serve` as users run it."""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from fhirbridge.media.jpeg import scan_data
from tests.support.service import FhirbridgeService

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
MRN_SYSTEM = "urn:oid:2.16.840.1.113883.3.7777"
VL_PHOTO = "1.2.840.10008.5.1.4.1.1.77.1.4"


def sample_media(**changes: Any) -> dict[str, Any]:
    media = json.loads((SAMPLES / "media-photo.json").read_text())
    media.update(changes)
    return media


def with_photo(media: dict[str, Any], photo: bytes, content_type: str = "image/jpeg") -> dict:
    media = copy.deepcopy(media)
    media["content"] = {"contentType": content_type, "data": base64.b64encode(photo).decode(),
                        "size": len(photo),
                        "hash": base64.b64encode(hashlib.sha1(photo).digest()).decode()}
    return media


def unique_photo() -> bytes:
    """The sample photo with a unique COM segment: a distinct upload, identical pixels."""
    photo = (SAMPLES / "photo.jpg").read_bytes()
    note = uuid.uuid4().hex.encode()
    com = b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note
    return photo[:2] + com + photo[2:]


@pytest.fixture(scope="module")
def ehr_patients(fhir_server) -> dict[str, dict[str, Any]]:
    """Patients as the EHR knows them (the source of truth for DICOM demographics)."""
    client = httpx.Client(base_url=fhir_server.base_url, timeout=10)
    suffix = uuid.uuid4().hex[:6]
    people = {
        "jose": {"resourceType": "Patient", "active": True,
                 "identifier": [{"system": MRN_SYSTEM, "value": f"MRN-J-{suffix}"}],
                 "name": [{"use": "official", "family": "Müller", "given": ["José", "María"]}],
                 "birthDate": "1984-03-07", "gender": "male"},
        "hanako": {"resourceType": "Patient", "active": True,
                   "identifier": [{"system": MRN_SYSTEM, "value": f"MRN-H-{suffix}"}],
                   "name": [{"family": "山田", "given": ["花子"]}],
                   "birthDate": "1990-12-01", "gender": "female"},
    }
    out = {}
    for key, res in people.items():
        r = client.post("/Patient", json=res, headers={"Content-Type": "application/fhir+json"})
        assert r.status_code == 201, r.text
        out[key] = r.json()
    return out


@pytest.fixture(scope="module")
def dimse_service(tmp_path_factory, orthanc, fhir_server):
    svc = FhirbridgeService(
        tmp_path_factory.mktemp("fb-dimse"), pacs_url=orthanc.dicom_url,
        ehr_url=fhir_server.base_url, wado_rs_url=orthanc.dicomweb_url)
    yield svc.start()
    svc.stop()


@pytest.fixture(scope="module")
def stow_service(tmp_path_factory, orthanc, fhir_server):
    svc = FhirbridgeService(tmp_path_factory.mktemp("fb-stow"), pacs_url=orthanc.dicomweb_url,
                            ehr_url=fhir_server.base_url)
    yield svc.start()
    svc.stop()


def media_for(patient: dict[str, Any], photo: bytes, *, by: str = "reference") -> dict:
    media = with_photo(sample_media(), photo)
    media["contained"] = []  # no self-reported data in these
    if by == "reference":
        media["subject"] = {"reference": f"Patient/{patient['id']}"}
    else:
        media["subject"] = {"identifier": patient["identifier"][0]}
    return media


def stored_object(orthanc, sop_uid: str) -> pydicom.Dataset:
    ids = orthanc.find_instances(sop_uid)
    assert len(ids) == 1, f"expected one copy of {sop_uid} in Orthanc, found {len(ids)}"
    return pydicom.dcmread(io.BytesIO(orthanc.instance_file(ids[0])))


def completed(svc: FhirbridgeService, response: httpx.Response) -> tuple[dict, dict]:
    assert response.status_code == 201, response.text
    media_id = response.json()["id"]
    assert response.headers["Location"].startswith(f"{svc.fhir}/Media/{media_id}")
    task = svc.wait_task(f"Media/{media_id}")
    assert task["status"] == "completed", task
    study_ref = task["output"][0]["valueReference"]["reference"]
    study = svc.client.get(f"/fhir/{study_ref}").json()
    return task, study


def ehr_search(fhir_server, query: str) -> list[dict[str, Any]]:
    bundle = httpx.get(f"{fhir_server.base_url}/{query}", timeout=10).json()
    return [e["resource"] for e in bundle.get("entry", [])]


@pytest.mark.parametrize("service_name", ["dimse_service", "stow_service"])
def test_photo_reaches_pacs_and_chart(request, service_name, orthanc, fhir_server, ehr_patients,
                                      dciodvfy_check):
    svc: FhirbridgeService = request.getfixturevalue(service_name)
    patient = ehr_patients["jose"]
    photo = unique_photo()
    task, study = completed(svc, svc.post_media(media_for(patient, photo)))

    uid = study["identifier"][0]["value"].removeprefix("urn:oid:")
    assert study["identifier"][0]["system"] == "urn:dicom:uid"
    assert study["subject"] == {"reference": f"Patient/{patient['id']}"}
    instance = study["series"][0]["instance"][0]
    ds = stored_object(orthanc, instance["uid"])

    # demographics from the EHR, through the configured identifier domain
    assert ds.SOPClassUID == VL_PHOTO and ds.Modality == "XC"
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Müller^José^María"
    assert ds.PatientID == patient["identifier"][0]["value"]
    assert ds.IssuerOfPatientID == "HOSP"
    assert ds.PatientBirthDate == "19840307" and ds.PatientSex == "M"
    assert ds.StudyInstanceUID == uid
    assert ds.ContentDate == "20240501" and ds.ContentTime.startswith("143005")
    assert ds.AnatomicRegionSequence[0].CodeValue == "40983000"
    assert ds.ImageLaterality == "R"
    # no EXIF / GPS / XMP; the JPEG's scan bytes are those the patient sent
    raw = orthanc.instance_file(orthanc.find_instances(instance["uid"])[0])
    assert b"Exif" not in raw and b"GPS" not in raw and b"http://ns.adobe.com/xap" not in raw
    frame = pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)
    assert scan_data(next(frame)) == scan_data(photo)
    dciodvfy_check(ds)

    # the clinician's view at the EHR: found by patient and by study identifier
    by_patient = ehr_search(fhir_server, f"ImagingStudy?patient=Patient/{patient['id']}")
    assert uid in {s["identifier"][0]["value"].removeprefix("urn:oid:") for s in by_patient}
    by_ident = ehr_search(fhir_server, f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{uid}")
    assert len(by_ident) == 1 and by_ident[0]["subject"]["reference"] == f"Patient/{patient['id']}"
    assert by_ident[0]["numberOfInstances"] == 1
    assert by_ident[0]["series"][0]["modality"]["code"] == "XC"
    if service_name == "dimse_service":
        endpoint = by_ident[0]["contained"][0]
        assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
        assert endpoint["address"] == orthanc.dicomweb_url.rstrip("/")

    # and fhirbridge's own copy is searchable
    ours = svc.client.get("/fhir/ImagingStudy", params={
        "patient": f"Patient/{patient['id']}",
        "identifier": f"urn:dicom:uid|urn:oid:{uid}"}).json()
    assert ours["total"] == 1


def test_same_media_twice_gives_one_study_one_instance(dimse_service, orthanc, fhir_server,
                                                      ehr_patients):
    patient = ehr_patients["hanako"]
    media = media_for(patient, unique_photo(), by="identifier")
    _, first = completed(dimse_service, dimse_service.post_media(media))
    _, second = completed(dimse_service, dimse_service.post_media(media))
    assert first["id"] == second["id"]
    uid = first["identifier"][0]["value"].removeprefix("urn:oid:")
    at_ehr = ehr_search(fhir_server, f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{uid}")
    assert len(at_ehr) == 1 and at_ehr[0]["numberOfInstances"] == 1
    sop = first["series"][0]["instance"][0]["uid"]
    assert len(orthanc.find_instances(sop)) == 1
    ds = stored_object(orthanc, sop)
    assert str(ds.PatientName) == "山田^花子"


def test_unknown_patient_is_held_not_guessed(dimse_service, orthanc):
    media = with_photo(sample_media(), unique_photo())
    media["subject"] = {"identifier": {"system": MRN_SYSTEM, "value": "NO-SUCH-MRN"}}
    r = dimse_service.post_media(media)
    assert r.status_code == 201
    task = dimse_service.wait_task(f"Media/{r.json()['id']}")
    assert task["status"] == "on-hold"
    assert task["statusReason"]["coding"][0]["code"] == "no-match"
    assert "NO-SUCH-MRN" not in json.dumps(task)


def test_self_reported_conflict_is_held(dimse_service, ehr_patients):
    patient = ehr_patients["jose"]
    media = media_for(patient, unique_photo())
    media["contained"] = [{"resourceType": "Patient", "id": "src",
                           "name": [{"family": "Müller", "given": ["José"]}],
                           "birthDate": "1984-07-03"}]  # day and month swapped
    r = dimse_service.post_media(media)
    task = dimse_service.wait_task(f"Media/{r.json()['id']}")
    assert task["status"] == "on-hold"
    assert task["statusReason"]["coding"][0]["code"] == "demographics-conflict"
    assert "1984" not in json.dumps(task)


def test_unreachable_ehr_is_retried_not_held(tmp_path, orthanc):
    svc = FhirbridgeService(tmp_path, pacs_url=orthanc.dicom_url,
                            ehr_url="http://127.0.0.1:9/fhir").start()
    try:
        r = svc.post_media(with_photo(sample_media(), unique_photo()))
        assert r.status_code == 201
        import time

        deadline = time.monotonic() + 20
        jobs: list[dict] = []
        while time.monotonic() < deadline and not jobs:
            jobs = [j for j in svc.client.get("/admin/jobs", params={"state": "queued"}).json()
                    if j["attempts"] >= 1]
            time.sleep(0.1)
        assert jobs and "EhrUnavailable" in jobs[0]["last_error"]
        assert svc.task_for(f"Media/{r.json()['id']}")["status"] in ("in-progress", "requested")
    finally:
        svc.stop()
