"""Outbound credentials for the EHR: a static bearer token, or SMART Backend Services.

SMART App Launch 2.x "Backend Services" (client_credentials grant, private_key_jwt client
authentication per RFC 7523 2.2 / RFC 7521 4.2); credentials go only to URLs under the EHR base.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fhirbridge.adapters.attachments import UrlScope
from fhirbridge.adapters.ehr import EhrRefused, EhrUnavailable

__all__ = ["ASSERTION_TYPE", "BearerAuth", "EhrAuth", "EhrAuthConfigError", "SmartBackendAuth",
           "build_ehr_auth", "load_private_key"]

log = logging.getLogger("fhirbridge.ehr.auth")

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"  # RFC 7523 2.2
# SMART Backend Services: the assertion's exp is no more than five minutes after now; four
# leaves room for a token server whose clock runs a little behind ours.
ASSERTION_LIFETIME = 240
REFRESH_MARGIN = 60.0  # seconds before expires_in at which a cached access token is replaced
DEFAULT_EXPIRES_IN = 300  # a token answer without expires_in (SMART says it SHALL have one)
_OAUTH_ERROR = re.compile(r"^[a-z_]{1,40}$")  # RFC 6749 5.2 error codes; anything else dropped


class EhrAuthConfigError(ValueError):
    """`[ehr]` credentials are set up wrongly: the message names the key (start-up error)."""


class EhrAuth(httpx.Auth):
    """An `httpx.Auth` that adds credentials only to requests under the EHR's FHIR base.

    The one place that rule lives: `FhirEhr` and `AttachmentFetcher` share one instance and
    neither client follows redirects by itself, so every hop passes through `auth_flow`."""

    def __init__(self, fhir_url: str) -> None:
        self.scope = UrlScope(fhir_url)

    def covers(self, url: str | httpx.URL) -> bool:
        return self.scope.covers(str(url))

    def credentials(self) -> str:  # pragma: no cover - subclasses
        raise NotImplementedError

    def invalidate(self, credentials: str) -> bool:
        """The EHR refused `credentials` (401): drop them; True when new ones may help."""
        return False

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if not self.covers(request.url):
            request.headers.pop("Authorization", None)
            yield request
            return
        token = self.credentials()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401 and self.invalidate(token):
            # RFC 6750 3.1 invalid_token: one new token and one retry, never a loop
            request.headers["Authorization"] = f"Bearer {self.credentials()}"
            yield request


class BearerAuth(EhrAuth):
    """`[ehr] auth = "bearer"`: one static token, for simple sites (RFC 6750 2.1)."""

    def __init__(self, fhir_url: str, token: str) -> None:
        super().__init__(fhir_url)
        self._token = token

    def credentials(self) -> str:
        return self._token


class SmartBackendAuth(EhrAuth):
    """`[ehr] auth = "smart-backend"`: access tokens from the EHR's token endpoint, obtained
    with a signed JWT assertion, cached until shortly before they expire, shared by every
    thread of the process (one lock; one token request at a time).

    Token endpoint: `token_url`, else `{fhir_url}/.well-known/smart-configuration`'s
    `token_endpoint` (SMART App Launch 2.x, Conformance "Using Well-Known"), read once.
    Unreachable, 429 or 5xx: `EhrUnavailable` (retry later). Refused (400/401, no token):
    `EhrRefused` with a plain text that holds neither the assertion nor any token."""

    def __init__(self, fhir_url: str, *, client_id: str, private_key: Any, key_id: str,
                 scope: str, token_url: str = "", timeout: float = 15.0,
                 transport: httpx.BaseTransport | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(fhir_url)
        self.fhir_url = fhir_url.rstrip("/")
        self.client_id = client_id
        self.key_id = key_id
        self.scope_text = scope
        self._key = private_key
        self.algorithm = _algorithm_for(private_key)
        self._token_url = token_url
        self._clock = clock
        self._lock = threading.Lock()
        self._token = ""
        self._fresh_until = 0.0
        self.token_requests = 0  # how many access tokens were asked for (metrics, tests)
        # the token endpoint is not the EHR: no Authorization, no redirects, no proxies from env
        self._http = httpx.Client(timeout=timeout, transport=transport, follow_redirects=False,
                                  trust_env=False)

    def close(self) -> None:
        self._http.close()

    # -- the assertion (RFC 7523 3, SMART Backend Services "Authentication JWT") -----------
    def assertion(self, token_url: str) -> str:
        now = int(time.time())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": token_url,
                  "iat": now, "exp": now + ASSERTION_LIFETIME,
                  "jti": str(uuid.uuid4())}  # fresh every time: servers refuse a replay
        return jwt.encode(claims, self._key, algorithm=self.algorithm,
                          headers={"kid": self.key_id, "typ": "JWT"})

    # -- the access token ------------------------------------------------------------------
    def credentials(self) -> str:
        with self._lock:
            if self._token and self._clock() < self._fresh_until:
                return self._token
            self._token = ""
            asked_at = self._clock()
            token, lifetime = self._request_token()
            margin = min(REFRESH_MARGIN, lifetime / 5)
            self._token, self._fresh_until = token, asked_at + lifetime - margin
            return token

    def invalidate(self, credentials: str) -> bool:
        with self._lock:
            if self._token == credentials:  # another thread may have replaced it already
                self._token = ""
        return True

    def token_endpoint(self) -> str:
        """`token_url`, else discovered once from the EHR's smart-configuration."""
        if self._token_url:
            return self._token_url
        url = f"{self.fhir_url}/.well-known/smart-configuration"
        try:
            r = self._http.get(url, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise EhrUnavailable(f"the EHR's SMART configuration could not be read "
                                 f"({type(exc).__name__})") from None
        if r.status_code == 429 or r.status_code >= 500:
            raise EhrUnavailable(f"the EHR's SMART configuration answered HTTP {r.status_code}")
        endpoint = ""
        if r.status_code == 200:
            try:
                doc = r.json()
                endpoint = doc.get("token_endpoint", "") if isinstance(doc, dict) else ""
            except ValueError:
                endpoint = ""
        if not isinstance(endpoint, str) or not UrlScope.is_http_url(endpoint):
            raise EhrRefused("the EHR publishes no SMART configuration with a token endpoint; "
                             "set [ehr] token_url")
        self._token_url = endpoint
        return endpoint

    def _request_token(self) -> tuple[str, float]:
        token_url = self.token_endpoint()
        form = {"grant_type": "client_credentials", "scope": self.scope_text,
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": self.assertion(token_url)}
        self.token_requests += 1
        try:
            r = self._http.post(token_url, data=form, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise EhrUnavailable(f"the EHR's token endpoint could not be reached "
                                 f"({type(exc).__name__})") from None
        if r.status_code == 429 or r.status_code >= 500:
            raise EhrUnavailable(f"the EHR's token endpoint answered HTTP {r.status_code}")
        try:
            doc = r.json()
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            doc = {}
        if r.status_code != 200:
            code = doc.get("error")
            why = f", {code}" if isinstance(code, str) and _OAUTH_ERROR.match(code) else ""
            log.warning("the EHR's token endpoint refused fhirbridge's client credentials "
                        "(HTTP %s%s)", r.status_code, why)
            raise EhrRefused(f"the EHR's token endpoint refused fhirbridge's client credentials "
                             f"(HTTP {r.status_code}{why}); check [ehr] client_id, key_id and "
                             f"the public key registered at the EHR")
        token = doc.get("access_token")
        kind = doc.get("token_type")
        if not isinstance(token, str) or not token or not isinstance(kind, str) \
                or kind.lower() != "bearer":
            raise EhrRefused("the EHR's token endpoint answered without a bearer access token")
        expires_in = doc.get("expires_in", DEFAULT_EXPIRES_IN)
        if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)) \
                or expires_in <= 0:
            expires_in = DEFAULT_EXPIRES_IN
        return token, float(expires_in)


# -- configuration ---------------------------------------------------------------------------

def load_private_key(pem: bytes) -> tuple[Any, str]:
    """A PEM private key and its JWS algorithm: RSA → RS384, EC P-384 → ES384 (the two SMART
    Backend Services names, SMART App Launch 2.x "Registering a client")."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise EhrAuthConfigError("[ehr] private_key_file: not an unencrypted PEM private "
                                 "key") from None
    return key, _algorithm_for(key)


def _algorithm_for(key: Any) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise EhrAuthConfigError("[ehr] private_key_file: an RSA key needs at least 2048 "
                                     "bits")
        return "RS384"
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1):
        return "ES384"
    raise EhrAuthConfigError("[ehr] private_key_file: must be an RSA key (RS384) or an EC "
                             "P-384 key (ES384)")


def build_ehr_auth(ehr: Any, *, transport: httpx.BaseTransport | None = None
                   ) -> EhrAuth | None:
    """The one auth object for `[ehr]` (`fhirbridge.config.EhrSettings`), shared by the FHIR
    client and the attachment fetcher; None for `auth = "none"`. A wrong set-up raises
    `EhrAuthConfigError` naming the key."""
    mode = (ehr.auth or "none").strip().lower()
    if mode == "none":
        if ehr.bearer_token:
            raise EhrAuthConfigError('[ehr] bearer_token is set but [ehr] auth is "none"; set '
                                     '[ehr] auth = "bearer" to send it')
        return None
    if mode not in ("bearer", "smart-backend"):
        raise EhrAuthConfigError('[ehr] auth must be "none", "bearer" or "smart-backend"')
    if not ehr.fhir_url:
        raise EhrAuthConfigError(f'[ehr] auth = "{mode}" needs [ehr] fhir_url')
    if not UrlScope.is_http_url(ehr.fhir_url):
        raise EhrAuthConfigError("[ehr] fhir_url must be an absolute http(s) URL")
    if mode == "bearer":
        if not ehr.bearer_token:
            raise EhrAuthConfigError('[ehr] auth = "bearer" needs [ehr] bearer_token')
        return BearerAuth(ehr.fhir_url, ehr.bearer_token)
    for key in ("client_id", "private_key_file", "key_id"):
        if not str(getattr(ehr, key) or "").strip():
            raise EhrAuthConfigError(f'[ehr] auth = "smart-backend" needs [ehr] {key}')
    if not str(ehr.scope or "").strip():
        raise EhrAuthConfigError('[ehr] auth = "smart-backend" needs [ehr] scope')
    if ehr.token_url and not UrlScope.is_http_url(ehr.token_url):
        raise EhrAuthConfigError("[ehr] token_url must be an absolute http(s) URL")
    try:
        pem = Path(ehr.private_key_file).read_bytes()
    except OSError:
        raise EhrAuthConfigError("[ehr] private_key_file cannot be read") from None
    key, _alg = load_private_key(pem)
    return SmartBackendAuth(ehr.fhir_url, client_id=ehr.client_id.strip(), private_key=key,
                            key_id=ehr.key_id.strip(), scope=" ".join(ehr.scope.split()),
                            token_url=ehr.token_url, timeout=ehr.timeout_seconds,
                            transport=transport)
