"""The PACS adapter: one interface, `store(datasets)`, three transports chosen by URL.

`dicom://AET@host:port` → DIMSE C-STORE (PS3.4 B, PS3.7 9.1.1) with pynetdicom, and
`dicom+tls://AET@host:port` the same over TLS (PS3.15 B.1, Basic TLS Secure Transport
Connection Profile); `http(s)://…/dicom-web` → STOW-RS (PS3.18 10.5) with httpx, with basic
or bearer credentials; `file:///dir` → a folder.
"Already stored" counts as success, so every store can be retried.
"""

from __future__ import annotations

import io
import logging
import os
import ssl
import threading
import time
import uuid
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

import httpx
from pydicom import Dataset, dcmread
from pynetdicom import AE, _config, build_context
from pynetdicom.association import Association

from fhirbridge.adapters.blobs import write_durably
from fhirbridge.dicom.io import write_dataset
from fhirbridge.tls import client_context

log = logging.getLogger(__name__)


class PacsError(Exception):
    """Storing failed; `retryable` says whether trying again later may help."""

    def __init__(self, text: str, *, retryable: bool = True) -> None:
        super().__init__(text)
        self.retryable = retryable


class PacsConfigError(ValueError):
    """A [pacs] setting cannot work (or would be silently ignored); names the key only."""


class Pacs(Protocol):
    def store(self, datasets: list[Dataset], files: list[Path] | None = None) -> None:
        """Store the objects. `files`, when given, are the same objects already written as
        Part 10 files (in order): they are sent as they are, not encoded again."""
    def replace(self, corrected: list[tuple[str, Dataset]]) -> None: ...
    def retrieve(self, study_uid: str, series_uid: str, sop_uid: str) -> Dataset | None:
        """The stored object back from the PACS (for corrections once our copy is gone);
        None when the PACS does not hold it. PacsError when it cannot be asked."""
    def ping(self) -> bool: ...
    def close(self) -> None: ...
    @property
    def wado_rs_url(self) -> str: ...


# Files passed to send_c_store are streamed from disk, not decoded and re-encoded.
_config.STORE_SEND_CHUNKED_DATASET = True

# PS3.4 Annex B.2.3 C-STORE status: 0000 success; B000/B007/B006 warnings (stored);
# 0111 "duplicate SOP instance" is success for an idempotent retry.
_STORED = {0x0000, 0xB000, 0xB006, 0xB007, 0x0111}


class DimsePacs:
    """C-STORE SCU; one association shared by the workers (a lock serialises C-STOREs, as one
    association carries one operation at a time, PS3.7 D.3.3.3), reused until it drops.
    Each pynetdicom association runs two polling threads (about 15 % of a CPU even while
    idle), so one is cheaper than one per worker, and it is released (A-RELEASE, PS3.8 7.2)
    after `idle_release_seconds` without a C-STORE."""

    def __init__(self, url: str, *, ae_title: str, max_pdu: int = 131072,
                 timeout: float = 30.0, wado_rs_url: str = "",
                 idle_release_seconds: float = 10.0,
                 tls: ssl.SSLContext | None = None) -> None:
        u = urlparse(url)
        if not u.hostname or not u.port:
            raise ValueError("pacs.url must be dicom[+tls]://CALLED_AET@host:port")
        if (u.scheme == "dicom+tls") != (tls is not None):
            raise ValueError("dicom+tls:// needs a TLS context, and only dicom+tls:// takes one")
        # PS3.15 B.1: every association with this PACS runs over TLS; nothing in clear
        self.tls = tls
        self.called_aet = unquote(u.username or "ANY-SCP")
        self.host, self.port = u.hostname, u.port
        self.ae_title = ae_title
        self.max_pdu = max_pdu
        self.timeout = timeout
        self._wado = wado_rs_url.rstrip("/")
        self._shared = _Shared()
        self._lock = threading.RLock()
        self.idle_release_seconds = idle_release_seconds
        self._last_used = 0.0
        self._janitor: threading.Thread | None = None  # releases the association when idle

    @property
    def wado_rs_url(self) -> str:
        return self._wado

    def _ae(self, contexts: set[tuple[str, str]]) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = self.max_pdu
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.requested_contexts = [build_context(sop, [ts]) for sop, ts in sorted(contexts)]
        return ae

    def _association(self, contexts: set[tuple[str, str]]) -> Association:
        assoc: Association | None = getattr(self._shared, "assoc", None)
        have: set[tuple[str, str]] = getattr(self._shared, "contexts", set())
        if assoc is not None and assoc.is_established and contexts <= have:
            return assoc
        if assoc is not None and assoc.is_established:
            assoc.release()
        want = contexts | have  # keep earlier contexts so mixed batches reuse one association
        assoc = self.associate(self._ae(want))
        if not assoc.is_established:
            self._shared.assoc = None
            raise PacsError(self.refused_text())
        self._shared.assoc, self._shared.contexts = assoc, want
        if self._janitor is None:
            self._janitor = threading.Thread(target=self._release_when_idle,
                                             name="pacs-idle-release", daemon=True)
            self._janitor.start()
        return assoc

    def associate(self, ae: AE, **kwargs: object) -> Association:
        """Request an association with the PACS; over TLS for dicom+tls:// (the server's
        certificate checked against pacs.tls_ca_file and its name against the host)."""
        tls_args = (self.tls, self.host) if self.tls is not None else None
        return ae.associate(self.host, self.port, ae_title=self.called_aet,
                            tls_args=tls_args, **kwargs)  # type: ignore[arg-type]

    def refused_text(self) -> str:
        if self.tls is not None:
            return ("PACS refused or did not answer the association request over TLS "
                    "(is its certificate signed by pacs.tls_ca_file, and ours accepted?)")
        return "PACS refused or did not answer the association request"

    def _release_when_idle(self) -> None:
        """Runs while an association is open; releases it once no C-STORE used it for
        `idle_release_seconds`, which stops pynetdicom's polling threads."""
        while True:
            time.sleep(min(1.0, self.idle_release_seconds / 4))
            with self._lock:
                assoc = getattr(self._shared, "assoc", None)
                if assoc is not None and \
                        time.monotonic() - self._last_used < self.idle_release_seconds:
                    continue
                if assoc is not None:
                    try:
                        if assoc.is_established:
                            assoc.release()
                    except Exception as exc:  # noqa: BLE001 - the peer went away meanwhile
                        log.debug("idle association release failed: %s", type(exc).__name__)
                self._shared.assoc, self._shared.contexts = None, set()
                self._janitor = None
                return

    def store(self, datasets: list[Dataset], files: list[Path] | None = None) -> None:
        with self._lock:
            try:
                self._store(datasets, files)
            finally:
                self._last_used = time.monotonic()

    def _store(self, datasets: list[Dataset], files: list[Path] | None = None) -> None:
        # Propose each object's own transfer syntax (PS3.8 9.3.2.2): no transcoding.
        contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
        for attempt in (1, 2):
            assoc = self._association(contexts)
            try:
                for i, ds in enumerate(datasets):
                    # a written file goes out in chunks straight from disk (no re-encoding,
                    # and a video is never whole in memory): STORE_SEND_CHUNKED_DATASET
                    status = assoc.send_c_store(files[i] if files else ds)
                    if not status or "Status" not in status:
                        raise ConnectionError("no C-STORE response")
                    code = int(status.Status)
                    if code not in _STORED:
                        raise PacsError(f"C-STORE refused with status 0x{code:04X}",
                                        retryable=(code & 0xF000) == 0xA700 or code == 0x0110)
                return
            except (ConnectionError, OSError, RuntimeError) as exc:
                self._drop()
                if attempt == 2:
                    raise PacsError(f"C-STORE failed: {type(exc).__name__}") from exc

    def _drop(self) -> None:
        assoc = getattr(self._shared, "assoc", None)
        if assoc is not None:
            try:
                assoc.abort()
            except Exception:
                pass
        self._shared.assoc = None
        self._shared.contexts = set()

    def replace(self, corrected: list[tuple[str, Dataset]]) -> None:
        """Re-send under the same SOP Instance UIDs (for PACSs keyed on the UID)."""
        self.store([ds for _, ds in corrected])

    def retrieve(self, study_uid: str, series_uid: str, sop_uid: str) -> Dataset | None:
        """C-GET at IMAGE level (PS3.4 C.4.3, Study Root): the PACS sends the object back as
        C-STOREs on the same association, for which we take the SCP role of the storage SOP
        classes fhirbridge builds (PS3.7 D.3.3.4 SCP/SCU role selection)."""
        return _c_get(self, study_uid, series_uid, sop_uid)

    def ping(self) -> bool:
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.network_timeout = 5
        ae.add_requested_context("1.2.840.10008.1.1")  # Verification SOP Class, PS3.4 A
        assoc = self.associate(ae)
        if not assoc.is_established:
            return False
        try:
            status = assoc.send_c_echo()
            return bool(status) and int(status.Status) == 0
        finally:
            assoc.release()

    def close(self) -> None:
        with self._lock:
            assoc = getattr(self._shared, "assoc", None)
            if assoc is not None and assoc.is_established:
                assoc.release()
            self._shared.assoc = None


class _Shared:
    """The association state shared by all worker threads (guarded by DimsePacs._lock)."""

    assoc: Association | None = None
    contexts: set[tuple[str, str]] = set()


class StowRsPacs:
    """STOW-RS: POST multipart/related; type="application/dicom" to {base}/studies."""

    def __init__(self, base_url: str, *, timeout: float = 30.0, wado_rs_url: str = "",
                 headers: dict[str, str] | None = None, auth: httpx.Auth | None = None,
                 verify: ssl.SSLContext | bool = True) -> None:
        self.base = base_url.rstrip("/")
        self._wado = (wado_rs_url or self.base).rstrip("/")
        self.client = httpx.Client(timeout=timeout, headers=headers or {}, auth=auth,
                                   verify=verify)

    @property
    def wado_rs_url(self) -> str:
        return self._wado

    def store(self, datasets: list[Dataset], files: list[Path] | None = None) -> None:
        boundary = uuid.uuid4().hex
        body = io.BytesIO()
        for i, ds in enumerate(datasets):
            body.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            body.write(files[i].read_bytes() if files else write_dataset(ds))
            body.write(b"\r\n")
        body.write(f"--{boundary}--\r\n".encode())
        try:
            r = self.client.post(
                f"{self.base}/studies",
                content=body.getvalue(),
                headers={
                    "Content-Type": ('multipart/related; type="application/dicom"; '
                                     f"boundary={boundary}"),
                    "Accept": "application/dicom+json",
                },
            )
        except httpx.HTTPError as exc:
            raise PacsError(f"STOW-RS request failed: {type(exc).__name__}") from exc
        if r.status_code in (200, 202):
            failed = _stow_failed_sop_sequence(r)
            if failed:
                raise PacsError(f"STOW-RS refused {len(failed)} instance(s)", retryable=False)
            return
        if r.status_code == 409:
            raise PacsError("STOW-RS conflict (409): the PACS holds different data for a UID",
                            retryable=False)
        if r.status_code in (401, 403):
            raise _credentials_refused("STOW-RS", r.status_code)
        raise PacsError(f"STOW-RS answered HTTP {r.status_code}",
                        retryable=r.status_code >= 500 or r.status_code == 429)

    def replace(self, corrected: list[tuple[str, Dataset]]) -> None:
        self.store([ds for _, ds in corrected])

    def retrieve(self, study_uid: str, series_uid: str, sop_uid: str) -> Dataset | None:
        """WADO-RS RetrieveInstance (PS3.18 10.4): the Part 10 object as stored, in its own
        transfer syntax (`transfer-syntax=*`), from a multipart/related answer."""
        try:
            r = self.client.get(
                f"{self.base}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}",
                headers={"Accept": 'multipart/related; type="application/dicom"; '
                                   "transfer-syntax=*"})
        except httpx.HTTPError as exc:
            raise PacsError(f"WADO-RS request failed: {type(exc).__name__}") from exc
        if r.status_code == 404:
            return None
        if r.status_code in (401, 403):
            raise _credentials_refused("WADO-RS", r.status_code)
        if r.status_code != 200:
            raise PacsError(f"WADO-RS answered HTTP {r.status_code}",
                            retryable=r.status_code >= 500 or r.status_code == 429)
        parts = _multipart_parts(r.headers.get("content-type", ""), r.content)
        return dcmread(io.BytesIO(parts[0])) if parts else None

    def ping(self) -> bool:
        try:
            r = self.client.get(f"{self.base}/studies", params={"limit": "1"})
            return r.status_code < 500
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self.client.close()


def _credentials_refused(what: str, status: int) -> PacsError:
    """401/403 (RFC 9110 15.5.2/15.5.4): our credentials are wrong or not allowed. Trying
    again with the same ones cannot help: the job fails at once, with a reason an operator
    can act on (then "Retry" once the settings are fixed)."""
    return PacsError(f"the PACS refused our credentials ({what}, HTTP {status}): check "
                     "pacs.username/password or pacs.bearer_token", retryable=False)


def _stow_failed_sop_sequence(r: httpx.Response) -> list[object]:
    """PS3.18 Table 10.5.3-1: FailedSOPSequence (0008,1198) lists what was not stored."""
    try:
        body = r.json()
    except ValueError:
        return []
    failed = body.get("00081198", {}).get("Value", []) if isinstance(body, dict) else []
    # Orthanc reports an identical already-stored instance as success; any failure listed is real
    return list(failed)


class FolderPacs:
    """A folder of DICOM Part 10 files: <dir>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm."""

    def __init__(self, url: str, *, wado_rs_url: str = "") -> None:
        self.root = Path(unquote(urlparse(url).path))
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)  # PHI at rest
        self._wado = wado_rs_url.rstrip("/")

    @property
    def wado_rs_url(self) -> str:
        return self._wado

    def path_for(self, ds: Dataset) -> Path:
        return (self.root / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
                / f"{ds.SOPInstanceUID}.dcm")

    def store(self, datasets: list[Dataset], files: list[Path] | None = None) -> None:
        for i, ds in enumerate(datasets):
            # a retry overwrites: same UID, same object
            write_durably(self.path_for(ds), files[i].read_bytes() if files
                          else write_dataset(ds))

    def replace(self, corrected: list[tuple[str, Dataset]]) -> None:
        self.store([ds for _, ds in corrected])  # same path: the file is replaced

    def read(self, sop_instance_uid: str) -> Dataset | None:
        for path in self.root.glob(f"*/*/{sop_instance_uid}.dcm"):
            return dcmread(path)
        return None

    def retrieve(self, study_uid: str, series_uid: str, sop_uid: str) -> Dataset | None:
        path = self.root / study_uid / series_uid / f"{sop_uid}.dcm"
        return dcmread(path) if path.is_file() else self.read(sop_uid)

    def ping(self) -> bool:
        return self.root.is_dir() and os.access(self.root, os.W_OK)

    def close(self) -> None:
        pass


class OrthancCorrections:
    """Orthanc keys patients on PatientID: a corrected object re-sent under a new PatientID is
    a second copy, and the old one stays under the retired ID. After re-sending, delete every
    copy of the same SOP Instance UID filed under another PatientID (Orthanc REST API)."""

    def __init__(self, pacs: Pacs, rest_url: str, *, timeout: float = 30.0,
                 auth: httpx.Auth | tuple[str, str] | None = None,
                 verify: ssl.SSLContext | bool = True) -> None:
        self.pacs = pacs
        self.rest = httpx.Client(base_url=rest_url.rstrip("/"), timeout=timeout, auth=auth,
                                 verify=verify)

    @property
    def wado_rs_url(self) -> str:
        return self.pacs.wado_rs_url

    def store(self, datasets: list[Dataset], files: list[Path] | None = None) -> None:
        self.pacs.store(datasets, files)

    def replace(self, corrected: list[tuple[str, Dataset]]) -> None:
        self.pacs.store([ds for _, ds in corrected])
        for _old_patient_id, ds in corrected:
            try:
                r = self.rest.post("/tools/find", json={
                    "Level": "Instance", "Query": {"SOPInstanceUID": str(ds.SOPInstanceUID)},
                    "Expand": True})
                r.raise_for_status()
                for inst in r.json():
                    pid = self.rest.get(f"/instances/{inst['ID']}/simplified-tags")
                    pid.raise_for_status()
                    if pid.json().get("PatientID", "") != str(ds.PatientID):
                        self.rest.delete(f"/instances/{inst['ID']}").raise_for_status()
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code in (401, 403):
                    raise _credentials_refused("Orthanc REST",
                                               exc.response.status_code) from exc
                raise PacsError(f"Orthanc correction failed: {type(exc).__name__}") from exc
            except httpx.HTTPError as exc:
                raise PacsError(f"Orthanc correction failed: {type(exc).__name__}") from exc

    def retrieve(self, study_uid: str, series_uid: str, sop_uid: str) -> Dataset | None:
        """The object through Orthanc's REST API (`/tools/find`, `/instances/{id}/file`);
        while a correction is half done two copies may exist: the first is as good."""
        try:
            r = self.rest.post("/tools/find", json={
                "Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}})
            r.raise_for_status()
            ids = [i if isinstance(i, str) else i.get("ID", "") for i in r.json()]
            if not ids:
                return None
            f = self.rest.get(f"/instances/{ids[0]}/file")
            if f.status_code == 404:  # deleted between the look-up and the download
                return None
            f.raise_for_status()
        except httpx.HTTPError as exc:
            raise PacsError(f"Orthanc retrieve failed: {type(exc).__name__}") from exc
        return dcmread(io.BytesIO(f.content))

    def ping(self) -> bool:
        return self.pacs.ping()

    def close(self) -> None:
        self.rest.close()
        self.pacs.close()


def _multipart_parts(content_type: str, body: bytes) -> list[bytes]:
    """The bodies of a multipart/related message (RFC 2387 / RFC 2046 5.1)."""
    params = dict(p.strip().split("=", 1) for p in content_type.split(";")[1:] if "=" in p)
    boundary = params.get("boundary", "").strip('"')
    if not boundary:
        return []
    parts = []
    for chunk in body.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):  # the close delimiter
            break
        head, sep, rest = chunk.partition(b"\r\n\r\n")
        if sep:
            parts.append(rest[:-2] if rest.endswith(b"\r\n") else rest)
    return parts


# What fhirbridge builds (VL Photographic, Video Photographic, Encapsulated PDF; PS3.4 B.5)
# and the transfer syntaxes it writes them in, for C-GET's storage sub-operations.
_BUILT_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.77.1.4", "1.2.840.10008.5.1.4.1.1.77.1.4.1",
                      "1.2.840.10008.5.1.4.1.1.104.1")
_BUILT_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.102",
                            "1.2.840.10008.1.2.4.102.1", "1.2.840.10008.1.2.4.103",
                            "1.2.840.10008.1.2.4.104", "1.2.840.10008.1.2.4.105",
                            "1.2.840.10008.1.2.4.106", "1.2.840.10008.1.2.4.107",
                            "1.2.840.10008.1.2.4.108", "1.2.840.10008.1.2.1",
                            "1.2.840.10008.1.2")
_STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"  # Study Root Q/R Information Model - GET


def _c_get(pacs: DimsePacs, study_uid: str, series_uid: str, sop_uid: str) -> Dataset | None:
    from pynetdicom import build_role, evt

    received: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    ae = AE(ae_title=pacs.ae_title)
    ae.maximum_pdu_size = pacs.max_pdu
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = pacs.timeout
    ae.add_requested_context(_STUDY_ROOT_GET)
    for sop_class in _BUILT_SOP_CLASSES:  # one context per syntax: the PACS may send the
        for syntax in _BUILT_TRANSFER_SYNTAXES:  # object as stored, not transcoded
            ae.add_requested_context(sop_class, [syntax])
    roles = [build_role(c, scp_role=True) for c in _BUILT_SOP_CLASSES]
    assoc = pacs.associate(ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    if not assoc.is_established:
        raise PacsError("PACS refused or did not answer the C-GET association request")
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID, query.SeriesInstanceUID = study_uid, series_uid
    query.SOPInstanceUID = sop_uid
    try:
        for status, _ in assoc.send_c_get(query, _STUDY_ROOT_GET):
            if not status:
                raise PacsError("C-GET: no response from the PACS")
    finally:
        assoc.release()
    return received[0] if received else None


def open_pacs(url: str, *, ae_title: str = "FHIRBRIDGE", wado_rs_url: str = "",
              timeout: float = 30.0, max_pdu: int = 131072, correction: str = "resend",
              orthanc_url: str = "", tls_ca_file: str = "", tls_cert_file: str = "",
              tls_key_file: str = "", username: str = "", password: str = "",
              bearer_token: str = "", orthanc_username: str = "",
              orthanc_password: str = "") -> Pacs:
    """The PACS named by `url`; `correction` says how re-identified objects reach it:
    "resend" (same UIDs; PACSs keyed on SOP Instance UID) or "orthanc" (resend, then delete
    the copy left under the old PatientID through Orthanc's REST API at `orthanc_url`).

    `tls_*` apply to dicom+tls:// and https:// (the PACS's CA, empty = the system's trust
    store; our client certificate); `username`/`password` (basic) or `bearer_token` to
    STOW-RS; `orthanc_username`/`orthanc_password` (empty = `username`/`password`) to the
    Orthanc REST correction. A setting that would be ignored stops start-up instead."""
    scheme = urlparse(url).scheme
    tls_wanted = bool(tls_ca_file or tls_cert_file or tls_key_file)
    secure = scheme in ("dicom+tls", "https") or (
        correction == "orthanc" and orthanc_url.startswith("https://"))
    if tls_wanted and not secure:
        raise PacsConfigError("pacs.tls_* are set but nothing uses TLS: use a dicom+tls:// "
                              "or https:// pacs.url (or an https:// pacs.orthanc_url)")
    if bearer_token and (username or password):
        raise PacsConfigError("set either pacs.username/password or pacs.bearer_token, "
                              "not both")
    if password and not username:
        raise PacsConfigError("pacs.password needs pacs.username")
    if bearer_token and scheme not in ("http", "https"):
        raise PacsConfigError("pacs.bearer_token applies to STOW-RS (http(s):// pacs.url) "
                              "only")
    if username and scheme not in ("http", "https") and correction != "orthanc":
        raise PacsConfigError("pacs.username/password apply to STOW-RS (http(s):// pacs.url) "
                              'and the Orthanc REST correction (correction = "orthanc") only')
    tls = (client_context(ca_file=tls_ca_file, cert_file=tls_cert_file,
                          key_file=tls_key_file, setting="pacs") if tls_wanted else None)
    # STOW-RS credentials: basic (httpx.BasicAuth) or a bearer token (RFC 6750 2.1 header)
    auth = httpx.BasicAuth(username, password) if username and scheme in ("http",
                                                                           "https") else None
    bearer = {"Authorization": f"Bearer {bearer_token}"} if bearer_token else {}
    if (auth is not None or bearer) and scheme == "http":
        log.warning("PACS credentials are sent over plain http:// (use https://)")
    if scheme == "dicom+tls":
        pacs: Pacs = DimsePacs(url, ae_title=ae_title, max_pdu=max_pdu, timeout=timeout,
                               wado_rs_url=wado_rs_url,
                               tls=tls or client_context(setting="pacs"))
    elif scheme == "dicom":
        pacs = DimsePacs(url, ae_title=ae_title, max_pdu=max_pdu, timeout=timeout,
                         wado_rs_url=wado_rs_url)
    elif scheme in ("http", "https"):
        pacs = StowRsPacs(url, timeout=timeout, wado_rs_url=wado_rs_url, auth=auth,
                          headers=bearer, verify=tls if tls is not None and scheme == "https" else True)
    elif scheme == "file":
        pacs = FolderPacs(url, wado_rs_url=wado_rs_url)
    else:
        raise ValueError(f"unsupported pacs.url scheme: {scheme!r}")
    log.info("PACS: %s, TLS %s%s", {"dicom+tls": "DIMSE C-STORE", "dicom": "DIMSE C-STORE",
                                    "http": "STOW-RS", "https": "STOW-RS"}.get(scheme, "folder"),
             "on" if scheme in ("dicom+tls", "https") else "off",
             ", with credentials" if auth is not None or bearer else "")
    if correction == "orthanc":
        if not orthanc_url:
            raise ValueError('pacs.correction = "orthanc" needs pacs.orthanc_url')
        o_user, o_password = orthanc_username or username, orthanc_password or (
            password if not orthanc_username else "")
        return OrthancCorrections(
            pacs, orthanc_url, timeout=timeout,
            auth=httpx.BasicAuth(o_user, o_password) if o_user else None,
            verify=tls if tls is not None and orthanc_url.startswith("https://") else True)
    if correction != "resend":
        raise ValueError(f"unsupported pacs.correction: {correction!r}")
    return pacs


__all__ = ["DimsePacs", "FolderPacs", "OrthancCorrections", "Pacs",
           "PacsConfigError", "PacsError", "StowRsPacs", "open_pacs"]
