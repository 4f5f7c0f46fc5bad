"""The suite's PHI log scan: every name, identifier, birth date and token the tests seed is
registered here, and at the end of the session no log line of any process may contain one.

Seeded values come from `FhirServer.create_patient`, the test IdP's `mint`, the sample ADT
messages and `seed(...)` calls in tests; logs are every `fhirbridge serve` log file and every
record logged in the pytest process itself.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from pathlib import Path

_lock = threading.Lock()
_values: set[str] = set()
_log_files: set[Path] = set()
_records: list[str] = []

# Words a log line may contain for other reasons; a seeded name equal to one is not searched.
_COMMON = {"Other", "Person", "Patient", "Test", "Tester", "Sample", "Photo", "Image", "Study",
           "Media", "Binary", "Document", "Unknown", "Error", "Failed", "Review"}
# A JWT (header.payload.signature, base64url of a JSON object): never in a log, seeded or not.
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")


def seed(*values: object) -> None:
    """Register PHI-like values (names, identifiers, birth dates, tokens) the test used."""
    with _lock:
        for v in values:
            text = str(v or "").strip()
            if len(text) >= 4 and text not in _COMMON:
                _values.add(text)
                if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):  # a FHIR date is also HL7/DICOM
                    _values.add(text.replace("-", ""))


def seed_patient(resource: dict) -> None:
    """A FHIR Patient's names, identifiers and birth date."""
    for name in resource.get("name") or []:
        seed(name.get("family"), *(name.get("given") or []))
    for ident in resource.get("identifier") or []:
        seed(ident.get("value"))
    seed(resource.get("birthDate"))


def seed_hl7(text: str) -> None:
    """PID-3 identifiers, PID-5 names and PID-7 birth date of each PID segment."""
    for seg in re.split(r"[\r\n]+", text):
        fields = seg.split("|")
        if fields[0] != "PID" or len(fields) < 6:
            continue
        for cx in fields[3].split("~"):
            seed(cx.split("^")[0])
        for xpn in fields[5].split("~"):
            seed(*[p for p in xpn.split("^")[:2]])
        if len(fields) > 7:
            seed(fields[7][:8])


def watch_log_file(path: Path) -> None:
    with _lock:
        _log_files.add(Path(path))


class _Collector(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a broken record is not our concern here
            return
        with _lock:
            _records.append(text)


def install_collector() -> logging.Handler:
    handler = _Collector(level=logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def _lines() -> Iterable[tuple[str, str]]:
    with _lock:
        files, records = sorted(_log_files), list(_records)
    for path in files:
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                yield path.name, line
    for rec in records:
        for line in rec.splitlines():
            yield "pytest-process", line


def findings() -> list[str]:
    """Each log line holding a seeded value or a JWT, described without repeating the value
    in full (the report itself is a log)."""
    with _lock:
        values = sorted(_values, key=len, reverse=True)
    pattern = re.compile("|".join(rf"(?<![\w-]){re.escape(v)}(?![\w-])" for v in values)) \
        if values else None
    out: list[str] = []
    for source, line in _lines():
        hit = JWT.search(line)
        if hit is None and pattern is not None:
            hit = pattern.search(line)
        if hit is not None:
            shown = line[:hit.start()] + "<" + "*" * 4 + ">" + line[hit.end():]
            out.append(f"{source}: {shown[:300]}")
    return out
