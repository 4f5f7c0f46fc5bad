"""Inbound OAuth2 bearer tokens (SMART on FHIR): JWT verification, scopes, request dependencies.

RFC 6750 (bearer tokens, WWW-Authenticate), RFC 7519 / RFC 7517 (JWT, JWKS), SMART App Launch
2.x scopes (v2 `context/Type.cruds`, v1 `.read|.write|.*`) and `/.well-known/smart-configuration`.
"""

from __future__ import annotations

import ipaddress
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from fhirbridge.fhir.outcome import FhirError, operation_outcome

if TYPE_CHECKING:
    from fhirbridge.config import Settings

REALM = "fhirbridge"
# RFC 7518 3.1: asymmetric signatures only. `none` and HMAC (HS*) are refused outright, so a
# token "signed" with the issuer's public key as an HMAC secret never reaches a key.
ALGORITHMS = ("RS256", "RS384", "ES256", "ES384")
_CURVE = {"ES256": "secp256r1", "ES384": "secp384r1"}
OPERATOR_SCOPE = "fhirbridge/operator"
REFETCH_SECONDS = 10.0  # an unknown kid re-reads the JWKS at most this often (flood guard)
FAILED_FETCH_SECONDS = 5.0  # after the JWKS could not be read, 503 for this long, no re-try
JWKS_TIMEOUT = 5.0
FAILED_METADATA_SECONDS = 30.0  # the issuer's configuration unreadable: not re-asked sooner
_PATIENT_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # FHIR R4 id


# --- the caller ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Caller:
    """Who made the request, as proven by the credential (never by the request body)."""

    kind: str  # "token" (a verified JWT) | "loopback" (no [auth], loopback client)
    #            | "admin-token" (http.admin_token on /admin, /review)
    sub: str = ""  # token "sub"
    client_id: str = ""  # token "client_id" (or "azp")
    scopes: frozenset[str] = frozenset()
    patient: str = ""  # patient-bound token: the EHR Patient id from the "patient" claim
    address: str = ""  # the client's IP address

    @property
    def who(self) -> str:
        """A display id for audit and reviewers (never a token)."""
        if self.sub:
            return self.sub
        if self.client_id:
            return self.client_id
        if self.kind == "admin-token":
            return "admin-token"
        return f"loopback@{self.address}"

    @property
    def bound_patient(self) -> str:
        """`Patient/{id}` when the request is limited to one patient, else ""."""
        return f"Patient/{self.patient}" if self.patient else ""


def caller_of(request: Any) -> Caller | None:
    """The caller proven for this request (set before any scope check), or None."""
    return getattr(request.state, "caller", None)


def note_audit(request: Any, entity: str, patient: str = "") -> None:
    """Name a resource (and its patient) the request touched, for the AuditEvent (IHE BALP)."""
    entities = getattr(request.state, "audit_entities", None)
    if entities is None:
        entities = []
        request.state.audit_entities = entities
    entities.append((entity, patient))


def is_loopback(host: str) -> bool:
    """The one rule for "a client on this machine" (operator routes, /fhir without [auth])."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in ("localhost", "testclient")  # starlette's TestClient


# --- errors that carry WWW-Authenticate (RFC 6750 3) ------------------------------------------

class AuthError(FhirError):
    """A FhirError answered with extra headers (WWW-Authenticate, Retry-After)."""

    def __init__(self, status: int, code: str, text: str, headers: dict[str, str]) -> None:
        super().__init__(status, code, text)
        self.headers = headers


def unauthorized(text: str | None = None) -> AuthError:
    """401: no token (no `error`, RFC 6750 3.1), or an invalid one (`invalid_token`)."""
    if text is None:
        return AuthError(401, "login", "this request needs an OAuth2 bearer token "
                         "(Authorization: Bearer ...)",
                         {"WWW-Authenticate": f'Bearer realm="{REALM}"'})
    return AuthError(401, "login", text, {
        "WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token"'})


def forbidden(text: str, scope: str = "") -> AuthError:
    """403 for a proven caller that may not do this (RFC 6750 3.1 insufficient_scope)."""
    header = f'Bearer realm="{REALM}", error="insufficient_scope"'
    if scope:
        header += f', scope="{scope}"'
    return AuthError(403, "forbidden", text, {"WWW-Authenticate": header})


def unavailable(text: str) -> AuthError:
    return AuthError(503, "transient", text, {"Retry-After": "5"})


def install_auth_errors(app: FastAPI) -> None:
    """The OperationOutcome answer of an AuthError, with its headers."""
    import json

    @app.exception_handler(AuthError)
    async def _auth_error(_: Request, exc: AuthError) -> Response:
        body = operation_outcome(exc.code, exc.text)
        return Response(json.dumps(body), status_code=exc.status,
                        media_type="application/fhir+json", headers=exc.headers)


# --- SMART scopes (pure) ---------------------------------------------------------------------

@dataclass(frozen=True)
class Scope:
    """One SMART resource scope: `patient|user|system` / type or `*` . permissions."""

    context: str
    resource: str
    perms: frozenset[str]  # subset of c r u d s
    restricted: bool = False  # `?param=value`: grants less than the bare scope


_SCOPE = re.compile(r"^(patient|user|system)/([A-Z][A-Za-z]{0,63}|\*)\.([a-z*]+)(\?.*)?$")
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}  # SMART v1 → v2 (App Launch 2.0 3.4)


def parse_scope(text: str) -> Scope | None:
    """A SMART v2 (`system/Media.c`, `patient/Task.rs`) or v1 (`user/Binary.read`,
    `system/*.*`) resource scope, or None for anything else (openid, launch, ...)."""
    m = _SCOPE.match(text)
    if m is None:
        return None
    context, resource, perms, query = m.groups()
    if perms in _V1:
        letters = _V1[perms]
    elif re.fullmatch(r"c?r?u?d?s?", perms):  # v2: the letters in this order, each once
        letters = perms
    else:
        return None
    return Scope(context, resource, frozenset(letters), restricted=bool(query))


Grant = Literal["all", "patient"]


def grant(scopes: Iterable[str], resource_type: str, perm: str) -> Grant | None:
    """What the scopes allow for `perm` (one or more of c r u d s, all needed) on
    `resource_type`: "all" (system/ or user/ scopes), "patient" (patient/ scopes needed for
    some letter: limited to the token's patient), or None. A scope with a `?param=`
    restriction grants nothing here: ignoring the restriction would widen it (SMART App
    Launch 2.0 3.5)."""
    parsed = [s for s in map(parse_scope, scopes)
              if s is not None and not s.restricted and s.resource in ("*", resource_type)]
    if not perm:
        return None
    found: Grant = "all"
    for letter in perm:
        holders = {s.context for s in parsed if letter in s.perms}
        if holders & {"system", "user"}:
            continue
        if "patient" not in holders:
            return None
        found = "patient"
    return found


def is_operator(scopes: Iterable[str]) -> bool:
    """`system/*.*` / `user/*.*` (v1) or `.cruds` (v2), or the custom `fhirbridge/operator`."""
    for text in scopes:
        if text == OPERATOR_SCOPE:
            return True
        s = parse_scope(text)
        if (s is not None and not s.restricted and s.context in ("system", "user")
                and s.resource == "*" and s.perms == frozenset("cruds")):
            return True
    return False


def scopes_of(claims: dict[str, Any]) -> frozenset[str]:
    """RFC 8693 4.2 / SMART: `scope` is a space-separated string (a list is tolerated)."""
    raw = claims.get("scope", claims.get("scp", ""))
    if isinstance(raw, str):
        return frozenset(raw.split())
    if isinstance(raw, list):
        return frozenset(s for s in raw if isinstance(s, str))
    return frozenset()


# --- token verification ----------------------------------------------------------------------

class JwksUnavailable(Exception):
    """The issuer's key set could not be read: a 503, never a 401."""


class TokenVerifier:
    """Verify bearer JWTs against one issuer's JWKS (RFC 7517) with PyJWT.

    The key set is cached for `cache_seconds` (PyJWKClient's JWK-set cache); an unknown `kid`
    re-reads it at once, but at most every REFETCH_SECONDS, so a flood of made-up kids cannot
    turn into a flood of JWKS requests. Blocking: call from sync code (a threadpool)."""

    def __init__(self, *, issuer: str, audience: str, jwks_url: str, leeway: float = 60.0,
                 cache_seconds: float = 3600.0, refetch_seconds: float = REFETCH_SECONDS,
                 token_endpoint: str = "", authorization_endpoint: str = "") -> None:
        self.issuer = issuer
        self.audience = audience
        self.jwks_url = jwks_url
        self.leeway = leeway
        self.refetch_seconds = refetch_seconds
        self.configured_token_endpoint = token_endpoint
        self.configured_authorization_endpoint = authorization_endpoint
        # cache_keys stays off: its per-kid LRU never expires, so a key the issuer withdrew
        # would stay trusted; the JWK-set cache (parsed keys) expires after `lifespan`.
        self._client = jwt.PyJWKClient(jwks_url, cache_keys=False, cache_jwk_set=True,
                                       lifespan=cache_seconds, timeout=JWKS_TIMEOUT,
                                       cooldown_duration=0)
        self._lock = threading.Lock()
        self._last_refetch = float("-inf")
        self._failed_at = float("-inf")
        self._metadata: tuple[float, dict[str, Any]] | None = None
        self._cache_seconds = cache_seconds

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier | None:
        a = settings.auth
        if not a.issuer:
            return None
        issuer = a.issuer.rstrip("/")
        return cls(issuer=a.issuer, audience=a.audience or settings.fhir_base_url,
                   jwks_url=a.jwks_url or f"{issuer}/.well-known/jwks.json",
                   leeway=a.leeway_seconds, cache_seconds=a.jwks_cache_seconds,
                   token_endpoint=a.token_endpoint,
                   authorization_endpoint=a.authorization_endpoint)

    # -- keys ------------------------------------------------------------------------------
    def _signing_key(self, kid: str) -> jwt.PyJWK | None:
        with self._lock:
            now = time.monotonic()
            if now - self._failed_at < FAILED_FETCH_SECONDS:
                raise JwksUnavailable()
            try:
                key = self._client.match_kid(self._client.get_signing_keys(), kid)
                if key is None and now - self._last_refetch >= self.refetch_seconds:
                    self._last_refetch = now
                    key = self._client.match_kid(self._client.get_signing_keys(refresh=True),
                                                 kid)
            except jwt.PyJWKClientConnectionError:
                self._failed_at = time.monotonic()
                raise JwksUnavailable() from None
            except jwt.PyJWTError:  # not a JWKS, or no usable signing key in it
                self._failed_at = time.monotonic()
                raise JwksUnavailable() from None
            return key

    def _only_key_for(self, alg: str) -> jwt.PyJWK | None:
        """A token without `kid`: the issuer's one key that fits `alg`, or None when it has
        several (then the token must say which)."""
        with self._lock:
            if time.monotonic() - self._failed_at < FAILED_FETCH_SECONDS:
                raise JwksUnavailable()
            try:
                keys = self._client.get_signing_keys()
            except jwt.PyJWTError:
                self._failed_at = time.monotonic()
                raise JwksUnavailable() from None
        fitting = [k for k in keys if _key_fits(k.key, alg)]
        return fitting[0] if len(fitting) == 1 else None

    # -- tokens ----------------------------------------------------------------------------
    def verify(self, token: str) -> dict[str, Any]:
        """The verified claims, or AuthError 401 (JwksUnavailable when keys cannot be read)."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise unauthorized("the bearer token is not a well-formed JWT") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise unauthorized("the bearer token is signed with an algorithm that is not "
                               "accepted (RS256, RS384, ES256 or ES384 only)")
        kid = header.get("kid")
        if kid is None:
            jwk = self._only_key_for(alg)  # RFC 7515 4.1.4: kid is optional
        elif not isinstance(kid, str) or not kid:
            raise unauthorized("the bearer token names no signing key (kid)")
        else:
            jwk = self._signing_key(kid)
        if jwk is None:
            raise unauthorized("the bearer token's signing key is not one of the issuer's keys")
        declared = jwk.algorithm_name if "alg" in getattr(jwk, "_jwk_data", {}) else None
        if not _key_fits(jwk.key, alg) or (declared and declared != alg):
            raise unauthorized("the bearer token's algorithm does not match its signing key")
        try:
            return jwt.decode(token, jwk.key, algorithms=[alg], audience=self.audience,
                              issuer=self.issuer, leeway=self.leeway,
                              options={"require": ["iss", "aud", "exp"]})
        except jwt.ExpiredSignatureError:
            raise unauthorized("the bearer token has expired") from None
        except jwt.ImmatureSignatureError:
            raise unauthorized("the bearer token is not valid yet (nbf or iat)") from None
        except jwt.InvalidAudienceError:
            raise unauthorized("the bearer token is meant for another audience") from None
        except jwt.InvalidIssuerError:
            raise unauthorized("the bearer token comes from another issuer") from None
        except jwt.MissingRequiredClaimError:
            raise unauthorized("the bearer token lacks a required claim (iss, aud, exp)") \
                from None
        except jwt.InvalidSignatureError:
            raise unauthorized("the bearer token's signature does not verify") from None
        except jwt.PyJWTError:
            raise unauthorized("the bearer token is not valid") from None

    def caller(self, token: str, address: str) -> Caller:
        claims = self.verify(token)
        patient = claims.get("patient", "")
        if not isinstance(patient, str):
            patient = ""
        patient = patient.removeprefix("Patient/")
        if patient and not _PATIENT_ID.match(patient):
            raise unauthorized("the bearer token's patient claim is not a Patient id")
        client_id = claims.get("client_id") or claims.get("azp") or ""
        sub = claims.get("sub") or ""
        return Caller(kind="token", sub=sub if isinstance(sub, str) else "",
                      client_id=client_id if isinstance(client_id, str) else "",
                      scopes=scopes_of(claims), patient=patient, address=address)

    # -- the issuer's metadata (for our smart-configuration) --------------------------------
    def issuer_metadata(self) -> dict[str, Any]:
        """The issuer's own SMART or OpenID configuration (cached); {} when unreadable."""
        now = time.monotonic()
        cached = self._metadata
        if cached is not None and now - cached[0] < (self._cache_seconds if cached[1]
                                                     else FAILED_METADATA_SECONDS):
            return cached[1]
        base = self.issuer.rstrip("/")
        for path in ("/.well-known/smart-configuration", "/.well-known/openid-configuration"):
            try:
                r = httpx.get(base + path, timeout=JWKS_TIMEOUT,
                              headers={"Accept": "application/json"})
                doc = r.json() if r.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                doc = None
            if isinstance(doc, dict) and isinstance(doc.get("token_endpoint"), str):
                self._metadata = (now, doc)
                return doc
        self._metadata = (now, {})  # unreadable: asked again after FAILED_METADATA_SECONDS
        return {}


def _key_fits(key: Any, alg: str) -> bool:
    """RFC 7518 3.3 / 3.4: RS* needs an RSA key; ES256 a P-256 key, ES384 a P-384 key."""
    if alg.startswith("RS"):
        return isinstance(key, rsa.RSAPublicKey)
    return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == _CURVE[alg]


# --- request dependencies --------------------------------------------------------------------

def _services(request: Request) -> Any:
    return request.app.state.services


def _address(request: Request) -> str:
    return request.client.host if request.client else ""


def bearer_token(request: Request) -> str | None:
    """The token of `Authorization: Bearer <token>` (RFC 6750 2.1), None when absent."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized("the Authorization header is not a bearer token")
    return token.strip()


def _verify(verifier: TokenVerifier, token: str, address: str) -> Caller:
    try:
        return verifier.caller(token, address)
    except JwksUnavailable:
        raise unavailable("the authorization server's signing keys cannot be read now; "
                          "retry later") from None


def authenticate(request: Request) -> Caller:
    """The proven caller of a /fhir request, set on request.state before any scope check.

    Without [auth]: loopback clients only (403 otherwise). With [auth]: a valid bearer JWT."""
    known = caller_of(request)
    if known is not None:
        return known
    verifier: TokenVerifier | None = getattr(_services(request), "verifier", None)
    address = _address(request)
    if verifier is None:
        if not is_loopback(address):
            raise FhirError(403, "security", "without [auth] configured, /fhir answers "
                            "clients on this machine only")
        caller = Caller(kind="loopback", address=address)
    else:
        token = bearer_token(request)
        if token is None:
            raise unauthorized()
        caller = _verify(verifier, token, address)
    request.state.caller = caller
    return caller


def authorize(caller: Caller, resource_type: str, perm: str) -> Caller:
    """The caller as allowed for `perm` on `resource_type`: patient-bound (patient set) when
    only patient/ scopes allow it, unbound (patient "") when a system/ or user/ scope does;
    403 otherwise."""
    if caller.kind != "token":
        return caller  # loopback without [auth]: the machine's own users
    wanted = f"system/{resource_type}.{perm}"
    how = grant(caller.scopes, resource_type, perm)
    if how is None:
        raise forbidden(f"the token's scopes do not allow this ({wanted} or an equivalent "
                        "is needed)", wanted)
    if how == "all":
        return replace(caller, patient="")
    if not caller.patient:
        raise forbidden("a patient/ scope needs a patient claim in the token", wanted)
    return caller


def require_scope(resource_type: str, perm: str) -> Callable[[Request], Caller]:
    """A route dependency (runs before the body is read): authenticated and allowed `perm`
    (c r u d s, SMART v2) on `resource_type`. Returns the effective Caller."""

    def dependency(request: Request) -> Caller:
        caller = authorize(authenticate(request), resource_type, perm)
        request.state.caller = caller  # the effective caller: patient set = bound
        return caller

    dependency.__name__ = f"require_{resource_type}_{perm}"
    return dependency


def operator_caller(request: Request) -> Caller:
    """Operator routes (/review, /admin, /ui): `http.admin_token`; with [auth], also a JWT
    with `system/*.*` / `user/*.*` or `fhirbridge/operator`; with neither credential given and
    no admin token configured, a loopback client. Sets request.state.caller."""
    import hmac

    svc = _services(request)
    admin = svc.settings.http.admin_token
    verifier: TokenVerifier | None = getattr(svc, "verifier", None)
    address = _address(request)
    header = request.headers.get("authorization", "")
    if admin and hmac.compare_digest(header.encode(), f"Bearer {admin}".encode()):
        caller = Caller(kind="admin-token", address=address)
        request.state.caller = caller
        return caller
    if verifier is not None and header:
        token = bearer_token(request)
        assert token is not None
        caller = _verify(verifier, token, address)
        request.state.caller = caller
        if not is_operator(caller.scopes):
            raise forbidden("operator endpoints need the fhirbridge/operator scope",
                            OPERATOR_SCOPE)
        return caller
    if admin:
        raise FhirError(401, "security", "operator endpoints need the admin bearer token")
    if not is_loopback(address):
        raise FhirError(403, "security", "operator endpoints answer loopback clients only "
                        "unless http.admin_token is set")
    caller = Caller(kind="loopback", address=address)
    request.state.caller = caller
    return caller


# --- /fhir/.well-known/smart-configuration (SMART App Launch 2.0.0, 2.1) ---------------------

router = APIRouter()

SCOPES_SUPPORTED = [
    "system/Media.c", "system/DocumentReference.c", "system/Binary.c", "system/Binary.r",
    "system/Media.r", "system/DocumentReference.r", "system/Task.rs",
    "system/ImagingStudy.rs", "system/AuditEvent.rs",
    "user/Media.c", "user/DocumentReference.c", "user/Binary.c", "user/Task.rs",
    "user/ImagingStudy.rs",
    "patient/Media.c", "patient/DocumentReference.c", "patient/Binary.c", "patient/Binary.r",
    "patient/Media.r", "patient/DocumentReference.r", "patient/Task.rs",
    "patient/ImagingStudy.rs", OPERATOR_SCOPE,
]


def oauth_uris(verifier: TokenVerifier) -> dict[str, str]:
    """token / authorize endpoints: configured, else the issuer's own metadata."""
    meta: dict[str, Any] = {}
    if not verifier.configured_token_endpoint or not verifier.configured_authorization_endpoint:
        meta = verifier.issuer_metadata()
    out = {}
    token = verifier.configured_token_endpoint or meta.get("token_endpoint")
    authorize_ = verifier.configured_authorization_endpoint or meta.get("authorization_endpoint")
    if isinstance(token, str) and token:
        out["token"] = token
    if isinstance(authorize_, str) and authorize_:
        out["authorize"] = authorize_
    return out


@router.get("/fhir/.well-known/smart-configuration")
def smart_configuration(request: Request) -> Response:
    import json

    verifier: TokenVerifier | None = getattr(_services(request), "verifier", None)
    if verifier is None:
        raise FhirError(404, "not-found", "no token authorization is configured ([auth]); "
                        "/fhir answers clients on this machine only")
    uris = oauth_uris(verifier)
    if "token" not in uris:
        raise unavailable("the authorization server's metadata cannot be read now; "
                          "retry later")
    doc: dict[str, Any] = {
        "issuer": verifier.issuer,
        "jwks_uri": verifier.jwks_url,
        "token_endpoint": uris["token"],
        "grant_types_supported": ["client_credentials"]
        + (["authorization_code"] if "authorize" in uris else []),
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "scopes_supported": SCOPES_SUPPORTED,
        "capabilities": ["client-confidential-asymmetric", "permission-v2", "permission-v1",
                         "permission-patient", "permission-user"],
    }
    if "authorize" in uris:
        doc["authorization_endpoint"] = uris["authorize"]
        doc["code_challenge_methods_supported"] = ["S256"]
        doc["response_types_supported"] = ["code"]
    return Response(json.dumps(doc), media_type="application/json",
                    headers={"Cache-Control": "max-age=300"})
