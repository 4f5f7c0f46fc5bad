"""A test OAuth2 / SMART on FHIR identity provider on loopback, written for the suite.

It serves what a real authorization server serves (RFC 7517 JWKS, SMART App Launch 2.x
`.well-known/smart-configuration`, RFC 6749 token endpoint) and signs tokens with its own keys:
- `mint(...)`: an access token for fhirbridge's inbound checks (any claims, any key, any alg);
- `POST /token`: SMART Backend Services (client_credentials + private_key_jwt, RFC 7523),
  verified strictly: the registered client's key, `aud` = this token URL, iss = sub =
  client_id, `exp` at most 5 min ahead, a `jti` never seen before. It issues JWT access tokens
  and remembers them (`issued`), so an auth-checking proxy can ask `was_issued(token)`.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.support.phi import seed

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def private_pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    """The public half of `key` as a JWK (RFC 7517) with kid, alg and use=sig."""
    algo = jwt.algorithms.RSAAlgorithm if alg.startswith(("RS", "PS")) else jwt.algorithms.ECAlgorithm
    jwk = json.loads(algo.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


@dataclass
class Client:
    """A backend-services client registered with its public key."""

    client_id: str
    public_key: Any
    scope: str = "system/Patient.rs system/ImagingStudy.cru system/Binary.r"


@dataclass
class IdentityProvider:
    """Start with `start()`; `issuer` is its base URL, `jwks_url`, `token_url` its endpoints."""

    token_lifetime: int = 300
    keys: dict[str, tuple[Any, str]] = field(default_factory=dict)  # kid -> (key, alg)
    clients: dict[str, Client] = field(default_factory=dict)
    issued: set[str] = field(default_factory=set)
    seen_jti: set[str] = field(default_factory=set)
    token_requests: list[dict[str, Any]] = field(default_factory=list)  # accepted and refused
    jwks_reads: int = 0
    fail_token_requests: int = 0  # answer the next N token requests 503
    assertions: list[str] = field(default_factory=list)  # client_assertion of each token request

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.rsa_kid = "idp-rs-1"
        self.ec_kid = "idp-ec-1"
        self.keys[self.rsa_kid] = (rsa_key(), "RS256")
        self.keys[self.ec_kid] = (ec_key(), "ES384")
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> IdentityProvider:
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                if self.path.split("?")[0] == "/.well-known/jwks.json":
                    with idp._lock:
                        idp.jwks_reads += 1
                    self._json(200, idp.jwks())
                elif self.path.split("?")[0] == "/.well-known/smart-configuration":
                    self._json(200, idp.smart_configuration())
                else:
                    self._json(404, {"error": "not_found"})

            def do_POST(self) -> None:  # noqa: N802
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n).decode()
                if self.path.split("?")[0] != "/token":
                    self._json(404, {"error": "not_found"})
                    return
                status, answer = idp._token(parse_qs(body))
                self._json(status, answer)

            def _json(self, status: int, doc: dict[str, Any]) -> None:
                raw = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(raw)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True, name="test-idp").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> IdentityProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def issuer(self) -> str:
        assert self._server is not None, "start() the identity provider first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}/.well-known/jwks.json"

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/token"

    # -- documents ------------------------------------------------------------------------
    def jwks(self) -> dict[str, Any]:
        with self._lock:
            keys = list(self.keys.items())
        return {"keys": [public_jwk(k, kid, alg) for kid, (k, alg) in keys]}

    def smart_configuration(self) -> dict[str, Any]:
        return {"issuer": self.issuer, "jwks_uri": self.jwks_url,
                "token_endpoint": self.token_url,
                "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
                "grant_types_supported": ["client_credentials"],
                "scopes_supported": ["system/*.rs"],
                "capabilities": ["client-confidential-asymmetric"]}

    def rotate(self, alg: str = "RS256") -> str:
        """Add a new signing key (a new kid) and return its kid."""
        kid = f"idp-{alg.lower()}-{uuid.uuid4().hex[:8]}"
        with self._lock:
            self.keys[kid] = (rsa_key() if alg.startswith("RS") else ec_key(), alg)
        return kid

    # -- tokens for fhirbridge's inbound checks --------------------------------------------
    def mint(self, scope: str = "system/Media.c system/Task.rs", *, sub: str = "portal-1",
             client_id: str = "portal", audience: str | list[str] | None = None,
             issuer: str | None = None, patient: str = "", lifetime: int = 300,
             not_before: int | None = None, kid: str | None = None, alg: str | None = None,
             key: Any = None, extra: dict[str, Any] | None = None,
             headers: dict[str, Any] | None = None) -> str:
        """An access token signed by this IdP's key `kid` (default: its RSA key), or by `key`
        (another key: a forgery). `audience` defaults to "" - callers pass fhirbridge's base."""
        kid = kid or self.rsa_kid
        own_key, own_alg = self.keys.get(kid, (None, "RS256"))
        now = int(time.time())
        claims: dict[str, Any] = {"iss": issuer if issuer is not None else self.issuer,
                                  "sub": sub, "client_id": client_id, "scope": scope,
                                  "iat": now, "exp": now + lifetime, "jti": uuid.uuid4().hex}
        if audience is not None:
            claims["aud"] = audience
        if not_before is not None:
            claims["nbf"] = not_before
        if patient:
            claims["patient"] = patient
        claims.update(extra or {})
        token = jwt.encode(claims, key if key is not None else own_key, algorithm=alg or own_alg,
                           headers={"kid": kid, **(headers or {})})
        with self._lock:
            self.issued.add(token)
        seed(token)  # the session's log scan: no token in any log line
        return token

    def was_issued(self, token: str) -> bool:
        with self._lock:
            return token in self.issued

    # -- SMART Backend Services token endpoint -----------------------------------------------
    def register_client(self, client_id: str, public_key: Any, scope: str | None = None) -> None:
        self.clients[client_id] = Client(client_id, public_key, scope or Client.scope)

    def _token(self, form: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.assertions.append((form.get("client_assertion") or [""])[0])
            if self.fail_token_requests > 0:
                self.fail_token_requests -= 1
                return 503, {"error": "temporarily_unavailable"}
        status, answer = self._verify_token_request({k: v[0] for k, v in form.items()})
        with self._lock:
            self.token_requests.append({"status": status, **answer})
        return status, answer

    def _verify_token_request(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        def refuse(why: str) -> tuple[int, dict[str, Any]]:
            return 400 if why != "invalid_client" else 401, {"error": why}

        if form.get("grant_type") != "client_credentials":
            return refuse("unsupported_grant_type")
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            return refuse("invalid_request")
        assertion = form.get("client_assertion", "")
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            return refuse("invalid_client")
        client = self.clients.get(str(unverified.get("iss")))
        if client is None or unverified.get("sub") != client.client_id:
            return refuse("invalid_client")
        if header.get("alg") not in ("RS384", "ES384") or not header.get("kid"):
            return refuse("invalid_client")
        try:
            claims = jwt.decode(assertion, client.public_key, algorithms=["RS384", "ES384"],
                                audience=self.token_url, issuer=client.client_id,
                                options={"require": ["exp", "jti", "iss", "sub", "aud"]})
        except jwt.PyJWTError:
            return refuse("invalid_client")
        if int(claims["exp"]) > time.time() + 300 + 5:
            return refuse("invalid_client")  # SMART: exp no more than five minutes ahead
        with self._lock:
            if claims["jti"] in self.seen_jti:
                return refuse("invalid_client")  # a replayed assertion
            self.seen_jti.add(claims["jti"])
        wanted = form.get("scope", "").split()
        allowed = set(client.scope.split())
        granted = [s for s in wanted if s in allowed] or sorted(allowed)
        token = self.mint(" ".join(granted), sub=client.client_id, client_id=client.client_id,
                          audience="ehr", lifetime=self.token_lifetime)
        return 200, {"access_token": token, "token_type": "bearer",
                     "expires_in": self.token_lifetime, "scope": " ".join(granted)}
