"""Bearer JWT verification (fhirbridge.api.auth.TokenVerifier) against the test identity
provider's real JWKS on loopback: signature, algorithms, iss/aud/exp/nbf with leeway, key
caching and rotation; and the loopback rule of /fhir without [auth]."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fhirbridge.api.auth import AuthError, JwksUnavailable, TokenVerifier
from tests.support.idp import IdentityProvider, rsa_key
from tests.support.phi import seed

AUD = "https://fhirbridge.example/fhir"


def verifier(idp: IdentityProvider, **kw: Any) -> TokenVerifier:
    return TokenVerifier(issuer=idp.issuer, audience=AUD, jwks_url=idp.jwks_url, **kw)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forged(header: dict[str, Any], claims: dict[str, Any], sign: Any = None) -> str:
    head = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    token = head + "." + (b64(sign(head.encode())) if sign else "")
    seed(token)
    return token


def claims(idp: IdentityProvider, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": idp.issuer, "aud": AUD, "sub": "s", "scope": "system/Media.c",
            "iat": now, "exp": now + 300, **changes}


def refused(v: TokenVerifier, token: str) -> AuthError:
    with pytest.raises(AuthError) as exc:
        v.verify(token)
    assert exc.value.status == 401
    assert "invalid_token" in exc.value.headers["WWW-Authenticate"]
    assert token not in exc.value.text
    return exc.value


def test_valid_rs256_and_es384(idp: IdentityProvider) -> None:
    v = verifier(idp)
    got = v.caller(idp.mint("system/Media.c patient/Task.rs", audience=AUD, patient="p-1"),
                   "127.0.0.1")
    assert got.kind == "token" and got.sub == "portal-1" and got.client_id == "portal"
    assert got.scopes == {"system/Media.c", "patient/Task.rs"} and got.patient == "p-1"
    assert v.verify(idp.mint(audience=[AUD, "other"], kid=idp.ec_kid))["sub"] == "portal-1"


def test_time_claims_with_60s_leeway(idp: IdentityProvider) -> None:
    v = verifier(idp)
    v.verify(idp.mint(audience=AUD, lifetime=-30))  # expired 30 s ago: within the leeway
    assert "expired" in refused(v, idp.mint(audience=AUD, lifetime=-120)).text
    now = int(time.time())
    v.verify(idp.mint(audience=AUD, not_before=now + 30))
    assert "not valid yet" in refused(v, idp.mint(audience=AUD, not_before=now + 300)).text


@pytest.mark.parametrize("case", ["audience", "no-audience", "issuer", "other-key",
                                  "garbage", "no-exp", "unknown-kid"])
def test_refused(idp: IdentityProvider, case: str) -> None:
    v = verifier(idp)
    token = {
        "audience": lambda: idp.mint(audience="https://elsewhere.example/fhir"),
        "no-audience": lambda: idp.mint(),
        "issuer": lambda: idp.mint(audience=AUD, issuer="https://evil.example"),
        "other-key": lambda: idp.mint(audience=AUD, key=rsa_key()),  # the IdP's kid, forged
        "garbage": lambda: "not-a.jwt.at-all",
        "no-exp": lambda: forged({"alg": "RS256", "kid": idp.rsa_kid},
                                 {k: v for k, v in claims(idp).items() if k != "exp"}),
        "unknown-kid": lambda: idp.mint(audience=AUD, kid="made-up", key=rsa_key()),
    }[case]()
    refused(v, token)


def test_alg_none_and_hmac_with_the_public_key_are_refused(idp: IdentityProvider) -> None:
    v = verifier(idp)
    assert "algorithm" in refused(v, forged({"alg": "none", "kid": idp.rsa_kid},
                                            claims(idp))).text
    public_pem = idp.keys[idp.rsa_kid][0].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    hs = forged({"alg": "HS256", "kid": idp.rsa_kid}, claims(idp),
                lambda m: hmac.new(public_pem, m, hashlib.sha256).digest())
    assert "algorithm" in refused(v, hs).text


def test_alg_must_fit_the_key(idp: IdentityProvider) -> None:
    """ES256 named in the header but the kid is the RSA key (or a P-384 key): refused."""
    v = verifier(idp)
    p256 = ec.generate_private_key(ec.SECP256R1())
    refused(v, idp.mint(audience=AUD, alg="ES256", key=p256, kid=idp.rsa_kid))
    refused(v, idp.mint(audience=AUD, alg="ES256", key=p256, kid=idp.ec_kid))


def test_keys_cached_rotation_reread_once_and_unknown_kid_flood(idp: IdentityProvider) -> None:
    v = verifier(idp, refetch_seconds=2.0)
    before = idp.jwks_reads
    for _ in range(25):
        v.verify(idp.mint(audience=AUD))
    assert idp.jwks_reads == before + 1  # read once, then cached
    kid = idp.rotate("RS384")
    v.verify(idp.mint(audience=AUD, kid=kid))  # the new kid: one re-read
    assert idp.jwks_reads == before + 2
    for _ in range(20):  # made-up kids: at most one re-read per refetch interval
        refused(v, idp.mint(audience=AUD, kid=f"bogus-{_}", key=rsa_key()))
    assert idp.jwks_reads <= before + 3


def test_unreachable_jwks_is_unavailable_not_invalid(idp: IdentityProvider) -> None:
    v = TokenVerifier(issuer=idp.issuer, audience=AUD,
                      jwks_url="http://127.0.0.1:9/.well-known/jwks.json")
    with pytest.raises(JwksUnavailable):
        v.verify(idp.mint(audience=AUD))


def test_unreachable_jwks_answers_503_through_the_app(idp: IdentityProvider,
                                                      tmp_path_factory: pytest.TempPathFactory
                                                      ) -> None:
    """A request with a token while the issuer's keys cannot be read: 503 + Retry-After and
    an OperationOutcome, not 401 and not 500; without a token it is still 401."""
    from fastapi.testclient import TestClient

    from fhirbridge.app import build_services, create_app
    from fhirbridge.config import load_settings

    settings = load_settings(data_dir=tmp_path_factory.mktemp("jwks-down"))
    settings.auth.issuer = idp.issuer
    settings.auth.jwks_url = "http://127.0.0.1:9/.well-known/jwks.json"
    services = build_services(settings)
    try:
        with TestClient(create_app(services, workers=0, mllp=False)) as client:
            t = idp.mint("system/Task.rs", audience=settings.fhir_base_url)
            r = client.get("/fhir/Task", headers={"Authorization": f"Bearer {t}"})
            assert r.status_code == 503, r.text
            assert r.headers["Retry-After"] and r.json()["resourceType"] == "OperationOutcome"
            r = client.get("/fhir/Task")
            assert r.status_code == 401
            assert r.headers["WWW-Authenticate"] == 'Bearer realm="fhirbridge"'
    finally:
        services.close()


def test_token_without_kid_uses_the_issuers_only_fitting_key(idp: IdentityProvider) -> None:
    """RFC 7515 4.1.4: `kid` is optional. The IdP has one EC P-384 key: an ES384 token
    without kid verifies with it; a forged one without kid does not; an RS256 token without
    kid is refused once the issuer has two RSA keys (it must then say which)."""
    import jwt

    v = verifier(idp)
    key, _ = idp.keys[idp.ec_kid]
    good = jwt.encode(claims(idp), key, algorithm="ES384")
    seed(good)
    assert v.verify(good)["sub"] == "s"
    other = ec.generate_private_key(ec.SECP384R1())
    forged_token = jwt.encode(claims(idp), other, algorithm="ES384")
    seed(forged_token)
    refused(v, forged_token)
    idp.rotate("RS256")
    rs = jwt.encode(claims(idp), idp.keys[idp.rsa_kid][0], algorithm="RS256")
    seed(rs)
    refused(verifier(idp), rs)
