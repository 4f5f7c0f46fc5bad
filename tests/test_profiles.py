"""profiles/CapabilityStatement.json is what `GET /fhir/metadata` serves, is valid FHIR R4, and
declares exactly the FHIR interactions the app routes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import BaseRoute, Route
from fhir.resources.R4B.capabilitystatement import CapabilityStatement

from fhirbridge.app import build_services, create_app
from fhirbridge.config import load_settings
from fhirbridge.fhir.capability import capability_statement

PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "CapabilityStatement.json"
# FHIR paths that are not resource interactions
NON_RESOURCE = {"/fhir/metadata", "/fhir/.well-known/smart-configuration"}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    services = build_services(load_settings(data_dir=tmp_path_factory.mktemp("profiles")))
    try:
        yield create_app(services, workers=0, mllp=False)
    finally:
        services.close()


def all_routes(routes: list[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path) of every route in `app.routes`. FastAPI >= 0.16x keeps included routers
    as nested entries (an `original_router` with its `include_context.prefix`) instead of
    copying their routes into the app; older versions list APIRoutes directly."""
    for route in routes:
        nested = getattr(route, "original_router", None)
        if nested is not None:
            context = getattr(route, "include_context", None)
            yield from all_routes(nested.routes, prefix + getattr(context, "prefix", ""))
        elif isinstance(route, (APIRoute, Route)):
            for method in route.methods or ():
                yield method, prefix + route.path


def fhir_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of every /fhir resource route, path parameters normalised to {id}."""
    return {(m, re.sub(r"\{[^}]+\}", "{id}", path)) for m, path in all_routes(app.routes)
            if path.startswith("/fhir/") and path not in NON_RESOURCE and m != "HEAD"}


def test_route_walk_agrees_with_openapi(app: FastAPI):
    """The walk over app.routes sees what FastAPI itself publishes (guards the walker)."""
    published = {(m.upper(), re.sub(r"\{[^}]+\}", "{id}", path))
                 for path, ops in app.openapi()["paths"].items() for m in ops
                 if path.startswith("/fhir/") and path not in NON_RESOURCE}
    assert fhir_routes(app) == published


def declared() -> dict[str, set[str]]:
    rest = capability_statement()["rest"]
    assert len(rest) == 1 and rest[0]["mode"] == "server"
    return {r["type"]: {i["code"] for i in r["interaction"]} for r in rest[0]["resource"]}


INTERACTION_ROUTE = {
    "create": ("POST", "/fhir/{type}"),
    "read": ("GET", "/fhir/{type}/{id}"),
    "vread": ("GET", "/fhir/{type}/{id}/_history/{id}"),
    "search-type": ("GET", "/fhir/{type}"),
}


def test_profile_file_is_the_capability_statement():
    on_disk = json.loads(PROFILE.read_text(encoding="utf-8"))
    assert on_disk == capability_statement(), (
        "profiles/CapabilityStatement.json is stale: regenerate it from "
        "fhirbridge.fhir.capability.capability_statement() (indent 2)")
    expected_text = json.dumps(capability_statement(), indent=2, ensure_ascii=False)
    assert PROFILE.read_text(encoding="utf-8").rstrip("\n") == expected_text


def test_metadata_endpoint_serves_it(app: FastAPI):
    """Without [auth], /fhir/metadata is the published profile (no oauth-uris extension)."""
    with TestClient(app) as client:
        response = client.get("/fhir/metadata")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/fhir+json; charset=utf-8"
    assert response.json() == json.loads(PROFILE.read_text(encoding="utf-8"))
    security = response.json()["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"


def test_metadata_route_is_registered(app: FastAPI):
    assert ("GET", "/fhir/metadata") in set(all_routes(app.routes))


def test_capability_statement_is_valid_fhir_r4():
    cs = CapabilityStatement.model_validate(json.loads(PROFILE.read_text(encoding="utf-8")))
    assert cs.fhirVersion == "4.0.1"
    assert cs.kind == "instance"
    assert {r.type for r in cs.rest[0].resource} == set(declared())


def test_only_interactions_with_known_routes_are_declared():
    for rtype, codes in declared().items():
        unknown = codes - set(INTERACTION_ROUTE)
        assert not unknown, f"{rtype}: interaction(s) {unknown} have no route mapping here"


def test_every_declared_interaction_has_a_route(app: FastAPI):
    routes = fhir_routes(app)
    for rtype, codes in declared().items():
        for code in codes:
            method, template = INTERACTION_ROUTE[code]
            want = (method, template.replace("{type}", rtype))
            assert want in routes, f"{rtype} {code} declared but {want} is not routed"


def test_every_fhir_route_is_declared(app: FastAPI):
    expected = {(m, t.replace("{type}", rtype))
                for rtype, codes in declared().items()
                for code in codes
                for m, t in [INTERACTION_ROUTE[code]]}
    routes = fhir_routes(app)
    assert routes, "no /fhir routes found"
    for method, path in routes:
        rtype = path.split("/")[2]
        assert rtype in declared(), f"{method} {path}: {rtype} is not in the CapabilityStatement"
        assert (method, path) in expected, f"{method} {path} is routed but not declared"
