"""`POST /fhir/Binary` / `GET /fhir/Binary/{id}` on `fhirbridge serve`: raw bytes streamed to
the blob store under their own size limit (media.max_binary_bytes), the Binary JSON form, type
checks by magic bytes (422 mismatch, 415 unaccepted), 413 by Content-Length and mid-stream,
and nothing left behind (no blob, no temporary file) by a refused upload."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.support.service import FhirbridgeService

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
MAX_JSON_BODY = 100_000  # http.max_body_bytes: FHIR JSON
MAX_BINARY = 300_000  # media.max_binary_bytes: raw Binary bodies
ACCEPTED = ("image/jpeg", "image/png", "image/heic", "image/heif", "image/webp",
            "application/pdf", "video/mp4", "video/quicktime")


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirbridgeService]:
    service = FhirbridgeService(tmp_path_factory.mktemp("fb-binary"), env={
        "FHIRBRIDGE_HTTP__MAX_BODY_BYTES": str(MAX_JSON_BODY),
        "FHIRBRIDGE_MEDIA__MAX_BINARY_BYTES": str(MAX_BINARY)})
    yield service.start()
    service.stop()


# --- helpers -----------------------------------------------------------------------------------

def photo() -> bytes:
    return (SAMPLES / "photo.jpg").read_bytes()


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def gif_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("P", (8, 8), 1).save(buf, "GIF")
    return buf.getvalue()


def mp4_like(size: int) -> bytes:
    """An ISO BMFF `ftyp` box (major brand isom) followed by a `free` box of padding."""
    ftyp = (24).to_bytes(4, "big") + b"ftypisom" + (0x200).to_bytes(4, "big") + b"isomavc1"
    pad = size - len(ftyp)
    return ftyp + pad.to_bytes(4, "big") + b"free" + os.urandom(pad - 8)


def blob_files(svc: FhirbridgeService) -> list[str]:
    root = svc.data_dir / "blobs"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) \
        if root.exists() else []


def temp_files(svc: FhirbridgeService) -> list[str]:
    return [f for f in blob_files(svc) if f.rsplit("/", 1)[-1].startswith(".")]


def assert_outcome(r: httpx.Response, status: int, contains: str = "") -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/fhir+json"), r.headers
    oo = r.json()
    assert oo["resourceType"] == "OperationOutcome", oo
    assert contains in oo["issue"][0]["diagnostics"], oo
    return oo


def post_raw(svc: FhirbridgeService, data: bytes | Iterator[bytes], content_type: str,
             client: httpx.Client | None = None) -> httpx.Response:
    return (client or svc.client).post("/fhir/Binary", content=data,
                                       headers={"Content-Type": content_type})


def chunked(data: bytes, size: int = 16_384) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


# --- accepted ----------------------------------------------------------------------------------

def test_raw_jpeg_round_trip(svc: FhirbridgeService):
    data = photo()
    r = post_raw(svc, data, "image/jpeg")
    assert r.status_code == 201, r.text
    binary = r.json()
    assert binary["resourceType"] == "Binary" and binary["contentType"] == "image/jpeg"
    assert "data" not in binary
    assert r.headers["location"] == f"{svc.fhir}/Binary/{binary['id']}"

    got = svc.client.get(f"/fhir/Binary/{binary['id']}")
    assert got.status_code == 200
    assert got.headers["content-type"].startswith("image/jpeg")
    assert got.content == data

    as_fhir = svc.client.get(f"/fhir/Binary/{binary['id']}",
                             headers={"Accept": "application/fhir+json"})
    assert as_fhir.status_code == 200
    assert as_fhir.headers["content-type"].startswith("application/fhir+json")
    resource = as_fhir.json()
    assert resource["id"] == binary["id"] and resource["contentType"] == "image/jpeg"
    assert base64.b64decode(resource["data"]) == data
    assert temp_files(svc) == []


def test_raw_chunked_body_over_the_json_limit(svc: FhirbridgeService):
    """The 100 kB FHIR JSON limit does not apply to raw Binary bodies; theirs is 300 kB."""
    data = mp4_like(250_000)
    assert len(data) > MAX_JSON_BODY
    with httpx.Client(base_url=svc.base, timeout=30) as client:
        r = post_raw(svc, chunked(data), "video/mp4", client)
        assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 201, r.text
    got = svc.client.get(r.headers["location"].removeprefix(svc.base))
    assert got.content == data and got.headers["content-type"].startswith("video/mp4")


def test_binary_json_form(svc: FhirbridgeService):
    data = png_bytes()
    resource = {"resourceType": "Binary", "contentType": "image/png",
                "data": base64.b64encode(data).decode()}
    r = svc.client.post("/fhir/Binary", content=json.dumps(resource),
                        headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 201, r.text
    assert r.json()["contentType"] == "image/png" and "data" not in r.json()
    got = svc.client.get(r.headers["location"].removeprefix(svc.base))
    assert got.content == data and got.headers["content-type"].startswith("image/png")


# --- refused -----------------------------------------------------------------------------------

def test_wrong_content_type_for_the_bytes(svc: FhirbridgeService):
    before = blob_files(svc)
    oo = assert_outcome(post_raw(svc, png_bytes(), "image/jpeg"), 422, "type-mismatch")
    assert "image/png" in oo["issue"][0]["diagnostics"]
    assert_outcome(post_raw(svc, b"just some text, no image at all", "image/jpeg"), 422,
                   "type-mismatch")
    assert blob_files(svc) == before


def test_wrong_content_type_in_binary_json(svc: FhirbridgeService):
    before = blob_files(svc)
    resource = {"resourceType": "Binary", "contentType": "image/jpeg",
                "data": base64.b64encode(png_bytes()).decode()}
    r = svc.client.post("/fhir/Binary", content=json.dumps(resource),
                        headers={"Content-Type": "application/fhir+json"})
    assert_outcome(r, 422, "type-mismatch")
    assert blob_files(svc) == before


def test_unaccepted_type_lists_accepted_types(svc: FhirbridgeService):
    before = blob_files(svc)
    oo = assert_outcome(post_raw(svc, gif_bytes(), "image/gif"), 415, "accepted types: ")
    for t in ACCEPTED:
        assert t in oo["issue"][0]["diagnostics"]
    assert_outcome(post_raw(svc, photo(), "application/octet-stream"), 415, "accepted types")
    resource = {"resourceType": "Binary", "contentType": "image/gif",
                "data": base64.b64encode(gif_bytes()).decode()}
    r = svc.client.post("/fhir/Binary", content=json.dumps(resource),
                        headers={"Content-Type": "application/fhir+json"})
    assert_outcome(r, 415, "accepted types")
    assert blob_files(svc) == before


def test_bad_binary_json(svc: FhirbridgeService):
    before = blob_files(svc)
    for doc in ({"resourceType": "Binary", "contentType": "image/jpeg", "data": "AAAA!!!!"},
                {"resourceType": "Binary", "contentType": "image/jpeg"},
                {"resourceType": "Media", "contentType": "image/jpeg", "data": "AAAA"},
                {"resourceType": "Binary", "contentType": "image/jpeg", "data": "AAAA",
                 "colour": "blue"}):
        r = svc.client.post("/fhir/Binary", content=json.dumps(doc),
                            headers={"Content-Type": "application/fhir+json"})
        assert_outcome(r, 400)
    assert blob_files(svc) == before


def test_binary_json_keeps_the_json_limit(svc: FhirbridgeService):
    """The JSON form is read whole to decode base64: http.max_body_bytes applies to it."""
    data = mp4_like(90_000)  # ~120 kB in base64
    resource = {"resourceType": "Binary", "contentType": "video/mp4",
                "data": base64.b64encode(data).decode()}
    with httpx.Client(base_url=svc.base, timeout=30) as client:
        r = client.post("/fhir/Binary", content=json.dumps(resource),
                        headers={"Content-Type": "application/fhir+json"})
    assert_outcome(r, 413, "http.max_body_bytes")


def test_over_the_limit_by_content_length(svc: FhirbridgeService):
    before = blob_files(svc)
    with httpx.Client(base_url=svc.base, timeout=30) as client:
        r = post_raw(svc, mp4_like(MAX_BINARY + 1), "video/mp4", client)
    assert_outcome(r, 413, "media.max_binary_bytes")

    # refused from the header alone, before the body is sent
    head = (b"POST /fhir/Binary HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: video/mp4\r\n"
            b"Content-Length: 5000000000\r\n\r\n")
    with socket.create_connection(("127.0.0.1", svc.http_port), timeout=15) as s:
        s.sendall(head + mp4_like(4096))
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 413"), received[:200]
    header, _, payload = received.partition(b"\r\n\r\n")
    assert json.loads(payload)["resourceType"] == "OperationOutcome"
    assert blob_files(svc) == before


def test_over_the_limit_chunked(svc: FhirbridgeService):
    before = blob_files(svc)
    data = mp4_like(MAX_BINARY + 100_000)
    with httpx.Client(base_url=svc.base, timeout=30) as client:
        r = post_raw(svc, chunked(data), "video/mp4", client)
        assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_outcome(r, 413, "media.max_binary_bytes")
    assert blob_files(svc) == before  # no blob, no temporary file
    assert temp_files(svc) == []


def test_unknown_binary_is_404(svc: FhirbridgeService):
    assert_outcome(svc.client.get("/fhir/Binary/" + "0" * 32), 404)
    assert_outcome(svc.client.get("/fhir/Binary/../../etc/passwd"), 404)
    assert_outcome(svc.client.get("/fhir/Binary/not-an-id"), 404)


def test_no_500_and_still_accepting(svc: FhirbridgeService):
    assert "unexpected" not in svc.log_text()
    assert post_raw(svc, photo(), "image/jpeg").status_code == 201
    assert temp_files(svc) == []
