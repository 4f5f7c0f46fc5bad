"""Patient identity records: identifiers, names, EHR / index patients, the upload's claim.
Follows FHIR R4 Patient (identifier, name, birthDate, gender, active, link) and IHE PDQm/PIXm.

Pure data and conversions: no I/O. An `Identifier` is FHIR `system|value` (HL7 v2 CX-1 with
CX-4 assigning authority, DICOM PatientID with IssuerOfPatientID); two identifiers are the same
only when both system and value are equal, character for character.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Source = Literal["ehr", "index"]

# HumanName.use, best first: the name we put in DICOM is names[0].
_NAME_USE_ORDER = {"official": 0, "usual": 1, None: 2, "nickname": 3, "temp": 4,
                   "anonymous": 5, "maiden": 6, "old": 7}


@dataclass(frozen=True)
class Identifier:
    """FHIR Identifier reduced to what identifies: `system` (the assigning authority's URI)
    and `value`. Equality is exact; never normalise or fuzz either part."""

    system: str
    value: str


@dataclass(frozen=True)
class Name:
    """FHIR HumanName: family, given names in order (first given first), prefix and suffix
    (several FHIR prefixes/suffixes joined with a space)."""

    family: str
    given: tuple[str, ...]
    prefix: str = ""
    suffix: str = ""


@dataclass(frozen=True)
class PatientRecord:
    """One patient as a source of truth knows it: the EHR (FHIR Patient) or the local
    ADT-fed index. `ref` is `Patient/123` for the EHR or the index patient key.

    `replaced_by` is the target of a FHIR `link` of type `replaced-by` (PIXm / FHIR merge:
    the record is subsumed), or the surviving patient's key in the index after ADT A40."""

    source: Source
    ref: str
    identifiers: tuple[Identifier, ...]
    names: tuple[Name, ...]
    birth_date: str | None  # FHIR date: YYYY-MM-DD (YYYY or YYYY-MM when partial)
    sex: str | None  # FHIR administrative gender: male / female / other / unknown
    active: bool = True
    replaced_by: str | None = None

    def has_identifier(self, identifier: Identifier) -> bool:
        """True when the record carries exactly this system and value."""
        return identifier in self.identifiers


@dataclass(frozen=True)
class SubjectClaim:
    """Who the upload says it is about: `Media.subject` / `DocumentReference.subject`, as a
    literal reference (`Patient/123`) and/or a logical identifier (system + value)."""

    reference: str | None = None
    identifier: Identifier | None = None


@dataclass(frozen=True)
class SelfReported:
    """What the patient typed: a contained Patient (MHD `sourcePatientInfo`). Evidence only,
    never a source of demographics and never a way to find a patient."""

    names: tuple[Name, ...] = ()
    birth_date: str | None = None
    sex: str | None = None
    identifiers: tuple[Identifier, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.names or self.birth_date or self.sex or self.identifiers)


# -- FHIR R4 JSON → model ------------------------------------------------------------------

def patient_record_from_fhir(resource: Mapping[str, Any], *,
                             base_url: str | None = None) -> PatientRecord:
    """An EHR Patient (FHIR R4 JSON) as a PatientRecord: `ref` is `Patient/{id}`; names with
    use official/usual first (all kept); `active` absent means true; a `link` of type
    `replaced-by` gives `replaced_by`, made relative (`Patient/{id}`) only when it is relative
    already or starts with the EHR's `base_url` — a link to another server is kept absolute,
    so it is never mistaken for a local Patient with the same id."""
    rid = resource.get("id")
    if not isinstance(rid, str) or not rid:
        raise ValueError("a Patient resource without an id cannot be a match candidate")
    active = resource.get("active")
    replaced_by: str | None = None
    for link in _dicts(resource.get("link")):
        if link.get("type") == "replaced-by":
            other = link.get("other")
            ref = other.get("reference") if isinstance(other, Mapping) else None
            if isinstance(ref, str) and ref:
                replaced_by = relative_patient_reference(ref, base_url)
                break
    return PatientRecord(
        source="ehr",
        ref=f"Patient/{rid}",
        identifiers=identifiers_from_fhir(resource.get("identifier")),
        names=names_from_fhir(resource.get("name")),
        birth_date=_str_or_none(resource.get("birthDate")),
        sex=_str_or_none(resource.get("gender")),
        active=active is not False,
        replaced_by=replaced_by,
    )


def self_reported_from_fhir(resource: Mapping[str, Any]) -> SelfReported:
    """A contained Patient (what the patient typed into the portal) as SelfReported."""
    return SelfReported(
        names=names_from_fhir(resource.get("name")),
        birth_date=_str_or_none(resource.get("birthDate")),
        sex=_str_or_none(resource.get("gender")),
        identifiers=identifiers_from_fhir(resource.get("identifier")),
    )


def identifiers_from_fhir(items: Any) -> tuple[Identifier, ...]:
    """FHIR Identifier[] → Identifier tuple. Entries lacking a system or a value are dropped:
    an identifier without its assigning authority identifies nothing."""
    out: list[Identifier] = []
    for item in _dicts(items):
        system, value = item.get("system"), item.get("value")
        if isinstance(system, str) and system and isinstance(value, str) and value:
            ident = Identifier(system=system, value=value)
            if ident not in out:
                out.append(ident)
    return tuple(out)


def names_from_fhir(items: Any) -> tuple[Name, ...]:
    """FHIR HumanName[] → Name tuple, ordered by use (official, usual, unstated, nickname,
    temp, anonymous, maiden, old); the source order is kept within one use."""
    ranked: list[tuple[int, int, Name]] = []
    for pos, item in enumerate(_dicts(items)):
        name = name_from_fhir(item)
        if name is not None:
            ranked.append((_NAME_USE_ORDER.get(item.get("use"), 2), pos, name))
    ranked.sort(key=lambda r: (r[0], r[1]))
    return tuple(n for _, _, n in ranked)


def name_from_fhir(item: Mapping[str, Any]) -> Name | None:
    """One HumanName. When only `text` is given it is split: `Family, Given…`; otherwise the
    last word is the family name, except in CJK text where the first word is."""
    family = item.get("family")
    given = tuple(g.strip() for g in _strs(item.get("given")) if g.strip())
    prefix = " ".join(p.strip() for p in _strs(item.get("prefix")) if p.strip())
    suffix = " ".join(s.strip() for s in _strs(item.get("suffix")) if s.strip())
    family = family.strip() if isinstance(family, str) else ""
    if not family and not given:
        text = item.get("text")
        if not isinstance(text, str) or not text.strip():
            return None
        family, given = _split_text_name(text.strip())
    return Name(family=family, given=given, prefix=prefix, suffix=suffix)


def relative_patient_reference(ref: str, base_url: str | None = None) -> str:
    """`Patient/9/_history/2` → `Patient/9`; `{base_url}/Patient/9` → `Patient/9`. Any other
    reference (another server's, a contained one) is returned unchanged."""
    if base_url and ref.startswith(base_url.rstrip("/") + "/"):
        ref = ref[len(base_url.rstrip("/")) + 1:]
    m = re.fullmatch(r"(Patient/[A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?", ref)
    return m.group(1) if m else ref


def _split_text_name(text: str) -> tuple[str, tuple[str, ...]]:
    if "," in text:
        fam, _, rest = text.partition(",")
        return fam.strip(), tuple(rest.split())
    words = text.split()
    if len(words) == 1:
        return words[0], ()
    if any(_is_cjk(ch) for ch in text):
        return words[0], tuple(words[1:])
    return words[-1], tuple(words[:-1])


def _is_cjk(ch: str) -> bool:
    name = unicodedata.name(ch, "")
    return name.startswith(("CJK", "HIRAGANA", "KATAKANA", "HANGUL"))


def _dicts(items: Any) -> list[Mapping[str, Any]]:
    if not isinstance(items, list):
        return []
    return [i for i in items if isinstance(i, Mapping)]


def _strs(items: Any) -> list[str]:
    if not isinstance(items, list):
        return []
    return [i for i in items if isinstance(i, str)]


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def review_summary(record: PatientRecord | SelfReported) -> dict[str, object]:
    """What a reviewer compares (PHI: only for the review queue, never for logs or Tasks)."""
    out: dict[str, object] = {
        "names": [{"family": n.family, "given": list(n.given)} for n in record.names],
        "birthDate": record.birth_date or "",
        "gender": record.sex or "",
        "identifiers": [{"system": i.system, "value": i.value} for i in record.identifiers],
    }
    if isinstance(record, PatientRecord):
        out = {"ref": record.ref, "source": record.source, "active": record.active,
               "replacedBy": record.replaced_by or "", **out}
    return out
