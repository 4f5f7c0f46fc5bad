"""Fetching FHIR Attachment.url content into the blob store, only from places we trust.

FHIR R4 Attachment.url (datatypes.html#Attachment) and Binary read (http.html#binary): a
relative `Binary/{id}` is ours first, then the EHR's; an absolute URL only under the EHR base or
a configured prefix (`ehr.attachment_url_allowlist`). URLs are compared after RFC 3986
normalisation (6.2.2: case, percent-encoding, dot segments) and the request is built from the
normalised form, so what was checked is what is sent. Redirects are followed by hand (at most
three), each hop checked again; the EHR's credentials (a shared `httpx.Auth`) go only to URLs
under the EHR base.

Confused deputy: content under the EHR base is fetched with fhirbridge's own credentials, so it
is used only when the EHR shows it belongs to the upload's patient: the Binary is read as FHIR
JSON and its `securityContext` (FHIR R4 Binary.securityContext) must be that Patient, or a
resource whose `subject`/`patient` is that Patient; otherwise `AttachmentNotPatients`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urljoin, urlsplit

import httpx

from fhirbridge.adapters.blobs import BlobStore, BlobTooLarge

__all__ = ["AttachmentFetcher", "AttachmentNotPatients", "AttachmentRefused",
           "AttachmentUnavailable", "LocalBinary", "Fetched", "UrlScope"]

MAX_REDIRECTS = 3
MAX_BINARY_JSON_BYTES = 64 * 1024 * 1024  # an EHR answering a Binary read with FHIR JSON
_LOCAL_BINARY = re.compile(r"^Binary/(?!\.+$)([A-Za-z0-9\-.]{1,64})$")  # FHIR id, not "." or ".."
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_FHIR_JSON = ("application/fhir+json", "application/json")
_REFERENCE = re.compile(r"^([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")
MAX_OWNER_JSON_BYTES = 4 * 1024 * 1024  # the resource a Binary.securityContext points at


def local_binary_id(url: str) -> str | None:
    """The id of a relative `Binary/{id}` reference, else None."""
    m = _LOCAL_BINARY.match(url)
    return m.group(1) if m else None


class AttachmentRefused(Exception):
    """A definite no: not allowed, too large, not found, HTTP 4xx. Retrying will not help.

    `code`: not-allowed | bad-url | too-many-redirects | too-large | not-found | http-error |
    bad-content. `text` names no URL, query or token (it may be logged and shown).
    """

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text


class AttachmentNotPatients(AttachmentRefused):
    """EHR content that is not shown to belong to the upload's patient (confused deputy):
    the upload is held for a person, its bytes are not used."""

    def __init__(self, text: str) -> None:
        super().__init__("not-patients", text)


class AttachmentUnavailable(Exception):
    """Could not fetch now (network, timeout, HTTP 5xx or 429): retry later."""


class Fetched(NamedTuple):
    blob_path: str  # relative to the blob store
    sha256: str
    size: int
    content_type: str  # as the source declared it (normalised), "" when it did not


@dataclass(frozen=True)
class LocalBinary:
    """A Binary we hold, as `local_binary_resolver` may describe it."""

    blob_path: str
    content_type: str = ""
    sha256: str = ""
    size: int = -1


LocalResolver = Callable[[str], "str | LocalBinary | None"]


@dataclass(frozen=True)
class _Url:
    """An absolute http(s) URL after normalisation; `text` is what is requested."""

    scheme: str
    host: str  # lower case, no trailing dot; IPv6 without brackets
    port: int
    path: str  # starts with "/", dot segments removed, unreserved escapes decoded
    query: str

    @property
    def text(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = {"http": 80, "https": 443}[self.scheme]
        port = "" if self.port == default else f":{self.port}"
        return f"{self.scheme}://{host}{port}{self.path}" + (f"?{self.query}" if self.query else "")

    def under(self, prefix: _Url) -> bool:
        """Same scheme, host and port, and the path at or below the prefix's path
        (segment-wise: /fhir allows /fhir and /fhir/x, never /fhirx)."""
        if (self.scheme, self.host, self.port) != (prefix.scheme, prefix.host, prefix.port):
            return False
        base = prefix.path
        if base.endswith("/"):
            return self.path.startswith(base) or self.path == base[:-1]
        return self.path == base or self.path.startswith(base + "/")


class _Refuse(Exception):
    pass


def normalise_url(url: str) -> _Url:
    """Parse and normalise an absolute http(s) URL; `_Refuse` for anything ambiguous:
    userinfo (`http://ehr@evil/`), backslashes, controls or spaces, encoded slashes, bad
    ports, non-http schemes."""
    if not url or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url) or "\\" in url:
        raise _Refuse("control characters, spaces or backslashes")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _Refuse("not an http(s) URL")
    if "@" in parts.netloc:
        raise _Refuse("userinfo in URL")
    try:
        host = (parts.hostname or "").rstrip(".")
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise _Refuse("bad port") from None
    if not host or "%" in host:
        raise _Refuse("bad host")
    try:
        host = host.encode("idna").decode("ascii").lower() if not host.isascii() else host.lower()
    except UnicodeError:
        raise _Refuse("bad host") from None

    def unescape(m: re.Match[str]) -> str:
        ch = chr(int(m.group(1), 16))
        return ch if ch in _UNRESERVED else f"%{m.group(1).upper()}"

    path = _PCT.sub(unescape, parts.path or "/")
    if re.search(r"%(2F|5C|00)", path):
        raise _Refuse("encoded slash or NUL in path")
    return _Url(scheme, host, port, _remove_dot_segments(path), parts.query)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 for an absolute path."""
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        elif seg == ".":
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


class UrlScope:
    """The URLs at or below one base URL, compared after RFC 3986 6.2.2 normalisation (the
    rule that decides where the EHR's credentials may go)."""

    def __init__(self, base_url: str) -> None:
        try:
            self.base = normalise_url(base_url.rstrip("/"))
        except _Refuse as exc:
            raise ValueError(f"not an absolute http(s) URL ({exc})") from None

    @staticmethod
    def is_http_url(url: str) -> bool:
        try:
            normalise_url(url)
        except _Refuse:
            return False
        return True

    def covers(self, url: str | _Url) -> bool:
        try:
            u = url if isinstance(url, _Url) else normalise_url(url)
        except _Refuse:
            return False
        return u.under(self.base)

    def relative(self, url: str | _Url) -> str | None:
        """The path below the base (`Binary/abc`) of a covered URL without a query."""
        try:
            u = url if isinstance(url, _Url) else normalise_url(url)
        except _Refuse:
            return None
        if u.query or not u.under(self.base):
            return None
        return u.path[len(self.base.path.rstrip("/")):].lstrip("/")


class AttachmentFetcher:
    """Fetch attachment URLs into a `BlobStore`, streamed, bounded in size and time.

    Blocking (httpx sync client): call it from a worker thread.
    """

    def __init__(self, ehr_base_url: str, auth: httpx.Auth | None,
                 allowed_url_prefixes: list[str], local_binary_resolver: LocalResolver,
                 timeout: float = 15.0, max_bytes: int = 2 * 1024 * 1024 * 1024, *,
                 deadline_seconds: float = 600.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        """`auth`: the EHR's credentials (`fhirbridge.adapters.smart_backend`, shared with the
        FHIR client), used only for requests under the EHR base. `timeout`: connect and each
        read; `deadline_seconds`: the whole fetch, redirects included (checked as chunks
        arrive). A prefix that is not an absolute http(s) URL is a configuration error
        (ValueError)."""
        self.ehr_scope = UrlScope(ehr_base_url) if ehr_base_url else None
        self.ehr = self.ehr_scope.base if self.ehr_scope is not None else None
        self.auth = auth
        prefixes: list[_Url] = []
        for p in allowed_url_prefixes:
            try:
                prefixes.append(normalise_url(p))
            except _Refuse as exc:
                raise ValueError(f"ehr.attachment_url_allowlist: invalid entry ({exc})") from None
        if self.ehr is not None:
            prefixes.append(self.ehr)
        self.allowed = tuple(prefixes)
        self.resolve_local = local_binary_resolver
        self.max_bytes = max_bytes
        self.deadline_seconds = deadline_seconds
        self.client = httpx.Client(timeout=httpx.Timeout(timeout), follow_redirects=False,
                                   transport=transport, trust_env=False)

    def close(self) -> None:
        self.client.close()

    # -- what may be fetched ----------------------------------------------------------------

    def is_allowed(self, url: str) -> bool:
        """Whether `fetch_to_blob` would try this URL (for checks at intake time)."""
        m = _LOCAL_BINARY.match(url)
        if m:
            return self.ehr is not None or self.resolve_local(m.group(1)) is not None
        try:
            return self._allowed(normalise_url(url))
        except _Refuse:
            return False

    def _allowed(self, u: _Url) -> bool:
        return any(u.under(p) for p in self.allowed)

    def _to_ehr(self, u: _Url) -> bool:
        return self.ehr_scope is not None and self.ehr_scope.covers(u)

    # -- fetching ---------------------------------------------------------------------------

    def fetch_to_blob(self, url: str, blobs: BlobStore, patient_ref: str | None = None
                      ) -> Fetched:
        """The attachment's bytes, durable in `blobs`: (rel path, sha256, size, content type).

        `patient_ref`: the upload's patient as the EHR knows it (`Patient/{id}`), or None when
        it is not known there; content from the EHR must belong to it. `AttachmentRefused`
        (`AttachmentNotPatients`) for a definite no, `AttachmentUnavailable` to retry later."""
        m = _LOCAL_BINARY.match(url)
        if m:
            local = self.resolve_local(m.group(1))
            if local is not None:
                return _local(local, blobs)
            if self.ehr is None:
                raise AttachmentRefused("not-found", "Binary is not held here and no EHR is "
                                        "configured")
            target = normalise_url(f"{self.ehr.text}/Binary/{m.group(1)}")
        else:
            if "://" not in url:
                raise AttachmentRefused("bad-url", "a relative attachment URL must be "
                                        "Binary/{id}")
            try:
                target = normalise_url(url)
            except _Refuse as exc:
                raise AttachmentRefused("bad-url", f"attachment URL refused: {exc}") from None
        if not self._allowed(target):
            raise AttachmentRefused("not-allowed", "attachment URL is neither under the EHR "
                                    "base nor on ehr.attachment_url_allowlist")
        deadline = time.monotonic() + self.deadline_seconds
        sent_by_ehr = False  # a hop answered by the EHR redirected: where it points is its word
        for _hop in range(MAX_REDIRECTS + 1):
            if self._to_ehr(target):
                nxt = self._get_ehr_binary(target, blobs, deadline, patient_ref)
                sent_by_ehr = True
            elif sent_by_ehr:
                raise AttachmentNotPatients("the EHR redirected the attachment elsewhere; "
                                            "whose content it is cannot be checked")
            else:
                nxt = self._get(target, blobs, deadline)
            if isinstance(nxt, Fetched):
                return nxt
            try:
                target = normalise_url(urljoin(target.text, nxt))
            except _Refuse as exc:
                raise AttachmentRefused("bad-url", f"redirect refused: {exc}") from None
            if not self._allowed(target):
                raise AttachmentRefused("not-allowed", "attachment URL redirects to a place "
                                        "neither under the EHR base nor on the allow-list")
        raise AttachmentRefused("too-many-redirects", f"more than {MAX_REDIRECTS} redirects")

    fetch = fetch_to_blob  # the name pipeline.process calls

    def _get(self, target: _Url, blobs: BlobStore, deadline: float) -> Fetched | str:
        """One request without credentials: the stored result, or a redirect's Location."""
        # identity: a compressed answer could expand far beyond a chunk before it is counted
        headers = {"Accept": "*/*", "Accept-Encoding": "identity"}
        with self._stream(target, headers, None) as r:
            if r.is_redirect:
                return r.headers["location"]
            _check_status(r.status_code)
            ctype = r.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            self._check_length(r)
            chunks = _until(r.iter_bytes(), deadline)
            if ctype in _FHIR_JSON:
                return self._store_binary(self._read_json(chunks, self._binary_json_limit()),
                                          blobs)
            try:
                rel, digest, size = blobs.put_iter(chunks, max_bytes=self.max_bytes)
            except BlobTooLarge:
                raise AttachmentRefused("too-large", f"attachment is larger than "
                                        f"{self.max_bytes} bytes") from None
            return Fetched(rel, digest, size, ctype)

    def _get_ehr_binary(self, target: _Url, blobs: BlobStore, deadline: float,
                        patient_ref: str | None) -> Fetched | str:
        """A Binary read at the EHR with fhirbridge's credentials (FHIR R4 http.html#binary,
        asked for as FHIR JSON so that `securityContext` comes with the data), used only when
        that context is the upload's patient."""
        assert self.ehr_scope is not None
        below = self.ehr_scope.relative(target) or ""
        if not _LOCAL_BINARY.match(below):
            raise AttachmentNotPatients("an EHR address other than Binary/{id}: whose content "
                                        "it is cannot be checked")
        if not patient_ref or not _REFERENCE.match(patient_ref) \
                or not patient_ref.startswith("Patient/"):
            raise AttachmentNotPatients("the upload's patient is not known at the EHR, so "
                                        "content from the EHR cannot be checked as theirs")
        headers = {"Accept": "application/fhir+json", "Accept-Encoding": "identity"}
        with self._stream(target, headers, self.auth) as r:
            if r.is_redirect:
                return r.headers["location"]
            _check_status(r.status_code)
            ctype = r.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if ctype not in _FHIR_JSON:
                raise AttachmentNotPatients("the EHR answered without the Binary resource, so "
                                            "whose content it is cannot be checked")
            doc = self._read_json(_until(r.iter_bytes(), deadline), self._binary_json_limit())
        if doc.get("resourceType") != "Binary":
            raise AttachmentRefused("bad-content", "answer is FHIR JSON but no Binary")
        if not self._belongs_to(doc, patient_ref, deadline):
            raise AttachmentNotPatients("the EHR content is not shown to belong to the upload's "
                                        "patient (Binary.securityContext)")
        return self._store_binary(doc, blobs)

    def _belongs_to(self, binary: dict[str, Any], patient_ref: str, deadline: float) -> bool:
        """Binary.securityContext names the patient, or a resource (DocumentReference, Media,
        …) whose `subject` or `patient` is the patient; one level, read at the EHR."""
        context = binary.get("securityContext")
        ref = self._ehr_reference(context)
        if ref is None:
            return False
        if ref.startswith("Patient/"):
            return ref == patient_ref
        assert self.ehr_scope is not None
        owner_url = normalise_url(f"{self.ehr_scope.base.text}/{ref}")
        headers = {"Accept": "application/fhir+json", "Accept-Encoding": "identity"}
        with self._stream(owner_url, headers, self.auth) as r:
            # not there, or not ours to read (a scope without e.g. DocumentReference.r): the
            # owner is not shown, so neither is the patient
            if r.status_code in (401, 403, 404, 410) or r.is_redirect:
                return False
            _check_status(r.status_code)
            owner = self._read_json(_until(r.iter_bytes(), deadline), MAX_OWNER_JSON_BYTES)
        rtype, rid = ref.split("/", 1)
        if owner.get("resourceType") != rtype or owner.get("id") != rid:
            return False
        for element in ("subject", "patient"):
            if self._ehr_reference(owner.get(element)) == patient_ref:
                return True
        return False

    def _ehr_reference(self, reference: Any) -> str | None:
        """`Type/id` of a FHIR Reference to a resource at the EHR (relative, or absolute under
        the EHR base; a version is dropped); None for anything else (contained, elsewhere)."""
        if not isinstance(reference, dict) or not isinstance(reference.get("reference"), str):
            return None
        ref: str | None = reference["reference"]
        if ref and "://" in ref:
            ref = self.ehr_scope.relative(ref) if self.ehr_scope is not None else None
        m = _REFERENCE.match(ref or "")
        return f"{m.group(1)}/{m.group(2)}" if m else None

    @contextmanager
    def _stream(self, target: _Url, headers: dict[str, str],
                auth: httpx.Auth | None) -> Iterator[httpx.Response]:
        """One GET, streamed; network failures and timeouts are retryable."""
        try:
            with self.client.stream("GET", target.text, headers=headers, auth=auth) as r:
                yield r
        except httpx.TimeoutException as exc:
            raise AttachmentUnavailable(f"attachment fetch timed out ({type(exc).__name__})") \
                from None
        except httpx.HTTPError as exc:  # connect errors, resets, protocol errors
            raise AttachmentUnavailable(f"attachment fetch failed ({type(exc).__name__})") \
                from None

    def _check_length(self, r: httpx.Response) -> None:
        declared = r.headers.get("content-length")
        if declared is not None and not r.headers.get("content-encoding"):
            try:
                too_large = int(declared) > self.max_bytes
            except ValueError:
                return
            if too_large:
                raise AttachmentRefused("too-large", f"attachment is larger than "
                                        f"{self.max_bytes} bytes")

    def _binary_json_limit(self) -> int:
        return min(MAX_BINARY_JSON_BYTES, self.max_bytes * 4 // 3 + 65536)

    @staticmethod
    def _read_json(chunks: Iterator[bytes], limit: int) -> dict[str, Any]:
        raw = bytearray()
        for chunk in chunks:
            raw += chunk
            if len(raw) > limit:
                raise AttachmentRefused("too-large", "FHIR resource answered is too large")
        try:
            doc = json.loads(bytes(raw))
        except (ValueError, UnicodeDecodeError):
            doc = None
        if not isinstance(doc, dict):
            raise AttachmentRefused("bad-content", "answer is not a FHIR JSON resource")
        return doc

    def _store_binary(self, doc: dict[str, Any], blobs: BlobStore) -> Fetched:
        """The source answered with a FHIR Binary resource (JSON): decode its `data`."""
        try:
            if doc.get("resourceType") != "Binary":
                raise ValueError
            data = base64.b64decode("".join(str(doc.get("data", "")).split()), validate=True)
        except (ValueError, binascii.Error):
            raise AttachmentRefused("bad-content", "answer is FHIR JSON but no Binary with "
                                    "base64 data") from None
        if not data:
            raise AttachmentRefused("bad-content", "Binary answered has no data")
        if len(data) > self.max_bytes:
            raise AttachmentRefused("too-large", f"attachment is larger than {self.max_bytes} "
                                    "bytes")
        rel, digest = blobs.put(data)
        ctype = str(doc.get("contentType") or "").split(";", 1)[0].strip().lower()
        return Fetched(rel, digest, len(data), ctype)


def _check_status(status: int) -> None:
    if status == 429 or status >= 500:
        raise AttachmentUnavailable(f"attachment source answered HTTP {status}")
    if status in (404, 410):
        raise AttachmentRefused("not-found", f"attachment source answered HTTP {status}")
    if status != 200:
        raise AttachmentRefused("http-error", f"attachment source answered HTTP {status}")


def _until(chunks: Iterator[bytes], deadline: float) -> Iterator[bytes]:
    for chunk in chunks:
        if time.monotonic() > deadline:
            raise AttachmentUnavailable("attachment fetch passed its deadline")
        yield chunk


def _local(local: str | LocalBinary, blobs: BlobStore) -> Fetched:
    if isinstance(local, str):
        local = LocalBinary(local)
    path: Path = blobs.path(local.blob_path)
    size = local.size if local.size >= 0 else path.stat().st_size
    digest = local.sha256 or Path(local.blob_path).name  # content-addressed: the name is it
    return Fetched(local.blob_path, digest, size, local.content_type)
