"""Patients seeded in the test EHR, shared by the integration modules (one set per module)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

MRN_SYSTEM = "urn:oid:2.16.840.1.113883.3.7777"


def mrn(prefix: str) -> list[dict[str, str]]:
    return [{"system": MRN_SYSTEM, "value": f"{prefix}-{uuid.uuid4().hex[:6]}"}]


@pytest.fixture(scope="module")
def patient(fhir_server) -> dict[str, Any]:
    return fhir_server.create_patient("O'Brien-Smith", ["Zoë"], "1971-05-30", "female",
                                      mrn("MRN-D"))


@pytest.fixture(scope="module")
def other_patient(fhir_server) -> dict[str, Any]:
    return fhir_server.create_patient("Other", ["Person"], "1960-01-01", "male", mrn("MRN-E"))
