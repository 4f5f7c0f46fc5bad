"""Inbound SMART on FHIR through `fhirbridge serve` with `[auth]` and the test identity provider:
every /fhir route refuses missing, expired, misaddressed, forged and unsigned tokens (401 +
WWW-Authenticate), tokens without the scope (403), takes v2 and v1 scopes, keeps a
patient-bound token to its patient; a refused upload stores nothing (no Task, no blob, nothing
in Orthanc); JWKS keys are cached and a rotated key works after one re-read."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from tests.integration.test_documents_and_bundles import (
    attachment,
    document,
    entry,
    media,
    tiny_pdf,
)
from tests.integration.test_photo_end_to_end import unique_photo
from tests.support.idp import IdentityProvider, rsa_key
from tests.support.phi import seed
from tests.support.service import FhirbridgeService

FHIR_JSON = {"Content-Type": "application/fhir+json"}
ALL = "system/*.*"


@pytest.fixture(scope="module")
def svc(tmp_path_factory, idp, orthanc, fhir_server) -> Iterator[FhirbridgeService]:
    service = FhirbridgeService(
        tmp_path_factory.mktemp("fb-auth"), pacs_url=orthanc.dicom_url,
        ehr_url=fhir_server.base_url, wado_rs_url=orthanc.dicomweb_url,
        extra=f'[auth]\nissuer = "{idp.issuer}"\njwks_url = "{idp.jwks_url}"\n')
    service.start()
    # the helper client (wait_task, settling) acts as a fully trusted system client
    service.client.headers["Authorization"] = "Bearer " + idp.mint(
        ALL, audience=service.fhir, lifetime=3600)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def anon(svc) -> Iterator[httpx.Client]:
    """A client with no credentials of its own."""
    with httpx.Client(base_url=svc.base, timeout=30) as client:
        yield client


def token(idp: IdentityProvider, svc: FhirbridgeService, scope: str, **kw: Any) -> str:
    return idp.mint(scope, audience=kw.pop("audience", svc.fhir), **kw)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forged(idp: IdentityProvider, svc: FhirbridgeService, alg: str) -> str:
    """`alg: none`, or HS256 keyed with the issuer's public key (the RS/HS confusion)."""
    now = int(time.time())
    claims = {"iss": idp.issuer, "aud": svc.fhir, "sub": "mallory", "scope": ALL,
              "iat": now, "exp": now + 300}
    head = (b64(json.dumps({"alg": alg, "kid": idp.rsa_kid, "typ": "JWT"}).encode()) + "."
            + b64(json.dumps(claims).encode()))
    sig = ""
    if alg == "HS256":
        pem = idp.keys[idp.rsa_kid][0].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        sig = b64(hmac.new(pem, head.encode(), hashlib.sha256).digest())
    out = f"{head}.{sig}"
    seed(out)
    return out


# --- what is stored ----------------------------------------------------------------------------

def settle(svc: FhirbridgeService, timeout: float = 60) -> None:
    """Wait until no upload is still being processed (so counts below are stable)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = svc.client.get("/fhir/Task", params={"status": "requested,in-progress"})
        if r.json()["total"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError("uploads still in progress")


def footprint(svc: FhirbridgeService, orthanc) -> tuple[int, int, int]:
    tasks = svc.client.get("/fhir/Task", params={"_count": 0}).json()["total"]
    blobs = sum(1 for p in Path(svc.data_dir, "blobs").rglob("*") if p.is_file())
    return tasks, blobs, len(orthanc.instances())


# --- seeded data: one upload per patient, a Binary per patient ---------------------------------

@pytest.fixture(scope="module")
def seeded(svc, idp, patient, other_patient) -> dict[str, Any]:
    """Patient A's and patient B's uploads (processed), and a Binary posted by each's token."""
    out: dict[str, Any] = {}
    for key, p in (("a", patient), ("b", other_patient)):
        r = svc.client.post("/fhir/Media", json=media(p, unique_photo()), headers=FHIR_JSON)
        assert r.status_code == 201, r.text
        mid = r.json()["id"]
        task = svc.wait_task(f"Media/{mid}")
        assert task["status"] == "completed", task
        d = svc.client.post("/fhir/DocumentReference",
                            json=document(p, attachment(tiny_pdf(), "application/pdf")),
                            headers=FHIR_JSON)
        assert d.status_code == 201, d.text
        pt = token(idp, svc, "patient/Binary.c", patient=p["id"])
        b = svc.client.post("/fhir/Binary", content=unique_photo(),
                            headers={"Content-Type": "image/jpeg",
                                     "Authorization": f"Bearer {pt}"})
        assert b.status_code == 201, b.text
        out[key] = {"patient": p, "media": mid, "task": task["id"],
                    "study": task["output"][0]["valueReference"]["reference"].split("/")[1],
                    "doc": d.json()["id"], "binary": b.json()["id"]}
    settle(svc)
    return out


# --- the routes --------------------------------------------------------------------------------

def bundle_of(patient: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction",
            "entry": [entry(media(patient, unique_photo()))]}


# name: (method, path(seeded), body(patient) or None, v2 scope, v1 scope, upload?)
ROUTES: dict[str, tuple[str, Callable[[dict], str], Callable[[dict], Any] | None, str, str,
                        bool]] = {
    "create Media": ("POST", lambda s: "/fhir/Media", lambda p: media(p, unique_photo()),
                     "system/Media.c", "system/Media.write", True),
    "create DocumentReference": (
        "POST", lambda s: "/fhir/DocumentReference",
        lambda p: document(p, attachment(tiny_pdf(), "application/pdf")),
        "system/DocumentReference.c", "user/DocumentReference.write", True),
    "transaction Bundle": ("POST", lambda s: "/fhir", bundle_of, "system/Media.c",
                           "system/Media.*", True),
    "create Binary": ("POST", lambda s: "/fhir/Binary", lambda p: unique_photo(),
                      "system/Binary.c", "system/Binary.write", True),
    "read Binary": ("GET", lambda s: f"/fhir/Binary/{s['a']['binary']}", None,
                    "system/Binary.r", "system/Binary.read", False),
    "read Media": ("GET", lambda s: f"/fhir/Media/{s['a']['media']}", None,
                   "system/Media.r", "system/Media.read", False),
    "read DocumentReference": ("GET", lambda s: f"/fhir/DocumentReference/{s['a']['doc']}",
                               None, "system/DocumentReference.r",
                               "system/DocumentReference.read", False),
    "search Task": ("GET", lambda s: f"/fhir/Task?focus=Media/{s['a']['media']}", None,
                    "system/Task.s", "system/Task.read", False),
    "read Task": ("GET", lambda s: f"/fhir/Task/{s['a']['task']}", None, "system/Task.r",
                  "user/Task.read", False),
    "search ImagingStudy": (
        "GET", lambda s: f"/fhir/ImagingStudy?patient=Patient/{s['a']['patient']['id']}", None,
        "system/ImagingStudy.s", "system/ImagingStudy.read", False),
    "read ImagingStudy": ("GET", lambda s: f"/fhir/ImagingStudy/{s['a']['study']}", None,
                          "system/ImagingStudy.r", "system/*.read", False),
}
BAD_TOKENS = ["none", "expired", "wrong-audience", "wrong-issuer", "other-key", "alg-none",
              "hs256-public-key", "garbage"]


def send(client: httpx.Client, route: str, seeded: dict[str, Any], patient: dict[str, Any],
         bearer: str | None) -> httpx.Response:
    method, path, body, *_ = ROUTES[route]
    headers = {} if bearer is None else {"Authorization": f"Bearer {bearer}"}
    if body is None:
        return client.request(method, path(seeded), headers=headers)
    content = body(patient)
    if isinstance(content, bytes):
        return client.request(method, path(seeded), content=content,
                              headers={**headers, "Content-Type": "image/jpeg"})
    return client.request(method, path(seeded), json=content, headers={**headers, **FHIR_JSON})


def bad_token(kind: str, idp: IdentityProvider, svc: FhirbridgeService) -> str | None:
    return {
        "none": lambda: None,
        "expired": lambda: token(idp, svc, ALL, lifetime=-300),
        "wrong-audience": lambda: token(idp, svc, ALL, audience="https://other.example/fhir"),
        "wrong-issuer": lambda: token(idp, svc, ALL, issuer="https://evil.example"),
        "other-key": lambda: token(idp, svc, ALL, key=rsa_key()),
        "alg-none": lambda: forged(idp, svc, "none"),
        "hs256-public-key": lambda: forged(idp, svc, "HS256"),
        "garbage": lambda: "definitely.not.a-jwt",
    }[kind]()


def assert_outcome(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert "Traceback" not in r.text
    return body


# --- the tests ---------------------------------------------------------------------------------

def test_open_endpoints_need_no_token(svc, anon, idp):
    conf = anon.get("/fhir/.well-known/smart-configuration")
    assert conf.status_code == 200, conf.text
    doc = conf.json()
    assert doc["issuer"] == idp.issuer and doc["jwks_uri"] == idp.jwks_url
    assert doc["token_endpoint"] == idp.token_url  # read from the issuer's own configuration
    assert {"client-confidential-asymmetric", "permission-v2", "permission-v1"} \
        <= set(doc["capabilities"])
    assert "system/Media.c" in doc["scopes_supported"]
    meta = anon.get("/fhir/metadata")
    assert meta.status_code == 200
    security = meta.json()["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    uris = security["extension"][0]
    assert uris["url"].endswith("/oauth-uris")
    assert {"url": "token", "valueUri": idp.token_url} in uris["extension"]


def test_keys_cached_and_rotated_key_works_after_one_reread(svc, anon, idp, seeded):
    path = f"/fhir/Task/{seeded['a']['task']}"
    good = token(idp, svc, "system/Task.rs")
    assert anon.get(path, headers={"Authorization": f"Bearer {good}"}).status_code == 200
    reads = idp.jwks_reads
    for _ in range(30):
        t = token(idp, svc, "system/Task.rs")
        assert anon.get(path, headers={"Authorization": f"Bearer {t}"}).status_code == 200
    assert idp.jwks_reads == reads, "the JWKS was read again for a known key"
    kid = idp.rotate("ES384")
    for _ in range(5):
        t = token(idp, svc, "system/Task.rs", kid=kid)
        assert anon.get(path, headers={"Authorization": f"Bearer {t}"}).status_code == 200
    assert idp.jwks_reads == reads + 1, "a new kid should cost exactly one re-read"
    for n in range(10):  # a flood of made-up kids cannot make it re-read per request
        t = token(idp, svc, "system/Task.rs", kid=f"made-up-{n}", key=rsa_key())
        r = anon.get(path, headers={"Authorization": f"Bearer {t}"})
        assert_outcome(r, 401)
    assert idp.jwks_reads <= reads + 2


@pytest.mark.parametrize("kind", BAD_TOKENS)
@pytest.mark.parametrize("route", list(ROUTES))
def test_bad_credentials_are_401_and_store_nothing(svc, anon, idp, orthanc, seeded, patient,
                                                   route, kind):
    upload = ROUTES[route][5]
    if upload:
        settle(svc)
        before = footprint(svc, orthanc)
    r = send(anon, route, seeded, patient, bad_token(kind, idp, svc))
    body = assert_outcome(r, 401)
    challenge = r.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="fhirbridge"')
    assert ('error="invalid_token"' in challenge) == (kind != "none")
    assert patient["id"] not in r.text and "mallory" not in json.dumps(body)
    if upload:
        time.sleep(0.2)
        assert footprint(svc, orthanc) == before


@pytest.mark.parametrize("route", list(ROUTES))
def test_scope_lacking_is_403_and_v2_v1_scopes_suffice(svc, anon, idp, orthanc, seeded,
                                                        patient, route):
    _, _, _, v2, v1, upload = ROUTES[route]
    if upload:
        settle(svc)
        before = footprint(svc, orthanc)
    wrong = token(idp, svc, "system/AuditEvent.rs openid fhirUser system/Task.c")
    r = send(anon, route, seeded, patient, wrong)
    assert_outcome(r, 403)
    assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
    if upload:
        time.sleep(0.2)
        assert footprint(svc, orthanc) == before
    for scope in (v2, v1):
        r = send(anon, route, seeded, patient, token(idp, svc, scope))
        assert r.status_code == (201 if upload and route != "transaction Bundle" else 200), \
            (scope, r.text)


@pytest.mark.parametrize("route", list(ROUTES))
def test_patient_token_for_another_patient(svc, anon, idp, orthanc, seeded, other_patient,
                                           route):
    """A token bound to patient B: uploads about A are 403 with nothing kept; A's resources
    read as if absent (404); searches return none of A's."""
    _, _, _, v2, _, upload = ROUTES[route]
    bound = token(idp, svc, v2.replace("system/", "patient/"), patient=other_patient["id"])
    if upload:
        settle(svc)
        before = footprint(svc, orthanc)
    r = send(anon, route, seeded, seeded["a"]["patient"], bound)
    if route == "create Binary":  # raw bytes name no patient: bound to the poster's patient
        assert r.status_code == 201, r.text
        path = f"/fhir/Binary/{r.json()['id']}"
        theirs = token(idp, svc, "patient/Binary.r", patient=seeded["a"]["patient"]["id"])
        assert_outcome(anon.get(path, headers={"Authorization": f"Bearer {theirs}"}), 404)
        mine = token(idp, svc, "patient/Binary.r", patient=other_patient["id"])
        assert anon.get(path, headers={"Authorization": f"Bearer {mine}"}).status_code == 200
    elif upload:
        assert_outcome(r, 403)
        time.sleep(0.2)
        assert footprint(svc, orthanc) == before
    elif route.startswith("search"):
        assert r.status_code == 200, r.text
        assert r.json()["entry"] == [], r.text
    else:
        assert_outcome(r, 404)


def test_patient_token_uploads_for_its_own_patient(svc, anon, idp, seeded, other_patient):
    """By reference and by identifier (resolved at the EHR): 201, processed, and visible to
    that patient's token; another patient's identifier: 403."""
    bound = token(idp, svc, "patient/Media.c patient/Task.rs patient/ImagingStudy.rs",
                  patient=other_patient["id"])
    auth = {"Authorization": f"Bearer {bound}", **FHIR_JSON}
    by_ref = anon.post("/fhir/Media", json=media(other_patient, unique_photo()), headers=auth)
    assert by_ref.status_code == 201, by_ref.text
    by_ident = media(other_patient, unique_photo())
    by_ident["subject"] = {"identifier": other_patient["identifier"][0]}
    r = anon.post("/fhir/Media", json=by_ident, headers=auth)
    assert r.status_code == 201, r.text
    task = svc.wait_task(f"Media/{r.json()['id']}")
    assert task["status"] == "completed", task
    someone_else = media(other_patient, unique_photo())
    someone_else["subject"] = {"identifier": seeded["a"]["patient"]["identifier"][0]}
    assert_outcome(anon.post("/fhir/Media", json=someone_else, headers=auth), 403)
    # absolute reference to a server that is not the EHR
    elsewhere = media(other_patient, unique_photo())
    elsewhere["subject"] = {"reference": f"https://other.example/fhir/Patient/{other_patient['id']}"}
    assert_outcome(anon.post("/fhir/Media", json=elsewhere, headers=auth), 403)


def test_patient_token_searches_see_only_its_patient(svc, anon, idp, seeded):
    a, b = seeded["a"], seeded["b"]
    bound = token(idp, svc, "patient/*.rs", patient=a["patient"]["id"])
    auth = {"Authorization": f"Bearer {bound}"}
    tasks = anon.get("/fhir/Task", params={"_count": 1000}, headers=auth).json()
    ids = {e["resource"]["id"] for e in tasks["entry"]}
    assert a["task"] in ids and b["task"] not in ids
    everyone = svc.client.get("/fhir/Task", params={"_count": 1000}).json()["total"]
    assert tasks["total"] < everyone
    focus_b = anon.get("/fhir/Task", params={"focus": f"Media/{b['media']}"}, headers=auth)
    assert focus_b.json()["entry"] == []
    studies = anon.get("/fhir/ImagingStudy", headers=auth).json()
    refs = {e["resource"]["subject"]["reference"] for e in studies["entry"]}
    assert refs == {f"Patient/{a['patient']['id']}"}
    other = anon.get("/fhir/ImagingStudy", params={"patient": f"Patient/{b['patient']['id']}"},
                     headers=auth)
    assert other.json()["entry"] == []
    for path in (f"/fhir/Task/{b['task']}", f"/fhir/Media/{b['media']}",
                 f"/fhir/DocumentReference/{b['doc']}", f"/fhir/ImagingStudy/{b['study']}",
                 f"/fhir/Binary/{b['binary']}"):
        assert_outcome(anon.get(path, headers=auth), 404)
    for path in (f"/fhir/Task/{a['task']}", f"/fhir/Media/{a['media']}",
                 f"/fhir/ImagingStudy/{a['study']}", f"/fhir/Binary/{a['binary']}"):
        assert anon.get(path, headers=auth).status_code == 200, path


def test_operator_routes_take_an_operator_jwt(svc, anon, idp):
    ok = token(idp, svc, "fhirbridge/operator")
    assert anon.get("/review", headers={"Authorization": f"Bearer {ok}"}).status_code == 200
    no = token(idp, svc, "system/Media.c")
    assert_outcome(anon.get("/review", headers={"Authorization": f"Bearer {no}"}), 403)
    assert_outcome(anon.get("/review", headers={"Authorization": "Bearer x.y.z"}), 401)


def test_patient_token_upload_matched_to_another_patient_is_held(svc, anon, idp, fhir_server):
    """The token's patient was merged into another at the EHR after the token was issued:
    identity matching finds the survivor, so the upload is held (patient-mismatch), never
    stored under someone the token was not for."""
    from tests.integration.conftest import mrn

    survivor = fhir_server.create_patient("Survivor", ["Sam"], "1980-02-02", "male",
                                          mrn("MRN-S"))
    merged = fhir_server.create_patient("Merged", ["Max"], "1980-02-02", "male", mrn("MRN-M"))
    merged = {**merged, "active": False, "link": [
        {"other": {"reference": f"Patient/{survivor['id']}"}, "type": "replaced-by"}]}
    r = httpx.put(f"{fhir_server.base_url}/Patient/{merged['id']}", json=merged,
                  headers=FHIR_JSON, timeout=10)
    assert r.status_code == 200, r.text
    bound = token(idp, svc, "patient/Media.c", patient=merged["id"])
    up = anon.post("/fhir/Media", json=media(merged, unique_photo()),
                   headers={"Authorization": f"Bearer {bound}", **FHIR_JSON})
    assert up.status_code == 201, up.text
    task = svc.wait_task(f"Media/{up.json()['id']}")
    assert task["status"] == "on-hold", task
    assert task["statusReason"]["coding"][0]["code"] == "patient-mismatch", task
    assert "output" not in task
