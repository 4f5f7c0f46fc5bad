"""One version everywhere (issue 11 point 3): pyproject.toml, the package, the
CapabilityStatement (served and published), DICOM SoftwareVersions and the README changelog."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from fhirbridge import __version__
from fhirbridge.dicom.modules import SOFTWARE_VERSION
from fhirbridge.fhir.capability import capability_statement

ROOT = Path(__file__).resolve().parents[1]


def test_every_version_string_agrees() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert __version__ == project
    served = capability_statement()
    assert served["software"]["version"] == project and served["version"] == project
    published = json.loads((ROOT / "profiles/CapabilityStatement.json").read_text())
    assert published["software"]["version"] == project
    assert SOFTWARE_VERSION == f"fhirbridge {project}"
    changelog = (ROOT / "README.md").read_text().split("## Changelog", 1)[1]
    newest = re.search(r"^- (\d+\.\d+\.\d+) ", changelog, re.MULTILINE)
    assert newest is not None and newest.group(1) == project
