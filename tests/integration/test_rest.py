"""FHIR R4 REST behaviour of uploads on `fhirbridge serve` with SMART auth: versioned reads
(the create's Location answers), ETag/Last-Modified, JSON only (XML asked → 406), conditional
create with If-None-Exist (a portal's safe retry), and `Prefer: return=`."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_photo_end_to_end import media_for, unique_photo
from tests.support.service import FhirbridgeService

FHIR_JSON_UTF8 = "application/fhir+json; charset=utf-8"
SYSTEM = "https://portal.example.org/uploads"


@pytest.fixture(scope="module")
def svc(tmp_path_factory, idp, fhir_server) -> Iterator[FhirbridgeService]:
    service = FhirbridgeService(
        tmp_path_factory.mktemp("fb-rest"), ehr_url=fhir_server.base_url,
        extra=f'[auth]\nissuer = "{idp.issuer}"\njwks_url = "{idp.jwks_url}"\n')
    service.start()
    service.client.headers["Authorization"] = "Bearer " + idp.mint(
        "system/*.*", audience=service.fhir, lifetime=3600)
    yield service
    service.stop()


# --- helpers -----------------------------------------------------------------------------------

def upload(patient: dict[str, Any], ident: str | None = None) -> dict[str, Any]:
    media = media_for(patient, unique_photo())
    media["identifier"] = [{"system": SYSTEM, "value": ident or f"up-{uuid.uuid4().hex}"}]
    return media


def post(svc: FhirbridgeService, media: dict[str, Any], *, client: httpx.Client | None = None,
         **headers: str) -> httpx.Response:
    return (client or svc.client).post("/fhir/Media", json=media, headers={
        "Content-Type": "application/fhir+json",
        **{k.replace("_", "-"): v for k, v in headers.items()}})


def path_of(url: str, svc: FhirbridgeService) -> str:
    assert url.startswith(svc.base), url
    return url.removeprefix(svc.base)


def blobs(svc: FhirbridgeService) -> list[Path]:
    root = svc.data_dir / "blobs"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def outcome(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == FHIR_JSON_UTF8, r.headers
    body = r.json()
    assert body["resourceType"] == "OperationOutcome", body
    return body


# --- 6: versioned reads ------------------------------------------------------------------------

def test_the_location_of_a_create_answers_with_version_1(svc, patient):
    r = post(svc, upload(patient))
    assert r.status_code == 201, r.text
    created = r.json()
    location = r.headers["location"]
    assert location == f"{svc.fhir}/Media/{created['id']}/_history/1"
    assert created["meta"]["versionId"] == "1"
    assert r.headers["etag"] == 'W/"1"'
    assert parsedate_to_datetime(r.headers["last-modified"]).tzinfo is not None

    got = svc.client.get(path_of(location, svc))  # vread (R4 http.html#vread)
    assert got.status_code == 200, got.text
    assert got.headers["content-type"] == FHIR_JSON_UTF8
    assert got.json()["id"] == created["id"]
    assert got.json()["meta"]["versionId"] == "1"
    assert got.headers["etag"] == 'W/"1"'

    read = svc.client.get(f"/fhir/Media/{created['id']}")
    assert read.status_code == 200
    assert read.json()["meta"] == created["meta"]  # lastUpdated as the create said
    assert read.headers["etag"] == 'W/"1"'
    assert read.headers["last-modified"] == r.headers["last-modified"]

    outcome(svc.client.get(f"/fhir/Media/{created['id']}/_history/2"), 404)
    outcome(svc.client.get(f"/fhir/Media/{uuid.uuid4()}/_history/1"), 404)
    # a Media is not a DocumentReference, whatever the version
    outcome(svc.client.get(f"/fhir/DocumentReference/{created['id']}/_history/1"), 404)


def test_a_task_read_carries_a_version_and_validators(svc, patient):
    r = post(svc, upload(patient))
    task_path = "/fhir/" + r.headers["x-task"]
    got = svc.client.get(task_path)
    assert got.status_code == 200
    version = got.json()["meta"]["versionId"]
    assert got.headers["etag"] == f'W/"{version}"'
    assert parsedate_to_datetime(got.headers["last-modified"]).tzinfo is not None


# --- 7: JSON only ------------------------------------------------------------------------------

def test_xml_asked_is_406_and_json_is_answered_with_its_charset(svc, patient):
    r = post(svc, upload(patient))
    media_path = f"/fhir/Media/{r.json()['id']}"
    assert r.headers["content-type"] == FHIR_JSON_UTF8
    for accept in ("application/fhir+xml", "application/xml", "text/xml;q=0.9"):
        outcome(svc.client.get(media_path, headers={"Accept": accept}), 406)
    for fmt in ("xml", "application/fhir+xml", "text/xml", "ttl"):
        outcome(svc.client.get(media_path, params={"_format": fmt}), 406)
    outcome(svc.client.get("/fhir/metadata", params={"_format": "xml"}), 406)
    for accept in ("application/fhir+json", "application/json", "*/*",
                   "application/fhir+xml;q=0.9, application/fhir+json"):
        ok = svc.client.get(media_path, headers={"Accept": accept})
        assert ok.status_code == 200 and ok.headers["content-type"] == FHIR_JSON_UTF8
    for fmt in ("json", "application/fhir+json"):
        assert svc.client.get(media_path, params={"_format": fmt}).status_code == 200
    # errors from every layer say the charset too
    outcome(svc.client.get(f"/fhir/Media/{uuid.uuid4()}"), 404)
    with httpx.Client(base_url=svc.base, timeout=30) as anon:
        assert anon.get(media_path).headers["content-type"] == FHIR_JSON_UTF8  # 401


def test_a_create_asking_for_xml_stores_nothing(svc, patient):
    before = blobs(svc)
    outcome(post(svc, upload(patient), Accept="application/fhir+xml"), 406)
    outcome(svc.client.post("/fhir/Media", params={"_format": "xml"}, json=upload(patient),
                            headers={"Content-Type": "application/fhir+json"}), 406)
    assert blobs(svc) == before


# --- 8: conditional create ---------------------------------------------------------------------

def test_if_none_exist_retry_returns_the_first_upload_and_stores_nothing(svc, patient):
    ident = f"retry-{uuid.uuid4().hex}"
    media = upload(patient, ident)
    first = post(svc, media, If_None_Exist=f"identifier={SYSTEM}|{ident}")
    assert first.status_code == 201, first.text
    before = blobs(svc)

    again = post(svc, media, If_None_Exist=f"identifier={SYSTEM}|{ident}")
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["x-task"] == first.headers["x-task"]
    assert again.headers["etag"] == 'W/"1"'
    assert again.json()["meta"] == first.json()["meta"]
    # the token forms of R4 search.html#token: value only, and URL-encoded
    assert post(svc, media, If_None_Exist=f"identifier={ident}").status_code == 200
    assert post(svc, media, If_None_Exist=httpx.QueryParams(
        {"identifier": f"{SYSTEM}|{ident}"}).__str__()).status_code == 200
    assert blobs(svc) == before  # no second copy of the bytes

    # another system's identifier with the same value is not a match
    other = post(svc, upload(patient, ident), If_None_Exist=f"identifier=urn:x|{ident}")
    assert other.status_code == 201


def test_if_none_exist_with_several_matches_is_412(svc, patient):
    ident = f"twice-{uuid.uuid4().hex}"
    for _ in range(2):  # two uploads share the identifier (no condition asked)
        assert post(svc, upload(patient, ident)).status_code == 201
    before = blobs(svc)
    outcome(post(svc, upload(patient, ident), If_None_Exist=f"identifier={SYSTEM}|{ident}"),
            412)
    assert blobs(svc) == before


def test_if_none_exist_refuses_what_it_cannot_search(svc, patient):
    before = blobs(svc)
    for condition in ("_id=abc", "identifier=x&subject=Patient/1", "", "identifier="):
        outcome(post(svc, upload(patient), If_None_Exist=condition), 400)
    assert blobs(svc) == before


def test_if_none_exist_never_reveals_another_patients_upload(svc, idp, patient, other_patient):
    ident = f"shared-{uuid.uuid4().hex}"
    condition = f"identifier={SYSTEM}|{ident}"

    def client_of(who: dict[str, Any]) -> httpx.Client:
        tok = idp.mint("patient/Media.cr", audience=svc.fhir, patient=who["id"])
        return httpx.Client(base_url=svc.base, timeout=30,
                            headers={"Authorization": f"Bearer {tok}"})

    with client_of(patient) as mine, client_of(other_patient) as theirs:
        first = post(svc, upload(patient, ident), client=mine, If_None_Exist=condition)
        assert first.status_code == 201, first.text
        # the other patient's token, same identifier: a new upload of theirs, not ours
        other = post(svc, upload(other_patient, ident), client=theirs,
                     If_None_Exist=condition)
        assert other.status_code == 201, other.text
        assert other.json()["id"] != first.json()["id"]
        assert other.json()["subject"]["reference"] == f"Patient/{other_patient['id']}"
        # each patient's retry finds their own
        again = post(svc, upload(patient, ident), client=mine, If_None_Exist=condition)
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        theirs_again = post(svc, upload(other_patient, ident), client=theirs,
                            If_None_Exist=condition)
        assert theirs_again.status_code == 200
        assert theirs_again.json()["id"] == other.json()["id"]


def test_if_none_exist_match_shows_a_create_only_client_no_content(svc, idp, patient):
    ident = f"co-{uuid.uuid4().hex}"
    assert post(svc, upload(patient, ident)).status_code == 201
    tok = idp.mint("system/Media.c", audience=svc.fhir)
    with httpx.Client(base_url=svc.base, timeout=30,
                      headers={"Authorization": f"Bearer {tok}"}) as create_only:
        r = post(svc, upload(patient, ident), client=create_only,
                 If_None_Exist=f"identifier={SYSTEM}|{ident}")
    body = outcome(r, 200)
    assert "/_history/1" in r.headers["location"]
    assert ident not in r.text and "subject" not in body


# --- 9: Prefer return --------------------------------------------------------------------------

def test_prefer_return_minimal_representation_and_operation_outcome(svc, patient):
    minimal = post(svc, upload(patient), Prefer="return=minimal")
    assert minimal.status_code == 201 and minimal.content == b""
    assert "/_history/1" in minimal.headers["location"]
    assert minimal.headers["etag"] == 'W/"1"'
    assert svc.client.get(path_of(minimal.headers["location"], svc)).status_code == 200

    full = post(svc, upload(patient), Prefer="return=representation")
    assert full.status_code == 201 and full.json()["resourceType"] == "Media"

    oo = post(svc, upload(patient), Prefer="return=OperationOutcome")
    body = outcome(oo, 201)
    assert body["issue"][0]["severity"] == "information"
    assert oo.headers["x-task"] in body["issue"][0]["diagnostics"]
    assert svc.client.get(path_of(oo.headers["location"], svc)).status_code == 200

    # an unknown preference is ignored (RFC 7240 2): the representation
    odd = post(svc, upload(patient), Prefer="return=everything, respond-async")
    assert odd.status_code == 201 and odd.json()["resourceType"] == "Media"


# --- 8: Bundle entries' request.ifNoneExist ----------------------------------------------------

def bundle(kind: str, *items: tuple[dict[str, Any], str | None]) -> dict[str, Any]:
    entries = []
    for resource, condition in items:
        request = {"method": "POST", "url": resource["resourceType"]}
        if condition is not None:
            request["ifNoneExist"] = condition
        entries.append({"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": resource,
                        "request": request})
    return {"resourceType": "Bundle", "type": kind, "entry": entries}


def post_bundle(svc: FhirbridgeService, doc: dict[str, Any]) -> httpx.Response:
    return svc.client.post("/fhir", json=doc, headers={"Content-Type": "application/fhir+json"})


def tasks_total(svc: FhirbridgeService) -> int:
    r = svc.client.get("/fhir/Task", params={"_summary": "count"})
    assert r.status_code == 200, r.text
    return r.json()["total"]


def test_bundle_if_none_exist_answers_the_existing_upload(svc, patient):
    ident = f"bundle-{uuid.uuid4().hex}"
    first = post(svc, upload(patient, ident))
    assert first.status_code == 201
    before = tasks_total(svc)
    for kind in ("transaction", "batch"):
        r = post_bundle(svc, bundle(kind, (upload(patient, ident), f"identifier={SYSTEM}|{ident}"),
                                    (upload(patient), None)))
        assert r.status_code == 200, r.text
        matched, new = (e["response"] for e in r.json()["entry"])
        assert matched["status"].startswith("200"), matched
        assert matched["location"] == first.headers["location"]
        assert new["status"].startswith("201"), new
    assert tasks_total(svc) == before + 2  # only the two unconditional entries were created


def test_bundle_if_none_exist_with_several_matches(svc, patient):
    ident = f"bundle2-{uuid.uuid4().hex}"
    for _ in range(2):
        assert post(svc, upload(patient, ident)).status_code == 201
    before = tasks_total(svc)
    condition = f"identifier={SYSTEM}|{ident}"
    # transaction: all or nothing
    outcome(post_bundle(svc, bundle("transaction", (upload(patient, ident), condition),
                                    (upload(patient), None))), 412)
    assert tasks_total(svc) == before
    # batch: that entry fails alone
    r = post_bundle(svc, bundle("batch", (upload(patient, ident), condition),
                                (upload(patient), None)))
    assert r.status_code == 200, r.text
    failed, new = (e["response"] for e in r.json()["entry"])
    assert failed["status"].startswith("412"), failed
    assert new["status"].startswith("201"), new
    assert tasks_total(svc) == before + 1
