"""Without `[auth]`, /fhir answers clients on this machine only (metadata excepted); the
operator routes keep the same rule. The test client here claims a remote address."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhirbridge.app import build_services, create_app
from fhirbridge.config import load_settings


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    services = build_services(load_settings(data_dir=tmp_path_factory.mktemp("no-auth")))
    try:
        yield create_app(services, workers=0, mllp=False)
    finally:
        services.close()


@pytest.mark.parametrize("method, path", [
    ("GET", "/fhir/Task"), ("GET", "/fhir/Task/x"), ("GET", "/fhir/ImagingStudy"),
    ("GET", "/fhir/Media/x"), ("GET", "/fhir/Binary/0123"), ("POST", "/fhir/Media"),
    ("POST", "/fhir/DocumentReference"), ("POST", "/fhir"), ("POST", "/fhir/Binary"),
    ("GET", "/review"),
])
def test_remote_client_refused_without_auth(app: FastAPI, method: str, path: str) -> None:
    with TestClient(app, client=("10.20.30.40", 51000)) as remote:
        r = remote.request(method, path, content=b"{}",
                           headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 403, r.text
    assert r.json()["resourceType"] == "OperationOutcome"
    with TestClient(app, client=("127.0.0.1", 51000)) as local:
        assert local.request(method, path).status_code != 403


def test_metadata_open_and_no_smart_configuration_without_auth(app: FastAPI) -> None:
    with TestClient(app, client=("10.20.30.40", 51000)) as remote:
        assert remote.get("/fhir/metadata").status_code == 200
        r = remote.get("/fhir/.well-known/smart-configuration")
    assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome"
