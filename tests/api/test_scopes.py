"""SMART scope parsing and matching (fhirbridge.api.auth): v2, v1, wildcards, restrictions,
patient binding, operator scopes; and the loopback rule used without [auth]."""

from __future__ import annotations

import pytest

from fhirbridge.api.auth import Caller, authorize, grant, is_loopback, is_operator, parse_scope


@pytest.mark.parametrize("text, context, resource, perms", [
    ("system/Media.c", "system", "Media", "c"),
    ("patient/Task.rs", "patient", "Task", "rs"),
    ("user/ImagingStudy.cruds", "user", "ImagingStudy", "cruds"),
    ("system/*.rs", "system", "*", "rs"),
    ("system/Binary.read", "system", "Binary", "rs"),  # v1
    ("user/Media.write", "user", "Media", "cud"),  # v1
    ("system/*.*", "system", "*", "cruds"),  # v1 wildcard
])
def test_parse(text: str, context: str, resource: str, perms: str) -> None:
    s = parse_scope(text)
    assert s is not None
    assert (s.context, s.resource, s.perms) == (context, resource, frozenset(perms))


@pytest.mark.parametrize("text", ["openid", "fhirUser", "launch/patient", "offline_access",
                                  "system/Media", "system/Media.x", "system/Media.sr",
                                  "system/Media.cc", "admin/Media.c", "system/media.c",
                                  "system/Media.", ""])
def test_not_resource_scopes(text: str) -> None:
    assert parse_scope(text) is None


@pytest.mark.parametrize("scopes, rtype, perm, expected", [
    ({"system/Media.c"}, "Media", "c", "all"),
    ({"system/Media.c"}, "Media", "r", None),
    ({"system/Media.c"}, "DocumentReference", "c", None),
    ({"system/Media.write"}, "Media", "c", "all"),  # v1 write suffices for create
    ({"system/Task.read"}, "Task", "s", "all"),  # v1 read suffices for search
    ({"system/Task.read"}, "Task", "c", None),
    ({"user/*.rs"}, "ImagingStudy", "s", "all"),
    ({"system/*.*"}, "Binary", "c", "all"),
    ({"patient/Media.c"}, "Media", "c", "patient"),
    ({"patient/Media.c", "system/Media.c"}, "Media", "c", "all"),
    ({"system/AuditEvent.r", "system/AuditEvent.s"}, "AuditEvent", "rs", "all"),
    ({"system/AuditEvent.r", "patient/AuditEvent.s"}, "AuditEvent", "rs", "patient"),
    ({"system/AuditEvent.r"}, "AuditEvent", "rs", None),
    # a restricted scope is never widened into the bare one
    ({"system/Task.rs?status=completed"}, "Task", "s", None),
    ({"openid", "fhirUser"}, "Task", "r", None),
    (set(), "Task", "r", None),
])
def test_grant(scopes: set[str], rtype: str, perm: str, expected: str | None) -> None:
    assert grant(scopes, rtype, perm) == expected


def test_operator_scopes() -> None:
    assert is_operator({"fhirbridge/operator"})
    assert is_operator({"system/*.*"})
    assert is_operator({"user/*.cruds"})
    assert not is_operator({"system/*.rs"})
    assert not is_operator({"patient/*.*"})
    assert not is_operator({"system/Media.c"})


def test_authorize_binds_patient_only_for_patient_scopes() -> None:
    from fhirbridge.fhir.outcome import FhirError

    token = Caller(kind="token", sub="s", scopes=frozenset({"patient/Media.c",
                                                            "system/Task.rs"}), patient="9")
    assert authorize(token, "Media", "c").patient == "9"
    assert authorize(token, "Task", "s").patient == ""  # a system/ scope: not bound
    with pytest.raises(FhirError) as refused:
        authorize(token, "ImagingStudy", "s")
    assert refused.value.status == 403
    no_claim = Caller(kind="token", scopes=frozenset({"patient/Media.c"}))
    with pytest.raises(FhirError) as refused:
        authorize(no_claim, "Media", "c")
    assert refused.value.status == 403


def test_who() -> None:
    assert Caller(kind="token", sub="u1", client_id="c").who == "u1"
    assert Caller(kind="token", client_id="c").who == "c"
    assert Caller(kind="loopback", address="127.0.0.1").who == "loopback@127.0.0.1"
    assert Caller(kind="admin-token").who == "admin-token"


@pytest.mark.parametrize("host, expected", [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("testclient", True),
    ("10.0.0.5", False), ("192.168.1.20", False), ("2001:db8::1", False), ("", False),
    ("example.org", False),
])
def test_loopback_rule(host: str, expected: bool) -> None:
    """Without [auth], /fhir (and the operator routes) answer only these clients."""
    assert is_loopback(host) is expected
