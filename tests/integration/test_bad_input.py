"""Bad uploads to `fhirbridge serve`: every one is answered 4xx with a FHIR OperationOutcome,
never 500; nothing is stored (no blob, no Task); no PHI from the request is echoed back.
After all of them a good upload still gets 201."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import socket
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from fhirbridge.media.jpeg import read_sof
from tests.integration.test_photo_end_to_end import SAMPLES, sample_media, unique_photo, with_photo
from tests.support.service import FhirbridgeService

MAX_BODY = 100_000
MRN = f"MRN-BAD-{uuid.uuid4().hex[:8]}"
FAMILY = f"Zaragoza{uuid.uuid4().hex[:6]}"
GIVEN = f"Anselmo{uuid.uuid4().hex[:6]}"
PHI = (MRN, FAMILY, GIVEN)


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirbridgeService]:
    service = FhirbridgeService(tmp_path_factory.mktemp("fb-bad-input"),
                                env={"FHIRBRIDGE_HTTP__MAX_BODY_BYTES": str(MAX_BODY)})
    yield service.start()
    service.stop()


# --- request builders ------------------------------------------------------------------------

def photo() -> bytes:
    return (SAMPLES / "photo.jpg").read_bytes()


def media(data: bytes | None = None, content_type: str = "image/jpeg") -> dict[str, Any]:
    """The sample Media with our PHI markers as subject identifier and contained name."""
    m = with_photo(sample_media(), photo() if data is None else data, content_type)
    m["subject"] = {"type": "Patient",
                    "identifier": {"system": "urn:oid:2.16.840.1.113883.3.7777", "value": MRN}}
    m["contained"][0]["name"] = [{"family": FAMILY, "given": [GIVEN]}]
    return m


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def huge_header_jpeg(height: int = 50_000, width: int = 50_000) -> bytes:
    """A small valid JPEG whose SOF0 claims height x width."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (30, 200, 30)).save(buf, "JPEG")
    jpeg = bytearray(buf.getvalue())
    i = 2
    while i < len(jpeg):
        assert jpeg[i] == 0xFF
        marker = jpeg[i + 1]
        length = int.from_bytes(jpeg[i + 2:i + 4], "big")
        if marker == 0xC0:
            jpeg[i + 5:i + 7] = height.to_bytes(2, "big")
            jpeg[i + 7:i + 9] = width.to_bytes(2, "big")
            return bytes(jpeg)
        i += 2 + length
    raise AssertionError("no SOF0 in the Pillow JPEG")


def set_data(text: Callable[[str], str]) -> dict[str, Any]:
    m = media()
    m["content"]["data"] = text(m["content"]["data"])
    return m


def edit(fn: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    m = media()
    fn(m)
    return m


def body(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def _b64url(text: str) -> str:
    assert "+" in text or "/" in text  # the sample has both; otherwise the case tests nothing
    return text.replace("+", "-").replace("/", "_")


# name -> (raw request body, expected status or None for "any 4xx", text the diagnostics must
# contain)
CASES: dict[str, tuple[bytes, int | None, str]] = {
    "png-declared-jpeg": (body(media(png_bytes())), 415, "image/jpeg"),
    "corrupt-base64": (body(set_data(lambda _: "AAAA!!!!AAAA")), 400, "base64"),
    "base64url-alphabet": (body(set_data(_b64url)), 400, "base64"),
    "data-uri-prefix": (body(set_data(lambda t: "data:image/jpeg;base64," + t)), 400, "base64"),
    "truncated-jpeg": (body(media(photo()[:len(photo()) // 2])), 422, "truncated"),
    "missing-subject": (body(edit(lambda m: m.pop("subject"))), 422, "subject"),
    "contained-subject-only": (body(edit(lambda m: m.__setitem__(
        "subject", {"reference": "#self"}))), 422, "subject"),
    "unknown-element": (body(edit(lambda m: m.__setitem__("favouriteColour", "blue"))), 400,
                        "favouriteColour"),
    "wrong-json-type-status": (body(edit(lambda m: m.__setitem__("status", 7))), 400, "status"),
    "wrong-json-type-size": (body(edit(lambda m: m["content"].__setitem__("size", "big"))), 400,
                             "size"),
    "wrong-json-type-content": (body(edit(lambda m: m.__setitem__("content", [1]))), 400, ""),
    "wrong-json-type-data": (body(edit(lambda m: m["content"].__setitem__("data", 12345))),
                             400, ""),
    "not-json": (b"this is not JSON {", 400, "JSON"),
    "json-array": (b"[1, 2, 3]", 400, "Media"),
    "not-utf8": (b"\xff\xfe\x00garbage", 400, ""),
    "patient-to-media": (body({"resourceType": "Patient",
                               "identifier": [{"system": "urn:x", "value": MRN}],
                               "name": [{"family": FAMILY, "given": [GIVEN]}]}), 400, "Media"),
    "size-mismatch": (body(edit(lambda m: m["content"].__setitem__(
        "size", m["content"]["size"] + 1))), 422, "size"),
    "hash-mismatch": (body(edit(lambda m: m["content"].__setitem__(
        "hash", base64.b64encode(hashlib.sha1(b"other").digest()).decode()))), 422, "hash"),
    "unsupported-zip": (body(media(b"PK\x03\x04" + b"\x00" * 64, "application/zip")), 415,
                        "image/jpeg"),
    "too-many-pixels": (body(media(huge_header_jpeg())), 422, "too-many-pixels"),
    "entered-in-error": (body(edit(lambda m: m.__setitem__("status", "entered-in-error"))), 422,
                         ""),
}


# --- checks ------------------------------------------------------------------------------------

def assert_outcome(r: httpx.Response, status: int | None, contains: str = "") -> dict[str, Any]:
    assert r.status_code != 500, r.text
    if status is None:
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
    else:
        assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/fhir+json"), r.headers
    oo = r.json()
    assert oo["resourceType"] == "OperationOutcome", oo
    diagnostics = oo["issue"][0]["diagnostics"]
    assert diagnostics
    assert contains in diagnostics, oo
    assert_no_phi(r.text)
    return oo


def assert_no_phi(text: str) -> None:
    for value in PHI:
        assert value not in text, f"response echoes PHI {value!r}: {text[:500]}"
        assert json.dumps(value)[1:-1] not in text


def blob_files(svc: FhirbridgeService) -> list[str]:
    root = svc.data_dir / "blobs"
    return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def assert_nothing_stored(svc: FhirbridgeService) -> None:
    bundle = svc.client.get("/fhir/Task").json()
    assert bundle["total"] == 0, bundle
    assert blob_files(svc) == []


# --- the cases ---------------------------------------------------------------------------------

def test_body_builders_are_what_they_claim():
    assert huge_header_jpeg()[:2] == b"\xff\xd8"
    frame = read_sof(huge_header_jpeg())
    assert (frame.rows, frame.columns) == (50_000, 50_000)
    assert len(CASES["truncated-jpeg"][0]) < MAX_BODY
    assert len(body(media())) < MAX_BODY  # the good upload fits under the small limit


@pytest.mark.parametrize("case", list(CASES))
def test_bad_media_is_refused(svc: FhirbridgeService, case: str):
    raw, status, contains = CASES[case]
    r = svc.client.post("/fhir/Media", content=raw,
                        headers={"Content-Type": "application/fhir+json"})
    assert_outcome(r, status, contains)
    assert_nothing_stored(svc)


def test_unsupported_type_lists_accepted_types(svc: FhirbridgeService):
    raw = CASES["unsupported-zip"][0]
    r = svc.client.post("/fhir/Media", content=raw,
                        headers={"Content-Type": "application/fhir+json"})
    oo = assert_outcome(r, 415)
    assert "accepted types: image/jpeg" in oo["issue"][0]["diagnostics"]


def test_non_fhir_request_content_type(svc: FhirbridgeService):
    r = svc.client.post("/fhir/Media", content=body(media()),
                        headers={"Content-Type": "text/plain"})
    assert_outcome(r, 415)
    assert_nothing_stored(svc)


def test_oversized_body_with_content_length(svc: FhirbridgeService):
    raw = body(media(unique_photo() + b"\x00" * 200_000))  # > 200 kB JSON
    assert len(raw) > 2 * MAX_BODY
    r = svc.client.post("/fhir/Media", content=raw,
                        headers={"Content-Type": "application/fhir+json"})
    assert_outcome(r, 413)
    assert_nothing_stored(svc)


def test_oversized_chunked_body(svc: FhirbridgeService):
    raw = body(media(unique_photo() + b"\x00" * 200_000))

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(raw), 16_384):
            yield raw[i:i + 16_384]

    # a fresh client: the server closes the connection after refusing
    with httpx.Client(base_url=svc.base, timeout=30) as client:
        r = client.post("/fhir/Media", content=chunks(),
                        headers={"Content-Type": "application/fhir+json"})
        assert "content-length" not in {k.lower() for k in r.request.headers}
        assert r.request.headers.get("transfer-encoding") == "chunked"
    assert_outcome(r, 413)
    assert_nothing_stored(svc)


def raw_http(svc: FhirbridgeService, head: bytes, payload: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (headers that lie included); return (status, response bytes)."""
    with socket.create_connection(("127.0.0.1", svc.http_port), timeout=15) as s:
        s.sendall(head + payload)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = s.recv(65536)
            if not chunk:
                break
            received += chunk
        header, _, rest = received.partition(b"\r\n\r\n")
        length = 0
        for line in header.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
    status = int(header.split(b" ", 2)[1])
    return status, rest[:length]


def test_content_length_overstated(svc: FhirbridgeService):
    """A Content-Length over the limit is refused from the header, before the body arrives."""
    head = (b"POST /fhir/Media HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/fhir+json\r\nContent-Length: 1000000000\r\n\r\n")
    status, payload = raw_http(svc, head, b'{"resourceType": "Media"')
    assert status == 413, payload
    oo = json.loads(payload)
    assert oo["resourceType"] == "OperationOutcome" and oo["issue"][0]["diagnostics"]
    assert_nothing_stored(svc)


def test_content_length_understated(svc: FhirbridgeService):
    """A Content-Length far smaller than what follows: the server reads only what was declared
    (not JSON: 400) and the trailing bytes are no valid request; never 500, nothing stored."""
    raw = body(media(unique_photo() + b"\x00" * 200_000))
    head = (b"POST /fhir/Media HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/fhir+json\r\nContent-Length: 100\r\n\r\n")
    try:
        status, payload = raw_http(svc, head, raw)
    except (ConnectionResetError, BrokenPipeError):
        status, payload = 400, b""  # refused and closed while we were still sending
    assert 400 <= status < 500, payload
    if payload:
        assert json.loads(payload)["resourceType"] == "OperationOutcome"
    assert_nothing_stored(svc)


def test_unknown_task_is_404_outcome(svc: FhirbridgeService):
    r = svc.client.get("/fhir/Task/nonexistent")
    oo = assert_outcome(r, 404)
    assert oo["issue"][0]["code"] == "not-found"
    r = svc.client.get("/fhir/Media/nonexistent")
    assert_outcome(r, 404)


def test_no_500_logged_and_service_still_accepts_a_good_upload(svc: FhirbridgeService):
    assert "unexpected" not in svc.log_text()
    assert svc.client.get("/healthz").status_code == 200
    good = media(unique_photo())
    r = svc.client.post("/fhir/Media", content=body(good),
                        headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 201, r.text
    media_id = r.json()["id"]
    task = svc.task_for(f"Media/{media_id}")
    assert task["focus"]["reference"] == f"Media/{media_id}"
    assert svc.client.get("/fhir/Task").json()["total"] == 1
    assert len(blob_files(svc)) == 1
