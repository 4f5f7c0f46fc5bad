"""Transactions as R4 http.html#trules says: a Binary entry gets a server id and `201 Created`,
every reference to another entry's fullUrl is rewritten before anything is stored."""

from __future__ import annotations

import base64
import sqlite3
import uuid
from typing import Any

import pytest

from tests.integration.test_documents_and_bundles import (
    FHIR_JSON,
    attachment,
    document,
    entry,
    focus_of,
    media,
    post,
    task_count,
)
from fhirbridge.store.models import BinaryRecord
from tests.integration.test_photo_end_to_end import unique_photo
from tests.support.service import FhirbridgeService


@pytest.fixture(scope="module")
def svc(tmp_path_factory, orthanc, fhir_server):
    service = FhirbridgeService(
        tmp_path_factory.mktemp("fb-trx"), pacs_url=orthanc.dicom_url,
        ehr_url=fhir_server.base_url)
    yield service.start()
    service.stop()


def binary_entry(data: bytes, full_url: str) -> dict[str, Any]:
    return entry({"resourceType": "Binary", "contentType": "image/jpeg",
                  "data": base64.b64encode(data).decode()}, full_url)


def by_url(photo_url: str, patient: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Media", "status": "completed",
            "subject": {"reference": f"Patient/{patient['id']}"},
            "content": {"contentType": "image/jpeg", "url": photo_url}}


def test_binary_entry_gets_a_server_id_and_references_are_rewritten(svc, patient):
    binary_url, media_url = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
    photo = unique_photo()
    doc = document(patient, attachment(unique_photo(), "image/jpeg"),
                   context={"related": [{"reference": media_url}]})
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        binary_entry(photo, binary_url), entry(by_url(binary_url, patient), media_url),
        entry(doc)]}
    r = post(svc, "/fhir", bundle)
    assert r.status_code == 200, r.text
    replies = [e["response"] for e in r.json()["entry"]]
    assert [x["status"] for x in replies] == ["201 Created"] * 3
    binary_ref = replies[0]["location"]
    assert binary_ref.startswith("Binary/") and "urn:" not in binary_ref
    # the Binary is a real one: readable as POST /fhir/Binary would have made it
    raw = svc.client.get(f"/fhir/{binary_ref}")
    assert raw.status_code == 200 and raw.content == photo
    as_fhir = svc.client.get(f"/fhir/{binary_ref}", headers={"Accept": "application/fhir+json"})
    assert as_fhir.json()["id"] == binary_ref.split("/")[1]
    # the stored Media names the Binary by its server id; no urn:uuid survives anywhere
    media_ref = focus_of(replies[1]["location"])
    stored_media = svc.client.get(f"/fhir/{media_ref}", headers=FHIR_JSON)
    assert stored_media.status_code == 200, stored_media.text
    assert stored_media.json()["content"]["url"] == binary_ref
    stored_doc = svc.client.get(f"/fhir/{focus_of(replies[2]['location'])}")
    assert stored_doc.json()["context"]["related"][0]["reference"] == media_ref
    assert "urn:uuid" not in stored_media.text and "urn:uuid" not in stored_doc.text
    # the photo sent as a Binary entry still becomes DICOM
    task = svc.wait_task(media_ref)
    assert task["status"] == "completed", task


def test_transaction_naming_an_unknown_urn_uuid_is_refused_and_stores_nothing(svc, patient):
    before = task_count(svc)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        entry(media(patient, unique_photo())),
        entry(by_url(f"urn:uuid:{uuid.uuid4()}", patient))]}
    r = post(svc, "/fhir", bundle)
    assert r.status_code == 400, r.text
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "entry[1]" in outcome["issue"][0]["diagnostics"]
    assert task_count(svc) == before


def test_batch_entry_naming_an_unknown_urn_uuid_fails_alone(svc, patient):
    before = task_count(svc)
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        entry(by_url(f"urn:uuid:{uuid.uuid4()}", patient)),
        entry(media(patient, unique_photo()))]}
    r = post(svc, "/fhir", bundle)
    assert r.status_code == 200, r.text
    replies = [e["response"] for e in r.json()["entry"]]
    assert replies[0]["status"] == "400"
    assert replies[0]["outcome"]["resourceType"] == "OperationOutcome"
    assert replies[1]["status"] == "201 Created"
    assert task_count(svc) == before + 1


def binaries_held(svc: FhirbridgeService) -> int:
    with sqlite3.connect(svc.data_dir / "fhirbridge.db") as db:
        return db.execute(f"select count(*) from {BinaryRecord.__tablename__}").fetchone()[0]


def test_refused_transaction_keeps_no_binary(svc, patient):
    """The Binary entry's bytes are no PNG, as the Media that uses them declares: all refused,
    the Binary entry included (all or nothing)."""
    binary_url = f"urn:uuid:{uuid.uuid4()}"
    png_media = by_url(binary_url, patient)
    png_media["content"]["contentType"] = "image/png"
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        binary_entry(unique_photo(), binary_url), entry(png_media)]}
    before, held = task_count(svc), binaries_held(svc)
    r = post(svc, "/fhir", bundle)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["resourceType"] == "OperationOutcome"
    assert task_count(svc) == before
    assert binaries_held(svc) == held
