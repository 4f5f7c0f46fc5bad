"""AttachmentFetcher against real HTTP servers on loopback: an EHR, an allow-listed file host
and an "evil" host on other ports. Relative Binary via our store then the EHR (bearer token),
allow-list by scheme+host+port+path prefix after normalisation, redirects re-checked, size and
time limits, retryable versus definite errors, no token or query in error texts. Confused
deputy: EHR content is used only when its Binary.securityContext is the upload's patient."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fhirbridge.adapters.attachments import (
    AttachmentFetcher,
    AttachmentNotPatients,
    AttachmentRefused,
    AttachmentUnavailable,
    LocalBinary,
    normalise_url,
)
from fhirbridge.adapters.blobs import BlobStore
from fhirbridge.adapters.smart_backend import BearerAuth

TOKEN = "s3cr3t-ehr-token"
JPEG = b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF\x00" + bytes(range(256)) * 40 + b"\xff\xd9"
PATIENT = "Patient/p1"  # the upload's patient at the EHR

Route = Callable[[BaseHTTPRequestHandler], None]


class Server:
    """A ThreadingHTTPServer on 127.0.0.1 with routes by path; records each request."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                outer.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                route = outer.routes.get(self.path.split("?", 1)[0])
                if route is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                try:
                    route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *a: None  # type: ignore[method-assign]
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def send(status: int, body: bytes = b"", ctype: str = "application/octet-stream",
         headers: dict[str, str] | None = None, length: bool = True) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        if length:
            h.send_header("Content-Length", str(len(body)))
        else:
            h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(body)
        h.wfile.flush()
        if not length:
            h.close_connection = True
    return route


def binary_json(data: bytes = JPEG, context: str | None = PATIENT,
                ctype: str = "image/jpeg") -> Route:
    """The EHR answering a Binary read as FHIR JSON, with `securityContext` (or none)."""
    doc: dict[str, Any] = {"resourceType": "Binary", "contentType": ctype,
                           "data": base64.b64encode(data).decode()}
    if context is not None:
        doc["securityContext"] = {"reference": context}
    return send(200, json.dumps(doc).encode(), "application/fhir+json")


def auth_for(server: Server, token: str = TOKEN) -> BearerAuth:
    return BearerAuth(f"{server.base}/fhir", token)


def redirect(location: str, status: int = 302) -> Route:
    return send(status, headers={"Location": location})


def sleepy(seconds: float) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
        send(200, JPEG, "image/jpeg")(h)
    return route


def dribble(every: float, count: int) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(JPEG[:16])
        h.wfile.flush()
        for _ in range(count):
            time.sleep(every)
            h.wfile.write(b"\x00" * 16)
            h.wfile.flush()
        h.close_connection = True
    return route


@pytest.fixture(scope="module")
def ehr() -> Iterator[Server]:
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def files() -> Iterator[Server]:
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def evil() -> Iterator[Server]:
    s = Server()
    s.routes["/fhir/Binary/abc"] = send(200, b"EVIL", "image/jpeg")
    s.routes["/files/x.jpg"] = send(200, b"EVIL", "image/jpeg")
    s.routes["/"] = send(200, b"EVIL", "image/jpeg")
    yield s
    s.stop()


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


@pytest.fixture
def local() -> dict[str, LocalBinary]:
    return {}


@pytest.fixture
def fetcher(ehr: Server, files: Server,
            local: dict[str, LocalBinary]) -> Iterator[AttachmentFetcher]:
    ehr.requests.clear()
    files.requests.clear()
    f = AttachmentFetcher(f"{ehr.base}/fhir", auth_for(ehr), [f"{files.base}/files/"], local.get,
                          timeout=0.5, max_bytes=100_000, deadline_seconds=2.0)
    yield f
    f.close()


def stored(blobs: BlobStore, rel: str) -> bytes:
    return blobs.get(rel)


def no_temp_files(blobs: BlobStore) -> bool:
    return not [p for p in blobs.root.rglob(".*") if p.is_file()]


# --- where the bytes come from -------------------------------------------------------------------

def test_relative_binary_from_the_ehr_with_its_token(fetcher, ehr, blobs):
    ehr.routes["/fhir/Binary/abc"] = binary_json(ctype="image/jpeg; charset=binary")
    got = fetcher.fetch_to_blob("Binary/abc", blobs, PATIENT)
    assert stored(blobs, got.blob_path) == JPEG
    assert got.sha256 == hashlib.sha256(JPEG).hexdigest() and got.size == len(JPEG)
    assert got.content_type == "image/jpeg"
    path, headers = ehr.requests[-1]
    assert path == "/fhir/Binary/abc"
    assert headers["authorization"] == f"Bearer {TOKEN}"
    assert headers["accept"] == "application/fhir+json"  # securityContext comes with the data
    assert headers["accept-encoding"] == "identity"


def test_relative_binary_held_here_first(fetcher, ehr, blobs, local):
    rel, digest = blobs.put(JPEG)
    local["ours1"] = LocalBinary(rel, "image/jpeg", digest, len(JPEG))
    got = fetcher.fetch_to_blob("Binary/ours1", blobs)
    assert got == (rel, digest, len(JPEG), "image/jpeg")
    assert ehr.requests == []  # never asked the EHR


def test_relative_binary_resolver_may_answer_a_path(ehr, files, blobs):
    rel, digest = blobs.put(JPEG)
    f = AttachmentFetcher(f"{ehr.base}/fhir", auth_for(ehr), [], {"p": rel}.get)
    try:
        assert f.fetch_to_blob("Binary/p", blobs) == (rel, digest, len(JPEG), "")
    finally:
        f.close()


def test_allowed_host_answering_binary_json(fetcher, files, blobs):
    files.routes["/files/b.json"] = binary_json(context=None)  # not the EHR: no check needed
    got = fetcher.fetch_to_blob(f"{files.base}/files/b.json", blobs)
    assert stored(blobs, got.blob_path) == JPEG and got.content_type == "image/jpeg"


def test_allowed_absolute_url_without_the_ehr_token(fetcher, files, blobs):
    files.routes["/files/x.jpg"] = send(200, JPEG, "image/jpeg")
    got = fetcher.fetch_to_blob(f"{files.base}/files/x.jpg?sig=abc", blobs)
    assert stored(blobs, got.blob_path) == JPEG
    path, headers = files.requests[-1]
    assert path == "/files/x.jpg?sig=abc"
    assert "authorization" not in headers


def test_absolute_url_under_the_ehr_base_is_allowed(fetcher, ehr, blobs):
    ehr.routes["/fhir/Binary/abs"] = binary_json()
    got = fetcher.fetch_to_blob(f"{ehr.base.upper().replace('HTTP', 'http')}/fhir/./Binary/abs",
                                blobs, PATIENT)
    assert stored(blobs, got.blob_path) == JPEG
    assert ehr.requests[-1][1]["authorization"] == f"Bearer {TOKEN}"


# --- the allow-list ------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda e, f, x: f"{x.base}/files/x.jpg",                                # another port
    lambda e, f, x: f"{x.base}/fhir/Binary/abc",                            # same path, other port
    lambda e, f, x: f"http://127.0.0.1:{e.port}@127.0.0.1:{x.port}/",       # userinfo trick
    lambda e, f, x: f"http://ehr@127.0.0.1:{x.port}/",                      # userinfo trick
    lambda e, f, x: f"{f.base}/files/../fhir/Binary/abc",                   # dot segments out
    lambda e, f, x: f"{f.base}/files/%2e%2e/secret",                        # encoded dots
    lambda e, f, x: f"{f.base}/files/..%2Fsecret",                          # encoded slash
    lambda e, f, x: f"{f.base}/filesevil/x.jpg",                            # not a segment
    lambda e, f, x: f"{e.base}/fhirx/Binary/abc",                           # not a segment
    lambda e, f, x: f"https://127.0.0.1:{f.port}/files/x.jpg",              # other scheme
    lambda e, f, x: f"{f.base}\\@127.0.0.1:{x.port}/files/x.jpg",           # backslash
    lambda e, f, x: "file:///etc/passwd",
    lambda e, f, x: "Patient/123",                                          # not Binary/{id}
    lambda e, f, x: f"{f.base}/files/x.jpg\r\nX-Injected: 1",
])
def test_off_list_urls_are_refused(fetcher, ehr, files, evil, blobs, make):
    evil.requests.clear()
    url = make(ehr, files, evil)
    assert not fetcher.is_allowed(url) or url.startswith("Patient")
    with pytest.raises(AttachmentRefused) as exc:
        fetcher.fetch_to_blob(url, blobs, PATIENT)
    assert exc.value.code in ("not-allowed", "bad-url")
    assert evil.requests == []
    assert not [p for p, _ in files.requests if "secret" in p or "fhir" in p]


@pytest.mark.parametrize("url", ["Binary/..", "Binary/.", "Binary/a/b", "Binary/",
                                 "Binary/abc?x=1", "/Binary/abc"])
def test_relative_urls_other_than_binary_ids_are_refused(fetcher, ehr, blobs, url):
    with pytest.raises(AttachmentRefused) as exc:
        fetcher.fetch_to_blob(url, blobs)
    assert exc.value.code == "bad-url"
    assert ehr.requests == []


def test_relative_binary_without_an_ehr(blobs):
    rel, _ = blobs.put(JPEG)
    f = AttachmentFetcher("", None, [], {"held": rel}.get)
    try:
        assert f.is_allowed("Binary/held") and not f.is_allowed("Binary/other")
        assert f.fetch_to_blob("Binary/held", blobs).blob_path == rel
        with pytest.raises(AttachmentRefused) as exc:
            f.fetch_to_blob("Binary/other", blobs)
        assert exc.value.code == "not-found"
    finally:
        f.close()


def test_normalisation():
    u = normalise_url("HTTP://EHR.Example.ORG.:80/a/./b/../%7Euser/%41x?q=1")
    assert (u.scheme, u.host, u.port, u.path, u.query) == ("http", "ehr.example.org", 80,
                                                           "/a/~user/Ax", "q=1")
    assert u.text == "http://ehr.example.org/a/~user/Ax?q=1"
    assert normalise_url("https://[::1]:8443/x").text == "https://[::1]:8443/x"


def test_allow_list_entries_must_be_urls(ehr):
    with pytest.raises(ValueError):
        AttachmentFetcher(f"{ehr.base}/fhir", auth_for(ehr), ["storage.example.org/files"],
                          lambda _id: None)


# --- redirects -----------------------------------------------------------------------------------

def test_redirect_to_an_off_list_host_is_refused(fetcher, ehr, evil, blobs):
    evil.requests.clear()
    ehr.routes["/fhir/Binary/r1"] = redirect(f"{evil.base}/files/x.jpg")
    with pytest.raises(AttachmentRefused) as exc:
        fetcher.fetch_to_blob("Binary/r1", blobs, PATIENT)
    assert exc.value.code == "not-allowed"
    assert evil.requests == []


def test_redirect_within_the_list_is_followed_without_the_token(fetcher, files, blobs):
    files.routes["/files/y.jpg"] = send(200, JPEG, "image/jpeg")
    files.routes["/files/go"] = redirect(f"{files.base}/files/y.jpg?X-Sig=zz", 307)
    got = fetcher.fetch_to_blob(f"{files.base}/files/go", blobs)
    assert stored(blobs, got.blob_path) == JPEG
    assert files.requests[-1][0] == "/files/y.jpg?X-Sig=zz"
    assert all("authorization" not in h for _, h in files.requests)


def test_ehr_redirect_elsewhere_is_not_followed(fetcher, ehr, files, blobs):
    """Where the EHR sends fhirbridge (a signed URL, say) was granted to its credentials: the
    content behind it cannot be checked as the patient's, and the token never goes there."""
    files.routes["/files/y.jpg"] = send(200, JPEG, "image/jpeg")
    ehr.routes["/fhir/Binary/r2"] = redirect(f"{files.base}/files/y.jpg?X-Sig=zz", 307)
    with pytest.raises(AttachmentNotPatients) as exc:
        fetcher.fetch_to_blob("Binary/r2", blobs, PATIENT)
    assert exc.value.code == "not-patients"
    assert files.requests == []
    assert ehr.requests[-1][1]["authorization"] == f"Bearer {TOKEN}"


def test_relative_redirect_is_rechecked(fetcher, ehr, blobs):
    ehr.routes["/fhir/Binary/r3"] = redirect("../../admin/secret")
    with pytest.raises(AttachmentRefused) as exc:
        fetcher.fetch_to_blob("Binary/r3", blobs, PATIENT)
    assert exc.value.code == "not-allowed"
    assert "/admin/secret" not in ehr.paths()


def test_redirect_loop_stops(fetcher, ehr, blobs):
    ehr.routes["/fhir/Binary/loop"] = redirect("/fhir/Binary/loop")
    with pytest.raises(AttachmentRefused) as exc:
        fetcher.fetch_to_blob("Binary/loop", blobs, PATIENT)
    assert exc.value.code == "too-many-redirects"
    assert ehr.paths().count("/fhir/Binary/loop") == 4  # the first request and three redirects


# --- size and time -------------------------------------------------------------------------------

def test_too_large_by_content_length(fetcher, files, blobs):
    files.routes["/files/big"] = send(200, b"\xff\xd8\xff" + b"\x00" * 200_000, "image/jpeg")
    with pytest.raises(AttachmentRefused) as exc:
        fetcher.fetch_to_blob(f"{files.base}/files/big", blobs)
    assert exc.value.code == "too-large"
    assert list(blobs.root.rglob("*")) == []


def test_too_large_while_streaming(fetcher, files, blobs):
    files.routes["/files/big2"] = send(200, b"\xff\xd8\xff" + b"\x00" * 200_000,
                                       "image/jpeg", length=False)
    with pytest.raises(AttachmentRefused) as exc:
        fetcher.fetch_to_blob(f"{files.base}/files/big2", blobs)
    assert exc.value.code == "too-large"
    assert [p for p in blobs.root.rglob("*") if p.is_file()] == []  # temporary file removed


def test_slow_server_times_out_retryably(fetcher, ehr, blobs):
    ehr.routes["/fhir/Binary/slow"] = sleepy(2.0)
    t0 = time.monotonic()
    with pytest.raises(AttachmentUnavailable):
        fetcher.fetch_to_blob("Binary/slow", blobs, PATIENT)
    assert time.monotonic() - t0 < 1.5


def test_dribbling_body_hits_the_deadline(fetcher, files, blobs):
    files.routes["/files/drip"] = dribble(0.3, 30)  # each read in time, 9 s in all
    t0 = time.monotonic()
    with pytest.raises(AttachmentUnavailable):
        fetcher.fetch_to_blob(f"{files.base}/files/drip", blobs)
    assert time.monotonic() - t0 < 3.5
    assert no_temp_files(blobs)


def test_connection_refused_is_retryable(ehr, blobs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    f = AttachmentFetcher(f"http://127.0.0.1:{port}/fhir",
                          BearerAuth(f"http://127.0.0.1:{port}/fhir", TOKEN), [],
                          lambda _id: None, timeout=0.5)
    try:
        with pytest.raises(AttachmentUnavailable):
            f.fetch_to_blob("Binary/abc", blobs, PATIENT)
    finally:
        f.close()


# --- HTTP errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("status,kind,code", [
    (500, AttachmentUnavailable, None), (503, AttachmentUnavailable, None),
    (429, AttachmentUnavailable, None), (404, AttachmentRefused, "not-found"),
    (410, AttachmentRefused, "not-found"), (403, AttachmentRefused, "http-error"),
    (401, AttachmentRefused, "http-error"),
])
def test_http_status(fetcher, files, blobs, status, kind, code):
    files.routes[f"/files/s{status}"] = send(status, b"patient Jane Doe", "text/plain")
    url = f"{files.base}/files/s{status}?patient=Jane-Doe&token=QQQ"
    with pytest.raises(kind) as exc:
        fetcher.fetch_to_blob(url, blobs)
    if code:
        assert exc.value.code == code  # type: ignore[union-attr]
    text = str(exc.value)
    for secret in ("Jane", "QQQ", TOKEN, "patient="):
        assert secret not in text


def test_error_texts_name_no_url_or_token(fetcher, ehr, evil, blobs):
    ehr.routes["/fhir/Binary/r9"] = redirect(f"{evil.base}/files/x.jpg?mrn=MRN123")
    with pytest.raises(AttachmentRefused) as exc:
        fetcher.fetch_to_blob("Binary/r9", blobs, PATIENT)
    for secret in ("MRN123", str(evil.port), TOKEN):
        assert secret not in str(exc.value)


# --- confused deputy: EHR content only when it is the upload's patient's ---------------------

def no_blobs(blobs: BlobStore) -> bool:
    return not blobs.root.exists() or [p for p in blobs.root.rglob("*") if p.is_file()] == []


def doc_ref(rid: str, subject: str, element: str = "subject") -> Route:
    return send(200, json.dumps({"resourceType": "DocumentReference", "id": rid,
                                 "status": "current", element: {"reference": subject}}).encode(),
                "application/fhir+json")


@pytest.mark.parametrize("context", ["Patient/p2", None, "#contained", "Group/g1",
                                     "http://elsewhere.example/fhir/Patient/p1"])
def test_ehr_binary_of_another_or_no_patient_is_not_used(fetcher, ehr, blobs, context):
    ehr.routes["/fhir/Binary/cd1"] = binary_json(context=context)
    ehr.routes["/fhir/Group/g1"] = send(200, b'{"resourceType": "Group", "id": "g1"}',
                                        "application/fhir+json")
    with pytest.raises(AttachmentNotPatients) as exc:
        fetcher.fetch_to_blob("Binary/cd1", blobs, PATIENT)
    assert exc.value.code == "not-patients"
    assert "p2" not in exc.value.text and "p1" not in exc.value.text
    assert no_blobs(blobs)  # the bytes were not kept


@pytest.mark.parametrize("context", [PATIENT, "Patient/p1/_history/3", "{ehr}/fhir/Patient/p1"])
def test_ehr_binary_of_the_patient_is_used(fetcher, ehr, blobs, context):
    ehr.routes["/fhir/Binary/cd2"] = binary_json(context=context.format(ehr=ehr.base))
    got = fetcher.fetch_to_blob("Binary/cd2", blobs, PATIENT)
    assert stored(blobs, got.blob_path) == JPEG


@pytest.mark.parametrize("owner,element,ok", [
    ("Patient/p1", "subject", True), ("Patient/p1", "patient", True),
    ("Patient/p2", "subject", False), ("Group/g1", "subject", False)])
def test_security_context_through_the_owning_resource(fetcher, ehr, blobs, owner, element, ok):
    ehr.routes["/fhir/DocumentReference/d1"] = doc_ref("d1", owner, element)
    ehr.routes["/fhir/Binary/cd3"] = binary_json(context="DocumentReference/d1")
    if ok:
        assert stored(blobs, fetcher.fetch_to_blob("Binary/cd3", blobs, PATIENT).blob_path) == JPEG
    else:
        with pytest.raises(AttachmentNotPatients):
            fetcher.fetch_to_blob("Binary/cd3", blobs, PATIENT)
        assert no_blobs(blobs)
    owner_read = [h for p, h in ehr.requests if p == "/fhir/DocumentReference/d1"]
    assert owner_read and owner_read[-1]["authorization"] == f"Bearer {TOKEN}"


def test_owning_resource_missing_or_another(fetcher, ehr, blobs):
    ehr.routes["/fhir/Binary/cd4"] = binary_json(context="DocumentReference/gone")
    with pytest.raises(AttachmentNotPatients):
        fetcher.fetch_to_blob("Binary/cd4", blobs, PATIENT)
    ehr.routes["/fhir/DocumentReference/d4"] = send(403, b"{}", "application/fhir+json")
    ehr.routes["/fhir/Binary/cd4"] = binary_json(context="DocumentReference/d4")  # not our scope
    with pytest.raises(AttachmentNotPatients):
        fetcher.fetch_to_blob("Binary/cd4", blobs, PATIENT)
    ehr.routes["/fhir/DocumentReference/d5"] = doc_ref("other-id", PATIENT)  # not what was asked
    ehr.routes["/fhir/Binary/cd5"] = binary_json(context="DocumentReference/d5")
    with pytest.raises(AttachmentNotPatients):
        fetcher.fetch_to_blob("Binary/cd5", blobs, PATIENT)
    assert no_blobs(blobs)


def test_patient_not_known_at_the_ehr_asks_the_ehr_nothing(fetcher, ehr, blobs):
    ehr.routes["/fhir/Binary/cd6"] = binary_json()
    for patient in (None, "index:HOSP|MRN-1", ""):
        with pytest.raises(AttachmentNotPatients) as exc:
            fetcher.fetch_to_blob("Binary/cd6", blobs, patient)
        assert "not known at the EHR" in exc.value.text
    assert ehr.requests == []


def test_ehr_answering_raw_bytes_cannot_be_checked(fetcher, ehr, blobs):
    ehr.routes["/fhir/Binary/raw"] = send(200, JPEG, "image/jpeg")
    with pytest.raises(AttachmentNotPatients):
        fetcher.fetch_to_blob("Binary/raw", blobs, PATIENT)
    assert no_blobs(blobs)


def test_ehr_address_other_than_a_binary_is_not_fetched(fetcher, ehr, blobs):
    ehr.routes["/fhir/files/x.jpg"] = send(200, JPEG, "image/jpeg")
    for url in (f"{ehr.base}/fhir/files/x.jpg", f"{ehr.base}/fhir/Binary/abc?_format=json",
                f"{ehr.base}/fhir/Patient/p1"):
        with pytest.raises(AttachmentNotPatients):
            fetcher.fetch_to_blob(url, blobs, PATIENT)
    assert ehr.requests == []


def test_allowed_host_redirecting_into_the_ehr_is_checked_there(fetcher, ehr, files, blobs):
    """A file host's redirect into the EHR: the EHR hop carries the token and is checked;
    the file host never sees the token."""
    files.routes["/files/to-ehr"] = redirect(f"{ehr.base}/fhir/Binary/cd7")
    ehr.routes["/fhir/Binary/cd7"] = binary_json(context="Patient/p2")
    with pytest.raises(AttachmentNotPatients):
        fetcher.fetch_to_blob(f"{files.base}/files/to-ehr", blobs, PATIENT)
    ehr.routes["/fhir/Binary/cd7"] = binary_json()
    got = fetcher.fetch_to_blob(f"{files.base}/files/to-ehr", blobs, PATIENT)
    assert stored(blobs, got.blob_path) == JPEG
    assert all("authorization" not in h for _, h in files.requests)
    assert ehr.requests[-1][1]["authorization"] == f"Bearer {TOKEN}"


def test_ehr_redirect_to_another_ehr_binary_is_checked_again(fetcher, ehr, blobs):
    ehr.routes["/fhir/Binary/hop1"] = redirect("/fhir/Binary/hop2")
    ehr.routes["/fhir/Binary/hop2"] = binary_json(context="Patient/p2")
    with pytest.raises(AttachmentNotPatients):
        fetcher.fetch_to_blob("Binary/hop1", blobs, PATIENT)
    ehr.routes["/fhir/Binary/hop2"] = binary_json()
    assert stored(blobs, fetcher.fetch_to_blob("Binary/hop1", blobs, PATIENT).blob_path) == JPEG

