"""Shared pytest fixtures."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest

from tests.support import phi
from tests.support.ehr_proxy import EhrProxy
from tests.support.idp import IdentityProvider
from tests.support.servers import FhirServer, OrthancServer, dciodvfy, require_tools

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def no_phi_in_logs() -> Iterator[None]:
    """Security: at the end of the session, no log line of the pytest process or of any
    `fhirbridge serve` it ran holds a seeded name, identifier, birth date or any JWT."""
    handler = phi.install_collector()
    for sample in sorted((ROOT / "samples").glob("*.hl7")):
        phi.seed_hl7(sample.read_text(errors="replace"))
    yield
    import logging

    logging.getLogger().removeHandler(handler)
    found = phi.findings()
    assert not found, (f"{len(found)} log line(s) hold PHI or a token:\n"
                       + "\n".join(found[:20]))

# --- real components on loopback (tests/support/servers.py) ---------------------------------
# Started once per session, only when a test asks for them; a missing tool fails the test with
# a message naming scripts/install-test-deps.sh (never a skip).


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """Orthanc (PACS) with DICOMweb: .http_url, .dicom_url, .dicomweb_url, .aet, .dicom_port,
    .instances(), .patients_ids(), .instance_file(id), .find_instances(uid), .reset()."""
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fhir_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirServer]:
    """A FHIR R4 server (the EHR) in memory: .base_url ends in /fhir."""
    server = FhirServer(tmp_path_factory.mktemp("fhir-server"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def idp() -> Iterator[IdentityProvider]:
    """The test SMART identity provider (tests/support/idp.py), one per module: its JWKS
    read counts and rotated keys are that module's own."""
    with IdentityProvider() as provider:
        yield provider


@pytest.fixture(scope="module")
def proxy(fhir_server: FhirServer, idp: IdentityProvider) -> Iterator[EhrProxy]:
    """The test FHIR server behind an auth-checking proxy: any request without a token the
    module's `idp` issued is refused 401."""
    with EhrProxy(fhir_server.base_url, idp) as p:
        yield p


@pytest.fixture
def dciodvfy_check(tmp_path: Path) -> Callable[[object], str]:
    """check(path | pydicom.Dataset | bytes) asserts dciodvfy reports no Error; returns its
    full output (warnings included) for further assertions."""
    require_tools()
    counter = itertools.count()

    def check(obj: str | os.PathLike[str] | pydicom.Dataset | bytes) -> str:
        if isinstance(obj, pydicom.Dataset):
            path = tmp_path / f"dciodvfy-{next(counter)}.dcm"
            pydicom.dcmwrite(path, obj, enforce_file_format=True)
        elif isinstance(obj, (bytes, bytearray)):
            path = tmp_path / f"dciodvfy-{next(counter)}.dcm"
            path.write_bytes(obj)
        else:
            path = Path(obj)
        ok, errors, output = dciodvfy(path)
        assert ok, f"dciodvfy found {len(errors)} error(s) in {path}:\n" + "\n".join(errors) \
            + f"\n--- full output ---\n{output}"
        return output

    return check
