"""DocumentReference and upload Bundles through `fhirbridge serve`, against real Orthanc
(C-STORE) and the real FHIR server: one Bundle = one study with a series per kind; a
transaction is all or nothing; a batch answers per entry; `relatesTo replaces` supersedes;
the same bytes again for the same patient reuse the stored instance."""

from __future__ import annotations

import base64
import hashlib
import io
import uuid
from typing import Any

import httpx
import pydicom
import pytest

from tests.integration.test_photo_end_to_end import unique_photo
from tests.support.service import FhirbridgeService

VL_PHOTO = "1.2.840.10008.5.1.4.1.1.77.1.4"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
FHIR_JSON = {"Content-Type": "application/fhir+json"}


def tiny_pdf(text: str = "") -> bytes:
    from pypdf import PdfWriter

    w = PdfWriter()
    w.add_blank_page(width=595, height=842)
    w.add_metadata({"/Producer": f"fhirbridge tests {text or uuid.uuid4().hex}"})
    buf = io.BytesIO()
    w.write(buf)
    return buf.getvalue()


def attachment(data: bytes, content_type: str, **extra: Any) -> dict[str, Any]:
    return {"contentType": content_type, "data": base64.b64encode(data).decode(),
            "size": len(data),
            "hash": base64.b64encode(hashlib.sha1(data).digest()).decode(), **extra}


def document(patient: dict[str, Any], *attachments: dict[str, Any], **fields: Any) -> dict:
    doc = {"resourceType": "DocumentReference", "status": "current",
           "subject": {"reference": f"Patient/{patient['id']}"},
           "type": {"text": "Patient letter"},
           "category": [{"text": "Patient-supplied documents"}],
           "content": [{"attachment": a} for a in attachments]}
    doc.update(fields)
    return doc


def media(patient: dict[str, Any], photo: bytes) -> dict[str, Any]:
    return {"resourceType": "Media", "status": "completed",
            "subject": {"reference": f"Patient/{patient['id']}"},
            "content": attachment(photo, "image/jpeg")}


def entry(resource: dict[str, Any], full_url: str | None = None) -> dict[str, Any]:
    return {"fullUrl": full_url or f"urn:uuid:{uuid.uuid4()}", "resource": resource,
            "request": {"method": "POST", "url": resource["resourceType"]}}


@pytest.fixture(scope="module")
def svc(tmp_path_factory, orthanc, fhir_server):
    service = FhirbridgeService(
        tmp_path_factory.mktemp("fb-docs"), pacs_url=orthanc.dicom_url,
        ehr_url=fhir_server.base_url, wado_rs_url=orthanc.dicomweb_url)
    yield service.start()
    service.stop()


def post(svc: FhirbridgeService, path: str, resource: dict[str, Any]) -> httpx.Response:
    return svc.client.post(path, json=resource, headers=FHIR_JSON)


def done(svc: FhirbridgeService, focus: str) -> tuple[dict[str, Any], dict[str, Any]]:
    task = svc.wait_task(focus)
    assert task["status"] == "completed", task
    study_ref = task["output"][0]["valueReference"]["reference"]
    return task, svc.client.get(f"/fhir/{study_ref}").json()


def stored(orthanc, sop_uid: str) -> pydicom.Dataset:
    ids = orthanc.find_instances(sop_uid)
    assert len(ids) == 1, f"expected one copy of {sop_uid}, found {len(ids)}"
    return pydicom.dcmread(io.BytesIO(orthanc.instance_file(ids[0])))


def focus_of(location: str) -> str:
    return "/".join(location.split("/fhir/")[-1].split("/")[:2])


def task_count(svc: FhirbridgeService) -> int:
    return svc.client.get("/fhir/Task").json().get("total", 0)


def test_document_reference_with_pdf_and_photo(svc, orthanc, patient, dciodvfy_check):
    pdf = tiny_pdf()
    photo = unique_photo()
    doc = document(patient, attachment(pdf, "application/pdf", title="IMG_0001.pdf"),
                   attachment(photo, "image/jpeg"), description="Discharge letter from abroad")
    r = post(svc, "/fhir/DocumentReference", doc)
    assert r.status_code == 201, r.text
    assert "data" not in r.json()["content"][0]["attachment"]
    _, study = done(svc, f"DocumentReference/{r.json()['id']}")
    assert study["numberOfSeries"] == 2 and study["numberOfInstances"] == 2
    by_class = {i["sopClass"]["code"].removeprefix("urn:oid:"): i
                for s in study["series"] for i in s["instance"]}
    assert set(by_class) == {ENCAPSULATED_PDF, VL_PHOTO}
    ds = stored(orthanc, by_class[ENCAPSULATED_PDF]["uid"])
    assert ds.Modality == "DOC"
    doc_bytes = bytes(ds.EncapsulatedDocument)
    assert doc_bytes[:len(pdf)] == pdf and len(doc_bytes) - len(pdf) in (0, 1)
    assert str(ds.DocumentTitle) == "Discharge letter from abroad"
    assert "IMG_0001" not in str(ds)  # client file names are not copied
    assert ds.PatientID == patient["identifier"][0]["value"]
    assert str(ds.PatientName) == "O'Brien-Smith^Zoë"
    photo_ds = stored(orthanc, by_class[VL_PHOTO]["uid"])
    assert photo_ds.StudyInstanceUID == ds.StudyInstanceUID
    assert photo_ds.SeriesInstanceUID != ds.SeriesInstanceUID
    path = svc.workdir / "check.dcm"
    ds.save_as(path)
    dciodvfy_check(path)


def test_transaction_bundle_is_one_study_with_a_series_per_kind(svc, orthanc, patient):
    binary_url = f"urn:uuid:{uuid.uuid4()}"
    photo_for_binary = unique_photo()
    doc = document(patient, {"contentType": "image/jpeg", "url": binary_url})
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        entry(media(patient, unique_photo())),
        entry(media(patient, unique_photo())),
        entry({"resourceType": "Binary", "contentType": "image/jpeg",
               "data": base64.b64encode(photo_for_binary).decode()}, binary_url),
        entry(doc),
        entry(document(patient, attachment(tiny_pdf(), "application/pdf"))),
    ]}
    r = post(svc, "/fhir", bundle)
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["type"] == "transaction-response" and len(reply["entry"]) == 5
    statuses = [e["response"]["status"] for e in reply["entry"]]
    assert statuses == ["201 Created"] * 5  # the Binary too (R4 http.html#trules)
    studies = set()
    for e in reply["entry"]:
        loc = e["response"]["location"]
        if loc.startswith("Binary/"):
            continue
        _, study = done(svc, focus_of(loc))
        studies.add(study["identifier"][0]["value"])
    assert len(studies) == 1
    _, study = done(svc, focus_of(reply["entry"][-1]["response"]["location"]))
    # the last writer sees everything: 3 photos in one series, 1 PDF in another
    counts = sorted(len(s["instance"]) for s in study["series"])
    assert counts == [1, 3], study
    # the Binary's bytes went into DICOM
    uids = [i["uid"] for s in study["series"] for i in s["instance"]]
    assert all(len(orthanc.find_instances(u)) == 1 for u in uids)


def test_transaction_with_one_bad_entry_stores_nothing(svc, patient):
    before = task_count(svc)
    bad = media(patient, unique_photo())
    bad["content"]["data"] = "!!not base64!!"
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [entry(media(patient, unique_photo())), entry(bad)]}
    r = post(svc, "/fhir", bundle)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["resourceType"] == "OperationOutcome"
    assert "entry[1]" in r.json()["issue"][0]["diagnostics"]
    assert task_count(svc) == before


def test_batch_answers_each_entry(svc, patient):
    bad = media(patient, unique_photo())
    bad["content"]["contentType"] = "image/gif"
    bundle = {"resourceType": "Bundle", "type": "batch",
              "entry": [entry(media(patient, unique_photo())), entry(bad)]}
    r = post(svc, "/fhir", bundle)
    assert r.status_code == 200, r.text
    first, second = r.json()["entry"]
    assert first["response"]["status"] == "201 Created"
    assert second["response"]["status"] == "415"
    assert "image/jpeg" in second["response"]["outcome"]["issue"][0]["diagnostics"]
    done(svc, focus_of(first["response"]["location"]))


def test_bundle_for_two_patients_is_refused(svc, patient, other_patient):
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [entry(media(patient, unique_photo())),
                        entry(media(other_patient, unique_photo()))]}
    r = post(svc, "/fhir", bundle)
    assert r.status_code == 422, r.text
    assert "same patient" in r.text


def test_replaces_supersedes_the_earlier_upload(svc, orthanc, patient):
    first = post(svc, "/fhir/DocumentReference",
                 document(patient, attachment(tiny_pdf(), "application/pdf")))
    assert first.status_code == 201, first.text
    _, study1 = done(svc, f"DocumentReference/{first.json()['id']}")
    old_uid = study1["series"][0]["instance"][0]["uid"]
    second = post(svc, "/fhir/DocumentReference", document(
        patient, attachment(tiny_pdf(), "application/pdf"),
        relatesTo=[{"code": "replaces",
                    "target": {"reference": f"DocumentReference/{first.json()['id']}"}}]))
    assert second.status_code == 201, second.text
    _, study2 = done(svc, f"DocumentReference/{second.json()['id']}")
    assert study2["identifier"] == study1["identifier"]  # the same study
    uids = [i["uid"] for s in study2["series"] for i in s["instance"]]
    assert old_uid not in uids and len(uids) == 1
    old = svc.client.get(f"/fhir/DocumentReference/{first.json()['id']}").json()
    assert old["status"] == "superseded"


def test_replacing_another_patients_upload_is_refused(svc, patient, other_patient):
    first = post(svc, "/fhir/DocumentReference",
                 document(patient, attachment(tiny_pdf(), "application/pdf")))
    done(svc, f"DocumentReference/{first.json()['id']}")
    second = post(svc, "/fhir/DocumentReference", document(
        other_patient, attachment(tiny_pdf(), "application/pdf"),
        relatesTo=[{"code": "replaces",
                    "target": {"reference": f"DocumentReference/{first.json()['id']}"}}]))
    task = svc.wait_task(f"DocumentReference/{second.json()['id']}")
    assert task["status"] == "failed"
    assert task["statusReason"]["coding"][0]["code"] == "replaces-other-patient"
    still = svc.client.get(f"/fhir/DocumentReference/{first.json()['id']}").json()
    assert still["status"] == "current"


def test_same_bytes_again_reuse_the_stored_instance(svc, orthanc, patient):
    photo = unique_photo()
    a = media(patient, photo)
    a["identifier"] = [{"system": "urn:portal", "value": uuid.uuid4().hex}]
    b = media(patient, photo)
    b["identifier"] = [{"system": "urn:portal", "value": uuid.uuid4().hex}]
    ra = post(svc, "/fhir/Media", a)
    _, study_a = done(svc, f"Media/{ra.json()['id']}")
    rb = post(svc, "/fhir/Media", b)
    task_b, study_b = done(svc, f"Media/{rb.json()['id']}")
    assert task_b["statusReason"]["coding"][0]["code"] == "duplicate"
    assert study_a["identifier"] == study_b["identifier"]
    uid = study_a["series"][0]["instance"][0]["uid"]
    assert len(orthanc.find_instances(uid)) == 1
    assert study_b["numberOfInstances"] == 1


def test_pdf_in_a_media_is_refused(svc, patient):
    m = media(patient, unique_photo())
    m["content"] = attachment(tiny_pdf(), "application/pdf")
    r = post(svc, "/fhir/Media", m)
    assert r.status_code == 415 and "DocumentReference" in r.text


def test_pdf_declared_as_jpeg_is_refused(svc, patient):
    r = post(svc, "/fhir/DocumentReference",
             document(patient, attachment(tiny_pdf(), "image/jpeg")))
    assert r.status_code == 415, r.text
    assert "application/pdf" in r.text


def test_attachment_by_url_of_a_binary_posted_first(svc, orthanc, patient):
    photo = unique_photo()
    r = svc.client.post("/fhir/Binary", content=photo, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 201, r.text
    binary_id = r.json()["id"]
    m = media(patient, photo)
    m["content"] = {"contentType": "image/jpeg", "url": f"Binary/{binary_id}"}
    created = post(svc, "/fhir/Media", m)
    assert created.status_code == 201, created.text
    _, study = done(svc, f"Media/{created.json()['id']}")
    ds = stored(orthanc, study["series"][0]["instance"][0]["uid"])
    assert ds.PatientID == patient["identifier"][0]["value"]


def test_attachment_url_off_the_allow_list_is_refused(svc, patient):
    m = media(patient, unique_photo())
    m["content"] = {"contentType": "image/jpeg", "url": "https://evil.example/photo.jpg"}
    before = task_count(svc)
    r = post(svc, "/fhir/Media", m)
    assert r.status_code == 422, r.text
    assert "allow-list" in r.text and "evil" not in r.text
    assert task_count(svc) == before


def test_binary_declared_as_the_wrong_type_in_the_attachment(svc, patient):
    r = svc.client.post("/fhir/Binary", content=tiny_pdf(),
                        headers={"Content-Type": "application/pdf"})
    assert r.status_code == 201, r.text
    m = media(patient, unique_photo())
    m["content"] = {"contentType": "image/jpeg", "url": f"Binary/{r.json()['id']}"}
    refused = post(svc, "/fhir/Media", m)
    assert refused.status_code == 415, refused.text
