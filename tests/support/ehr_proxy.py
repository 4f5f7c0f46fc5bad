"""An auth-checking HTTP reverse proxy on loopback in front of the test FHIR server ("the EHR").

It answers 401 (RFC 6750 3.1, `WWW-Authenticate: Bearer error="invalid_token"`) to any request
whose `Authorization: Bearer` token was not issued by the given test `IdentityProvider` or has
expired, serves `/fhir/.well-known/smart-configuration` (SMART App Launch 2.x) pointing at the
IdP's token endpoint, and records every request so tests can assert what fhirbridge sent.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt

from tests.support.idp import IdentityProvider

# headers passed on to the FHIR server and back (hop-by-hop ones and Authorization stay here)
_FORWARD_REQUEST = ("accept", "content-type", "if-none-exist", "if-match", "prefer", "host")
_FORWARD_RESPONSE = ("content-type", "location", "etag", "last-modified", "content-location")


@dataclass(frozen=True)
class Seen:
    """One request as the proxy received it."""

    method: str
    path: str  # with the query
    token: str  # the bearer token, "" without one
    status: int  # what the proxy answered


class EhrProxy:
    """`EhrProxy(upstream_base, idp).start()`; `.fhir_url` is the protected FHIR base.

    `seen`: every request; `refused`: how many got 401; `refuse_next`: answer the next N
    token-bearing requests 401 although their token is good (a token the EHR revoked)."""

    def __init__(self, upstream_fhir_url: str, idp: IdentityProvider) -> None:
        self.upstream = upstream_fhir_url.rstrip("/")
        self.idp = idp
        self.seen: list[Seen] = []
        self.refuse_next = 0
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=30, trust_env=False)
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> EhrProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                status, headers, raw = proxy._handle(self.command, self.path,
                                                     dict(self.headers.items()), body)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _any  # noqa: N815

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True,
                         name="test-ehr-proxy").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self._client.close()

    def __enter__(self) -> EhrProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base(self) -> str:
        assert self._server is not None, "start() the proxy first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def fhir_url(self) -> str:
        return f"{self.base}/fhir"

    # -- what tests read --------------------------------------------------------------------
    @property
    def refused(self) -> int:
        with self._lock:
            return sum(1 for s in self.seen if s.status == 401)

    def requests(self, path_contains: str = "") -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if path_contains in s.path]

    def reset(self) -> None:
        with self._lock:
            self.seen.clear()
            self.refuse_next = 0

    # -- the proxy ----------------------------------------------------------------------------
    def _token_ok(self, token: str) -> bool:
        if not token or not self.idp.was_issued(token):
            return False
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return False
        return float(claims.get("exp", 0)) > time.time()

    def _handle(self, method: str, path: str, headers: dict[str, str],
                body: bytes) -> tuple[int, dict[str, str], bytes]:
        lower = {k.lower(): v for k, v in headers.items()}
        auth = lower.get("authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        bare = path.split("?", 1)[0]
        if method == "GET" and bare == "/fhir/.well-known/smart-configuration":
            self._record(Seen(method, path, token, 200))
            return 200, {"Content-Type": "application/json"}, json.dumps(
                self.idp.smart_configuration()).encode()
        with self._lock:
            revoked = bool(token) and self.refuse_next > 0
            if revoked:
                self.refuse_next -= 1
        if revoked or not self._token_ok(token):
            self._record(Seen(method, path, token, 401))
            outcome = {"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "login", "diagnostics": "invalid or no token"}]}
            return 401, {"Content-Type": "application/fhir+json",
                         "WWW-Authenticate": 'Bearer error="invalid_token"'}, \
                json.dumps(outcome).encode()
        if not bare.startswith("/fhir"):
            self._record(Seen(method, path, token, 404))
            return 404, {}, b""
        forward = {k: v for k, v in lower.items() if k in _FORWARD_REQUEST}
        upstream = self.upstream + path[len("/fhir"):]
        try:
            r = self._client.request(method, upstream, headers=forward, content=body or None)
        except httpx.HTTPError:
            self._record(Seen(method, path, token, 502))
            return 502, {}, b""
        self._record(Seen(method, path, token, r.status_code))
        out = {k: v for k, v in r.headers.items() if k.lower() in _FORWARD_RESPONSE}
        return r.status_code, out, r.content

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)
