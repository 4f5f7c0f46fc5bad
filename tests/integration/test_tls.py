"""TLS and credentials on every wire of `fhirbridge serve`, against real peers: HTTPS with a
test-CA certificate, DICOM TLS into an Orthanc that takes TLS only (client certificate
required), and STOW-RS into an Orthanc that requires HTTP basic authentication."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fhirbridge.adapters.pacs import PacsError, open_pacs
from tests.integration.test_photo_end_to_end import media_for, unique_photo
from tests.support.servers import OrthancServer
from tests.support.service import FhirbridgeService
from tests.support.tls import TestCA

ORTHANC_PASSWORD = "orthanc-secret-7f3a"  # must never appear in fhirbridge's log


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("tls-ca"))


def tls_options(ca: TestCA) -> dict[str, Any]:
    return {"tls_ca_file": str(ca.ca_file), "tls_cert_file": str(ca.client.cert),
            "tls_key_file": str(ca.client.key)}


def upload(svc: FhirbridgeService, patient: dict[str, Any]) -> str:
    r = svc.post_media(media_for(patient, unique_photo()))
    assert r.status_code == 201, r.text
    return f"Media/{r.json()['id']}"


# -- HTTPS ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def https_service(tmp_path_factory: pytest.TempPathFactory, ca: TestCA
                  ) -> Iterator[FhirbridgeService]:
    # [http] is written by FhirbridgeService; the TLS files come as FHIRBRIDGE_ variables
    svc = FhirbridgeService(tmp_path_factory.mktemp("fb-https"), workers=0, env={
        "FHIRBRIDGE_HTTP__TLS_CERT_FILE": str(ca.server.cert),
        "FHIRBRIDGE_HTTP__TLS_KEY_FILE": str(ca.server.key)})
    svc.base = f"https://127.0.0.1:{svc.http_port}"
    svc.fhir = f"{svc.base}/fhir"
    svc.client.close()
    svc.client = httpx.Client(base_url=svc.base, timeout=30, verify=ca.client_context())
    yield svc.start()
    svc.stop()


def test_https_answers_metadata_verified_against_the_test_ca(
        https_service: FhirbridgeService) -> None:
    r = https_service.client.get("/fhir/metadata")
    assert r.status_code == 200
    assert r.json()["resourceType"] == "CapabilityStatement"
    assert r.extensions["network_stream"].get_extra_info("ssl_object").version() in (
        "TLSv1.2", "TLSv1.3")
    log = https_service.log_text()
    assert "HTTP listening on 127.0.0.1:%d, TLS on" % https_service.http_port in log
    assert "MLLP listening on" in log and "TLS off" in log


def test_plain_http_to_the_https_port_gets_no_fhir_answer(
        https_service: FhirbridgeService) -> None:
    try:
        r = httpx.get(f"http://127.0.0.1:{https_service.http_port}/fhir/metadata", timeout=10)
    except httpx.HTTPError:
        return  # the connection was closed: nothing answered in clear
    assert "CapabilityStatement" not in r.text


def test_a_client_that_does_not_trust_the_ca_is_refused(https_service: FhirbridgeService,
                                                          ca: TestCA) -> None:
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{https_service.base}/fhir/metadata", timeout=10,
                  verify=ca.client_context(ca_file=ca.other_ca_file))


# -- DICOM TLS --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_orthanc(tmp_path_factory: pytest.TempPathFactory, ca: TestCA
                ) -> Iterator[OrthancServer]:
    """An Orthanc whose DICOM port speaks TLS only and requires a client certificate from
    the test CA."""
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-tls"),
                           dicom_tls=(ca.server.cert, ca.server.key, ca.ca_file))
    yield server
    server.stop()


def test_upload_is_stored_over_dicom_tls(tmp_path: Path, tls_orthanc: OrthancServer,
                                         fhir_server, patient, ca: TestCA) -> None:
    assert tls_orthanc.dicom_url.startswith("dicom+tls://")
    svc = FhirbridgeService(tmp_path / "fb", pacs_url=tls_orthanc.dicom_url,
                            ehr_url=fhir_server.base_url, wado_rs_url=tls_orthanc.dicomweb_url,
                            pacs_options=tls_options(ca)).start()
    try:
        focus = upload(svc, patient)
        task = svc.wait_task(focus)
        assert task["status"] == "completed", task
        study_ref = task["output"][0]["valueReference"]["reference"]
        study = svc.client.get(f"/fhir/{study_ref}").json()
        sop_uid = study["series"][0]["instance"][0]["uid"]
        assert len(tls_orthanc.find_instances(sop_uid)) == 1
    finally:
        svc.stop()


def test_a_pacs_certificate_from_another_ca_stops_the_store(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, fhir_server, patient,
        ca: TestCA) -> None:
    # this PACS presents a certificate our CA did not sign: no association, nothing stored;
    # the job is kept for retry (a certificate can be fixed) and the Task does not complete
    impostor = OrthancServer(tmp_path_factory.mktemp("orthanc-other-ca"), dicom_tls=(
        ca.other_server.cert, ca.other_server.key, ca.ca_file))
    svc = FhirbridgeService(tmp_path / "fb", pacs_url=impostor.dicom_url,
                            ehr_url=fhir_server.base_url, pacs_options=tls_options(ca))
    try:
        svc.start()
        focus = upload(svc, patient)
        deadline = time.monotonic() + 30
        while "job" not in svc.log_text() or "PacsError" not in svc.log_text():
            assert time.monotonic() < deadline, svc.log_text()[-2000:]
            time.sleep(0.1)
        time.sleep(1.0)
        assert svc.task_for(focus)["status"] not in ("completed", "failed")
        assert impostor.instances() == []
    finally:
        svc.stop()
        impostor.stop()


class Recorder:
    """A TCP listener that keeps the first bytes each client sends, then closes."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    self.received.append(conn.recv(4096))
                except OSError:
                    self.received.append(b"")

    def close(self) -> None:
        self.sock.close()


def test_dicom_tls_sends_nothing_in_clear(ca: TestCA) -> None:
    """What reaches the wire for dicom+tls:// is a TLS ClientHello (record type 22), never a
    DICOM A-ASSOCIATE-RQ (PDU type 0x01) with our AE titles in clear; a peer that does not
    answer TLS fails the store, retryable."""
    listener = Recorder()
    pacs = open_pacs(f"dicom+tls://ORTHANC@127.0.0.1:{listener.port}", timeout=5,
                     **tls_options(ca))
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    try:
        with pytest.raises(PacsError) as err:
            pacs.store([ds])
        assert err.value.retryable
    finally:
        pacs.close()
        listener.close()
    assert listener.received, "no connection reached the listener"
    for first in listener.received:
        assert first[:1] == b"\x16", first[:16]  # TLS handshake record (RFC 8446 5.1)
        assert b"FHIRBRIDGE" not in first and b"ORTHANC" not in first


# -- STOW-RS credentials ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def auth_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-auth"),
                           users={"fhirbridge": ORTHANC_PASSWORD})
    yield server
    server.stop()


def test_stow_rs_with_basic_credentials_completes(tmp_path: Path, auth_orthanc: OrthancServer,
                                                  fhir_server, patient) -> None:
    assert httpx.get(f"{auth_orthanc.dicomweb_url}/studies", timeout=10).status_code == 401
    svc = FhirbridgeService(tmp_path / "fb", pacs_url=auth_orthanc.dicomweb_url,
                            ehr_url=fhir_server.base_url, pacs_options={
                                "username": "fhirbridge", "password": ORTHANC_PASSWORD})
    try:
        svc.start()
        task = svc.wait_task(upload(svc, patient))
        assert task["status"] == "completed", task
        assert auth_orthanc.instances()
    finally:
        svc.stop()
    assert ORTHANC_PASSWORD not in svc.log_text()


def test_stow_rs_without_credentials_fails_saying_the_pacs_refused_them(
        tmp_path: Path, auth_orthanc: OrthancServer, fhir_server, patient) -> None:
    svc = FhirbridgeService(tmp_path / "fb", pacs_url=auth_orthanc.dicomweb_url,
                            ehr_url=fhir_server.base_url, pacs_options={
                                "username": "fhirbridge", "password": "wrong-password-1"})
    try:
        svc.start()
        task = svc.wait_task(upload(svc, patient))
    finally:
        svc.stop()
    assert task["status"] == "failed", task
    reason = task["statusReason"]["text"] if "text" in task["statusReason"] else \
        str(task["statusReason"])
    assert "refused our credentials" in reason and "401" in reason
    assert "wrong-password-1" not in svc.log_text()
    assert "wrong-password-1" not in str(task)


def test_tls_settings_that_would_be_ignored_stop_start_up(tmp_path: Path,
                                                          ca: TestCA) -> None:
    # dicom:// (clear) with a CA configured: the operator believes TLS is on; it is not
    svc = FhirbridgeService(tmp_path / "fb", pacs_url="dicom://PACS@127.0.0.1:11112",
                            pacs_options={"tls_ca_file": str(ca.ca_file)})
    with pytest.raises(RuntimeError, match="fhirbridge exited"):
        svc.start()
    svc.stop()
    assert "configuration error" in svc.log_text()
    assert "Traceback" not in svc.log_text()


def test_orthanc_rest_correction_uses_its_own_credentials(auth_orthanc: OrthancServer,
                                                         tmp_path: Path) -> None:
    """correction = "orthanc": the REST client authenticates with orthanc_username/password
    (a PACS reached by STOW-RS with other credentials); wrong ones are named as such."""
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "TLS-REST-1", "OT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    common = {"correction": "orthanc", "orthanc_url": auth_orthanc.http_url,
              "username": "fhirbridge", "password": ORTHANC_PASSWORD}
    pacs = open_pacs(auth_orthanc.dicomweb_url, **common)
    try:
        pacs.store([ds])
        got = pacs.retrieve(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert got is not None and got.SOPInstanceUID == ds.SOPInstanceUID
    finally:
        pacs.close()
    wrong = open_pacs(auth_orthanc.dicomweb_url, **common, orthanc_username="fhirbridge",
                      orthanc_password="not-the-password")
    try:
        with pytest.raises(PacsError, match="refused our credentials") as err:
            wrong.replace([("OLD-ID", ds)])
        assert not err.value.retryable
    finally:
        wrong.close()


def test_mllp_over_tls_in_serve(tmp_path: Path, ca: TestCA) -> None:
    """`fhirbridge serve` with [mllp] tls_* and a client CA: an A04 from a client holding a
    certificate of that CA is acknowledged AA; plain TCP gets nothing."""
    svc = FhirbridgeService(tmp_path / "fb", workers=0, env={
        "FHIRBRIDGE_MLLP__TLS_CERT_FILE": str(ca.server.cert),
        "FHIRBRIDGE_MLLP__TLS_KEY_FILE": str(ca.server.key),
        "FHIRBRIDGE_MLLP__TLS_CLIENT_CA_FILE": str(ca.ca_file)})
    message = ("MSH|^~\\&|ADT|HOSP|FHIRBRIDGE|HOSP|20261120100000||ADT^A04|TLS-SERVE-1|P|2.5.1\r"
               "EVN|A04|20261120095900\rPID|1||TLS-MRN-1^^^HOSP^MR||Test^Tls||19700101|F\r")
    try:
        svc.start()
        assert "TLS on (client certificate required)" in svc.log_text()
        raw = socket.create_connection(("127.0.0.1", svc.mllp_port), timeout=10)
        with ca.client_context(ca.client).wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"\x0b" + message.encode() + b"\x1c\r")
            answer = b""
            while b"\x1c" not in answer and (chunk := s.recv(4096)):
                answer += chunk
        assert b"MSA|AA|TLS-SERVE-1" in answer
        with socket.create_connection(("127.0.0.1", svc.mllp_port), timeout=10) as plain:
            got = b""
            try:
                plain.sendall(b"\x0b" + message.replace("TLS-SERVE-1", "CLEAR-2").encode()
                              + b"\x1c\r")
                while chunk := plain.recv(4096):
                    got += chunk
            except OSError:
                pass
        assert b"MSA" not in got
    finally:
        svc.stop()
