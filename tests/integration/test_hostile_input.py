"""Hostile input to `fhirbridge serve`, answered 4xx (or 503/507), never 5xx, never a traceback.

Deep JSON, long Bundles, absurd job ids, slow and idle clients, a request flood, a full disk,
a /readyz flood, settings with a typo; all through the real command on loopback sockets.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from pynetdicom import AE, evt
from sqlalchemy import text

from fhirbridge.store.db import Database
from tests.integration.test_photo_end_to_end import SAMPLES, sample_media, with_photo
from tests.support.service import FHIRBRIDGE, FhirbridgeService, free_port

FHIR_JSON = {"Content-Type": "application/fhir+json"}
TIMEOUT = 2.0  # http.request_timeout_seconds of the `svc` service
MAX_CONCURRENT = 4  # http.max_concurrent_requests of the `svc` service
MRN_SYSTEM = "urn:oid:2.16.840.1.113883.3.7777"


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirbridgeService]:
    """No pipeline workers: every check here happens at intake, before 201."""
    service = FhirbridgeService(tmp_path_factory.mktemp("fb-hostile"), workers=0, env={
        "FHIRBRIDGE_HTTP__REQUEST_TIMEOUT_SECONDS": str(TIMEOUT),
        "FHIRBRIDGE_HTTP__MAX_CONCURRENT_REQUESTS": str(MAX_CONCURRENT)})
    yield service.start()
    service.stop()
    log = service.log_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


# --- helpers ----------------------------------------------------------------------------------

def tiny_jpeg(seed: int) -> bytes:
    im = Image.effect_noise((64, 48), 40 + seed % 50).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def media(photo: bytes, mrn: str = "MRN-HOSTILE-1", content_type: str = "image/jpeg") -> dict:
    m = with_photo(sample_media(), photo, content_type)
    m["subject"] = {"type": "Patient", "identifier": {"system": MRN_SYSTEM, "value": mrn}}
    return m


def bundle(n: int) -> dict[str, Any]:
    mrn = f"MRN-BUNDLE-{uuid.uuid4().hex[:6]}"
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": media(tiny_jpeg(i), mrn),
         "request": {"method": "POST", "url": "Media"}} for i in range(n)]}


def outcome(r: httpx.Response, status: int, code: str, contains: str = "") -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/fhir+json")
    doc = r.json()
    assert doc["resourceType"] == "OperationOutcome"
    issue = doc["issue"][0]
    assert issue["code"] == code, doc
    assert contains in issue["diagnostics"], doc
    assert "Traceback" not in r.text and "/" not in issue["diagnostics"].replace("N/A", "")
    return doc


def task_total(svc: FhirbridgeService) -> int:
    return int(svc.client.get("/fhir/Task").json().get("total", 0))


def blob_count(svc: FhirbridgeService) -> int:
    root = svc.data_dir / "blobs"
    return sum(1 for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def big_png(width: int, height: int, color_type: int, depth: int) -> bytes:
    """A PNG written row by row (never whole in memory): a gradient that deflates to ~1 MB."""
    bands = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row_bytes = width * bands * depth // 8
    row = b"\x00" + (bytes(range(256)) * (row_bytes // 256 + 1))[:row_bytes]
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


# --- JSON depth -------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/fhir/Media", "/fhir/DocumentReference", "/fhir",
                                  "/fhir/Binary"])
def test_json_nested_100000_deep_is_400_and_service_keeps_answering(svc, path):
    before = task_total(svc)
    r = svc.client.post(path, content=b"[" * 100_000, headers=FHIR_JSON)
    outcome(r, 400, "structure", "nested too deeply")
    assert svc.client.get("/healthz").status_code == 200
    assert task_total(svc) == before


def test_json_deeper_than_max_json_depth_is_400_although_python_could_parse_it(svc):
    """70 levels parse fine in Python; the limit (64) is the service's own, not a crash."""
    m = media(tiny_jpeg(1))
    m["note"] = [{"text": "x", "extension": [json.loads("[" * 70 + "]" * 70)]}]
    outcome(svc.client.post("/fhir/Media", json=m, headers=FHIR_JSON), 400, "structure",
            "more than 64 levels")
    # brackets inside strings are text, not nesting: this one is accepted
    ok = media(tiny_jpeg(2))
    ok["content"]["title"] = "[" * 500 + "{" * 500
    assert svc.client.post("/fhir/Media", json=ok, headers=FHIR_JSON).status_code == 201


# --- Bundle entry cap -------------------------------------------------------------------------

def test_bundle_over_max_entries_is_413_and_nothing_is_staged(svc):
    tasks, blobs = task_total(svc), blob_count(svc)
    r = svc.client.post("/fhir", json=bundle(101), headers=FHIR_JSON)
    outcome(r, 413, "too-long", "at most 100")
    assert task_total(svc) == tasks
    assert blob_count(svc) == blobs


def test_bundle_of_exactly_max_entries_is_accepted(svc):
    tasks = task_total(svc)
    r = svc.client.post("/fhir", json=bundle(100), headers=FHIR_JSON)
    assert r.status_code == 200, r.text[:500]
    statuses = [e["response"]["status"] for e in r.json()["entry"]]
    assert statuses == ["201 Created"] * 100
    assert task_total(svc) == tasks + 100


# --- operator routes --------------------------------------------------------------------------

@pytest.mark.parametrize("job_id", ["9223372036854775808", "99999999999999999999999", "0"])
def test_retry_of_an_out_of_range_job_id_is_404(svc, job_id):
    outcome(svc.client.post(f"/admin/jobs/{job_id}/retry"), 404, "not-found")


# --- decode memory ----------------------------------------------------------------------------

def test_16_bit_png_that_would_decode_to_gigabytes_is_refused_at_intake(svc):
    """A ~1 MB 16-bit RGBA PNG of 9000x9900 (under max_pixels) = 680 MiB of samples."""
    png = big_png(9000, 9900, 6, 16)
    assert len(png) < 4 * 1024 * 1024
    tasks = task_total(svc)
    r = svc.client.post("/fhir/Media", json=media(png, content_type="image/png"),
                        headers=FHIR_JSON)
    outcome(r, 422, "invalid", "media.max_decoded_bytes")
    assert task_total(svc) == tasks


def test_a_12_megapixel_jpeg_is_still_accepted(svc):
    im = Image.open(SAMPLES / "photo.jpg").convert("RGB").resize((4032, 3024))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    r = svc.client.post("/fhir/Media", json=media(buf.getvalue()), headers=FHIR_JSON)
    assert r.status_code == 201, r.text[:500]


# --- slow clients and the concurrency cap (raw sockets) ---------------------------------------

def connect(svc: FhirbridgeService) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", svc.http_port), timeout=15)
    return s


def read_all(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def head(path: str = "/fhir/Media", length: int = 1000) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/fhir+json"
            f"\r\nContent-Length: {length}\r\n\r\n").encode()


def test_a_client_trickling_its_body_is_cut_with_408(svc):
    s = connect(svc)
    s.sendall(head())
    started = time.monotonic()
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.3):
            try:
                s.sendall(b" ")
            except OSError:
                return
    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        reply = read_all(s)  # returns when the server closes the connection
    finally:
        stop.set()
        s.close()
    elapsed = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"OperationOutcome" in reply and b"request_timeout_seconds" in reply
    assert TIMEOUT - 0.2 < elapsed < TIMEOUT + 3, elapsed


def test_a_client_trickling_its_headers_is_disconnected(svc):
    s = connect(svc)
    s.sendall(b"POST /fhir/Media HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    started = time.monotonic()
    closed = False
    while time.monotonic() - started < TIMEOUT + 5:
        try:
            s.sendall(b"X-Slow: 1\r\n")
            s.settimeout(0.3)
            if s.recv(1024) == b"":
                closed = True
                break
        except TimeoutError:
            continue
        except OSError:  # reset / broken pipe: closed by the server
            closed = True
            break
    s.close()
    assert closed, "the server kept a connection whose headers never ended"
    assert time.monotonic() - started < TIMEOUT + 3


def test_an_idle_connection_is_closed(svc):
    s = connect(svc)
    started = time.monotonic()
    assert read_all(s) == b""
    assert time.monotonic() - started < TIMEOUT + 3
    s.close()


def test_requests_over_the_concurrency_cap_get_503_with_retry_after(svc):
    slow = [connect(svc) for _ in range(MAX_CONCURRENT)]
    try:
        for s in slow:  # in flight: headers in, the body never comes (until the timeout)
            s.sendall(head())
        time.sleep(0.3)
        r = svc.client.get("/fhir/Task")
        outcome(r, 503, "transient", "busy")
        assert int(r.headers["retry-after"]) >= 1
        assert svc.client.get("/healthz").status_code == 200  # liveness is never capped
    finally:
        for s in slow:
            s.close()
    deadline = time.monotonic() + TIMEOUT + 3
    while svc.client.get("/fhir/Task").status_code != 200:
        assert time.monotonic() < deadline, "the cap did not free its slots"
        time.sleep(0.1)


def test_start_up_logs_one_protections_line_and_no_traceback(svc):
    lines = [ln for ln in svc.log_text().splitlines() if "protections:" in ln]
    assert len(lines) == 1, lines
    assert "auth=off" in lines[0] and "https=off" in lines[0] and "admin_token=not set" in lines[0]


# --- full disk --------------------------------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """data_dir on a 16 MiB tmpfs (root: `mount -t tmpfs`, as the test suite runs here)."""
    mnt = tmp_path / "var"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"this test needs to mount a small tmpfs (run as root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def ready(svc: FhirbridgeService, want: bool, within: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        r = svc.client.get("/readyz")
        if (r.status_code == 200) == want or time.monotonic() > deadline:
            return {**r.json(), "http": r.status_code}
        time.sleep(0.25)


def test_full_disk_is_507_nothing_kept_readyz_false_then_recovers(tiny_disk, tmp_path):
    svc = FhirbridgeService(tmp_path, workers=0)
    assert svc.data_dir == tiny_disk
    svc.start()
    try:
        assert ready(svc, True)["http"] == 200
        tasks = task_total(svc)
        filler = fill(tiny_disk)
        r = svc.post_media(media(tiny_jpeg(7)))
        doc = outcome(r, 507, "transient", "no storage space")
        assert "Retry-After" in r.headers, doc
        assert task_total(svc) == tasks
        down = ready(svc, False)
        assert down["http"] == 503 and down["checks"]["disk"] is False, down
        filler.unlink()
        up = ready(svc, True)
        assert up["http"] == 200 and up["checks"]["disk"] is True, up
        assert svc.post_media(media(tiny_jpeg(8))).status_code == 201
        assert task_total(svc) == tasks + 1
    finally:
        svc.stop()
    log = svc.log_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


# --- /readyz from a cached probe ----------------------------------------------------------------

@pytest.fixture
def echo_scp() -> Iterator[tuple[int, list[float]]]:
    """A DICOM peer (pynetdicom SCP) that counts the C-ECHOs it answers."""
    echoes: list[float] = []
    ae = AE(ae_title="ECHOSCP")
    ae.add_supported_context("1.2.840.10008.1.1")
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[
        (evt.EVT_C_ECHO, lambda event: (echoes.append(time.monotonic()), 0x0000)[1])])
    yield port, echoes
    server.shutdown()


def test_readyz_flood_costs_one_c_echo_per_period(echo_scp, tmp_path):
    port, echoes = echo_scp
    svc = FhirbridgeService(tmp_path, workers=0, pacs_url=f"dicom://ECHOSCP@127.0.0.1:{port}")
    svc.start()
    try:
        started = time.monotonic()
        codes: list[int] = []

        def hammer() -> None:
            with httpx.Client(base_url=svc.base, timeout=30) as c:
                codes.extend(c.get("/readyz").status_code for _ in range(50))
        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        flood = time.monotonic() - started
        assert codes == [200] * 200
        assert 1 <= len(echoes) <= 1 + int(flood // 5) + 1, (len(echoes), flood)
        time.sleep(5.2)  # the cached answer ages out: the next call probes again
        n = len(echoes)
        assert svc.client.get("/readyz").json()["checks"]["pacs"] is True
        assert len(echoes) == n + 1
    finally:
        svc.stop()


# --- settings that fail loudly, through the real command ---------------------------------------

def run_serve(tmp_path: Path, toml: str, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "bad.toml"
    config.write_text(f'data_dir = "{tmp_path / "var"}"\n[http]\nport = {free_port()}\n'
                      f"[mllp]\nport = {free_port()}\n" + toml)
    return subprocess.run([str(FHIRBRIDGE), "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_misspelled_key_in_the_file_stops_serve_naming_it(tmp_path):
    r = run_serve(tmp_path, '[auth]\nisuer = "https://idp.example.org"\n')
    assert r.returncode != 0
    assert "isuer" in r.stderr
    assert "Uvicorn running" not in r.stderr + r.stdout


def test_misspelled_environment_variable_stops_serve_naming_it(tmp_path):
    r = run_serve(tmp_path, "", env={"FHIRBRIDGE_AUTH__ISUER": "https://idp.example.org"})
    assert r.returncode != 0
    assert "isuer" in r.stderr.lower()
    r = run_serve(tmp_path, "", env={"FHIRBRIDGE_HTTPS__PORT": "1"})
    assert r.returncode != 0 and "FHIRBRIDGE_HTTPS__PORT" in r.stderr


# --- SQL bound parameters never in an error --------------------------------------------------

def test_database_errors_do_not_carry_bound_values(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    secret = f"Zaragoza-{uuid.uuid4().hex[:6]}"
    try:
        with pytest.raises(Exception) as info, db.transaction() as s:
            s.execute(text("INSERT INTO no_such_table VALUES (:name)"), {"name": secret})
        assert secret not in str(info.value)
        assert "hidden" in str(info.value)
    finally:
        db.dispose()

