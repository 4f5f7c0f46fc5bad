"""SMART Backend Services towards the EHR, against real components on loopback: the test IdP's
strict token endpoint (real RSA and EC P-384 keys), the real test FHIR server behind the
auth-checking proxy. Assertion shape (RFC 7523 3), token caching and refresh, one retry on a
401, smart-configuration discovery, errors that name no secret, and start-up checks."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from fhirbridge.adapters.ehr import EhrRefused, EhrUnavailable, FhirEhr
from fhirbridge.adapters.smart_backend import (
    EhrAuthConfigError,
    SmartBackendAuth,
    build_ehr_auth,
)
from fhirbridge.config import EhrSettings
from tests.support.idp import IdentityProvider, ec_key, private_pem, rsa_key
from tests.support.servers import free_port

MRN_SYSTEM = "urn:oid:2.16.840.1.113883.3.7777"


@pytest.fixture(scope="module")
def patient_ref(fhir_server) -> str:
    p = fhir_server.create_patient("Backend", ["Services"], "1950-02-03", "female",
                                   [{"system": MRN_SYSTEM, "value": "MRN-SB-1"}])
    return f"Patient/{p['id']}"


@pytest.fixture
def fresh(idp, proxy) -> IdentityProvider:
    """Counters start at zero; tokens live for 300 s unless a test says otherwise."""
    idp.token_requests.clear()
    idp.assertions.clear()
    idp.token_lifetime = 300
    idp.fail_token_requests = 0
    proxy.reset()
    return idp


class Client:
    """A registered backend-services client: its key as a PEM file and its settings."""

    def __init__(self, idp: IdentityProvider, tmp_path: Path, kind: str, fhir_url: str,
                 **settings: Any) -> None:
        self.key = rsa_key() if kind == "rsa" else ec_key()
        self.client_id = f"fhirbridge-{kind}-{id(self)}"
        self.kid = f"fb-{kind}-1"
        idp.register_client(self.client_id, self.key.public_key())
        pem = tmp_path / f"{kind}.pem"
        pem.write_bytes(private_pem(self.key))
        self.settings = EhrSettings(fhir_url=fhir_url, auth="smart-backend",
                                    client_id=self.client_id, private_key_file=str(pem),
                                    key_id=self.kid, **settings)

    def auth(self) -> SmartBackendAuth:
        auth = build_ehr_auth(self.settings)
        assert isinstance(auth, SmartBackendAuth)
        return auth


def token_requests(idp: IdentityProvider, status: int = 200) -> int:
    return sum(1 for r in idp.token_requests if r["status"] == status)


# --- the assertion ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind,alg", [("rsa", "RS384"), ("ec", "ES384")])
def test_assertion_header_and_claims(fresh, proxy, patient_ref, tmp_path, kind, alg):
    client = Client(fresh, tmp_path, kind, proxy.fhir_url, token_url=fresh.token_url)
    ehr = FhirEhr(proxy.fhir_url, auth=client.auth())
    try:
        assert ehr.read_patient(patient_ref)["id"] == patient_ref.split("/")[1]
        ehr.client.auth.invalidate(ehr.client.auth.credentials())  # force a second token
        assert ehr.read_patient(patient_ref) is not None
    finally:
        ehr.close()
    assert token_requests(fresh) == 2 and proxy.refused == 0
    jtis = []
    for assertion in fresh.assertions:
        header = jwt.get_unverified_header(assertion)
        assert header == {"alg": alg, "kid": client.kid, "typ": "JWT"}
        claims = jwt.decode(assertion, client.key.public_key(), algorithms=[alg],
                            audience=fresh.token_url)
        assert claims["iss"] == claims["sub"] == client.client_id
        assert claims["aud"] == fresh.token_url
        assert 0 < claims["exp"] - claims["iat"] <= 300
        assert claims["exp"] > time.time()
        jtis.append(claims["jti"])
    assert len(set(jtis)) == 2  # a fresh jti for each token request


def test_access_token_reaches_the_ehr_and_is_cached(fresh, proxy, patient_ref, tmp_path):
    client = Client(fresh, tmp_path, "rsa", proxy.fhir_url, token_url=fresh.token_url)
    ehr = FhirEhr(proxy.fhir_url, auth=client.auth())
    try:
        for _ in range(15):
            assert ehr.read_patient(patient_ref) is not None
        assert ehr.search_patients(MRN_SYSTEM, "MRN-SB-1")[0]["id"] == patient_ref.split("/")[1]
    finally:
        ehr.close()
    assert token_requests(fresh) == 1
    seen = proxy.requests("/fhir/Patient")
    assert len(seen) == 16 and proxy.refused == 0
    assert len({s.token for s in seen}) == 1 and fresh.was_issued(seen[0].token)


def test_one_token_request_for_many_threads(fresh, proxy, patient_ref, tmp_path):
    client = Client(fresh, tmp_path, "ec", proxy.fhir_url, token_url=fresh.token_url)
    ehr = FhirEhr(proxy.fhir_url, auth=client.auth())
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                assert ehr.read_patient(patient_ref) is not None
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        ehr.close()
    assert errors == []
    assert token_requests(fresh) == 1 and proxy.refused == 0
    assert len(proxy.requests("/fhir/Patient/")) == 30


def test_token_renewed_before_it_expires(fresh, proxy, patient_ref, tmp_path):
    fresh.token_lifetime = 2  # seconds: fhirbridge renews it shortly before (1.6 s)
    client = Client(fresh, tmp_path, "rsa", proxy.fhir_url, token_url=fresh.token_url)
    ehr = FhirEhr(proxy.fhir_url, auth=client.auth())
    try:
        assert ehr.read_patient(patient_ref) is not None
        assert ehr.read_patient(patient_ref) is not None
        time.sleep(1.8)
        assert ehr.read_patient(patient_ref) is not None
    finally:
        ehr.close()
    assert token_requests(fresh) == 2
    assert proxy.refused == 0  # renewed before the EHR saw an expired token
    tokens = [s.token for s in proxy.requests("/fhir/Patient/")]
    assert tokens[0] == tokens[1] != tokens[2]


def test_one_refresh_and_one_retry_on_a_401(fresh, proxy, patient_ref, tmp_path):
    client = Client(fresh, tmp_path, "rsa", proxy.fhir_url, token_url=fresh.token_url)
    ehr = FhirEhr(proxy.fhir_url, auth=client.auth())
    try:
        assert ehr.read_patient(patient_ref) is not None
        proxy.refuse_next = 1  # the EHR revoked the token it had accepted
        assert ehr.read_patient(patient_ref) is not None
        assert token_requests(fresh) == 2
        seen = proxy.requests("/fhir/Patient/")
        assert [s.status for s in seen] == [200, 401, 200]
        assert seen[1].token != seen[2].token

        proxy.reset()
        proxy.refuse_next = 5  # refused again after the refresh: no loop, a plain refusal
        with pytest.raises(EhrRefused) as exc:
            ehr.read_patient(patient_ref)
        assert [s.status for s in proxy.requests("/fhir/Patient/")] == [401, 401]
        assert token_requests(fresh) == 3
        assert "eyJ" not in str(exc.value)
    finally:
        ehr.close()


def test_token_endpoint_discovered_from_smart_configuration(fresh, proxy, patient_ref,
                                                            tmp_path):
    client = Client(fresh, tmp_path, "ec", proxy.fhir_url)  # no token_url
    auth = client.auth()
    ehr = FhirEhr(proxy.fhir_url, auth=auth)
    try:
        assert ehr.read_patient(patient_ref) is not None
        auth.invalidate(auth.credentials())
        assert ehr.read_patient(patient_ref) is not None
    finally:
        ehr.close()
    assert auth.token_endpoint() == fresh.token_url
    assert token_requests(fresh) == 2
    discovery = proxy.requests("/.well-known/smart-configuration")
    assert len(discovery) == 1 and discovery[0].token == ""  # read once, without a token
    for assertion in fresh.assertions:
        assert jwt.decode(assertion, options={"verify_signature": False})["aud"] == \
            fresh.token_url


# --- failures ---------------------------------------------------------------------------------

def test_token_endpoint_refusal_is_a_plain_ehr_refusal(fresh, proxy, patient_ref, tmp_path):
    client = Client(fresh, tmp_path, "rsa", proxy.fhir_url, token_url=fresh.token_url)
    fresh.clients.pop(client.client_id)  # the EHR no longer knows this client
    ehr = FhirEhr(proxy.fhir_url, auth=client.auth())
    try:
        with pytest.raises(EhrRefused) as exc:
            ehr.read_patient(patient_ref)
    finally:
        ehr.close()
    text = str(exc.value)
    assert "HTTP 401" in text and "invalid_client" in text and "[ehr] client_id" in text
    assert fresh.assertions[-1] not in text and "eyJ" not in text
    assert proxy.requests("/fhir/Patient/") == []  # nothing sent to the EHR without a token


def test_token_endpoint_unavailable_is_retryable(fresh, proxy, patient_ref, tmp_path):
    client = Client(fresh, tmp_path, "rsa", proxy.fhir_url, token_url=fresh.token_url)
    ehr = FhirEhr(proxy.fhir_url, auth=client.auth())
    try:
        fresh.fail_token_requests = 1
        with pytest.raises(EhrUnavailable):
            ehr.read_patient(patient_ref)
        assert ehr.read_patient(patient_ref) is not None  # the next attempt works
    finally:
        ehr.close()
    down = Client(fresh, tmp_path, "ec", proxy.fhir_url,
                  token_url=f"http://127.0.0.1:{free_port()}/token")
    ehr = FhirEhr(proxy.fhir_url, auth=down.auth())
    try:
        with pytest.raises(EhrUnavailable):
            ehr.read_patient(patient_ref)
        assert ehr.ping() is False
    finally:
        ehr.close()


def test_no_smart_configuration_names_the_setting(fresh, fhir_server, tmp_path):
    client = Client(fresh, tmp_path, "rsa", fhir_server.base_url)  # the bare server has none
    ehr = FhirEhr(fhir_server.base_url, auth=client.auth())
    try:
        with pytest.raises(EhrRefused) as exc:
            ehr.read_patient("Patient/x")
    finally:
        ehr.close()
    assert "[ehr] token_url" in str(exc.value)


# --- the token stays with the EHR ------------------------------------------------------------

EMPTY_PAGE = b'{"resourceType": "Bundle", "type": "searchset"}'


class Recorder:
    """A loopback HTTP server that records the headers it receives; answers `first` to a
    request for /fhir/Patient and an empty searchset Bundle to anything else."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        self.first = EMPTY_PAGE
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.headers.append({k.lower(): v for k, v in self.headers.items()})
                body = outer.first if self.path.startswith("/fhir/Patient") else EMPTY_PAGE
                self.send_response(200)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_paging_link_outside_the_ehr_base_gets_no_token(fresh, tmp_path):
    """A search Bundle's `next` link pointing elsewhere (same host, other path; another
    port): fhirbridge's credentials are not sent there."""
    ehr_host, outside = Recorder(), Recorder()
    try:
        for next_url in (f"{ehr_host.base}/elsewhere/page2", f"{outside.base}/fhir/page2"):
            ehr_host.first = (b'{"resourceType": "Bundle", "type": "searchset", "link": '
                              b'[{"relation": "next", "url": "' + next_url.encode() + b'"}]}')
            ehr_host.headers.clear()
            outside.headers.clear()
            client = Client(fresh, tmp_path, "rsa", f"{ehr_host.base}/fhir",
                            token_url=fresh.token_url)
            ehr = FhirEhr(f"{ehr_host.base}/fhir", auth=client.auth())
            try:
                assert ehr.search_patients(MRN_SYSTEM, "X") == []
            finally:
                ehr.close()
            first = ehr_host.headers[0]
            assert first["authorization"].startswith("Bearer ")
            assert fresh.was_issued(first["authorization"][7:])
            later = ehr_host.headers[1:] + outside.headers
            assert len(later) == 1 and "authorization" not in later[0]
    finally:
        outside.stop()
        ehr_host.stop()


# --- set-up checks ---------------------------------------------------------------------------

def test_misconfiguration_names_the_key(tmp_path):
    pem = tmp_path / "k.pem"
    pem.write_bytes(private_pem(rsa_key()))
    base = {"fhir_url": "http://127.0.0.1:9/fhir", "auth": "smart-backend", "client_id": "c",
            "private_key_file": str(pem), "key_id": "k1"}
    for missing in ("client_id", "private_key_file", "key_id"):
        with pytest.raises(EhrAuthConfigError, match=rf"\[ehr\] {missing}"):
            build_ehr_auth(EhrSettings(**{**base, missing: ""}))
    p256 = tmp_path / "p256.pem"
    p256.write_bytes(private_pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(EhrAuthConfigError, match=r"\[ehr\] private_key_file.*P-384"):
        build_ehr_auth(EhrSettings(**{**base, "private_key_file": str(p256)}))
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(EhrAuthConfigError, match=r"\[ehr\] private_key_file"):
        build_ehr_auth(EhrSettings(**{**base, "private_key_file": str(tmp_path / "junk.pem")}))
    with pytest.raises(EhrAuthConfigError, match=r"\[ehr\] private_key_file cannot be read"):
        build_ehr_auth(EhrSettings(**{**base, "private_key_file": str(tmp_path / "none")}))
    with pytest.raises(EhrAuthConfigError, match=r"\[ehr\] bearer_token"):
        build_ehr_auth(EhrSettings(fhir_url=base["fhir_url"], auth="bearer"))
    with pytest.raises(EhrAuthConfigError, match=r"\[ehr\] auth = \"bearer\""):
        build_ehr_auth(EhrSettings(fhir_url=base["fhir_url"], bearer_token="t"))
    with pytest.raises(EhrAuthConfigError, match=r"\[ehr\] auth must be"):
        build_ehr_auth(EhrSettings(fhir_url=base["fhir_url"], auth="basic"))
    with pytest.raises(EhrAuthConfigError, match=r"\[ehr\] fhir_url"):
        build_ehr_auth(EhrSettings(**{**base, "fhir_url": ""}))
    assert build_ehr_auth(EhrSettings(fhir_url=base["fhir_url"])) is None
    assert isinstance(build_ehr_auth(EhrSettings(**base)), SmartBackendAuth)
