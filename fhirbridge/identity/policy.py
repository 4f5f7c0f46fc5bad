"""The match policy: which one patient an upload belongs to, or why a person must decide.
Follows FHIR R4 Patient (identifier, active, link replaced-by) with IHE PIXm/PDQm semantics.

Pure: the caller (fhirbridge.pipeline.patient) has already read `Patient/{id}` and/or searched
`Patient?identifier=system|value` at the EHR, followed `replaced-by` links as far as it could,
and looked the identifier up in the local ADT-fed index. `decide` never fetches anything.

The rules, in order:
1. No reference and no identifier → held `no-subject`.
2. Patients are found only by the claim: a record whose `ref` equals the subject reference, or
   that carries the subject identifier exactly (system and value, character for character).
   Names and birth dates never find a patient.
3. Each record found is followed along `replaced-by` to its survivor; a survivor that was not
   supplied (or a cycle) → `merged-no-survivor`; an inactive record with no replacement →
   `inactive`. Several distinct patients → `ambiguous`; none → `no-match`. When the claim has a
   reference and an identifier, both must lead to the same patient.
4. The EHR decides when it is configured (`ehr_candidates` is not None); the local index is then
   only a cross-check: if it disagrees on birth date or sex → `demographics-conflict`. Without
   an EHR (`ehr_candidates is None`) the index decides, in the same way.
5. Self-reported data (what the patient typed) is evidence only: agreement is recorded,
   disagreement holds the upload (`demographics-conflict`).
`Held.detail` is shown to users (Task.statusReason) and never contains PHI.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from enum import Enum
from typing import TypeAlias

from fhirbridge.identity.model import PatientRecord, SelfReported, SubjectClaim
from fhirbridge.identity.names import NameMatch, best_name_match


class HoldReason(Enum):
    """Why an upload waits for a person; the value is the Task.statusReason code."""

    NO_MATCH = "no-match"
    AMBIGUOUS = "ambiguous"
    DEMOGRAPHICS_CONFLICT = "demographics-conflict"
    MERGED_NO_SURVIVOR = "merged-no-survivor"
    INACTIVE = "inactive"
    NO_SUBJECT = "no-subject"


@dataclass(frozen=True)
class Matched:
    """Exactly one patient; `evidence` says why (PHI-free sentences)."""

    patient: PatientRecord
    evidence: tuple[str, ...]


@dataclass(frozen=True)
class Held:
    """No automatic decision. `detail` is PHI-free; `candidates` are what a reviewer may
    choose from (sorted by ref)."""

    reason: HoldReason
    detail: str
    candidates: tuple[PatientRecord, ...] = ()


Verdict: TypeAlias = Matched | Held


@dataclass(frozen=True)
class MatchPolicy:
    """The knobs. Defaults are strict: anything the patient typed that contradicts the chart
    holds the upload for a person."""

    # A self-reported birth date that differs from the record (transposed day/month included).
    require_self_reported_birth_date_match: bool = True
    # A self-reported name that differs from every name of the record after folding.
    require_self_reported_name_match: bool = True
    # Given and family names swapped (Taro Yamada / Yamada Taro) count as agreement.
    allow_name_order_swap: bool = True
    # Compare sex when both sides state it (`unknown` is never compared).
    compare_sex_when_present: bool = True
    # A self-reported identifier in a system the record also uses must be one of its values.
    require_self_reported_identifier_match: bool = True
    # EHR and local index disagreeing on birth date or sex for the same identifier.
    require_ehr_and_index_agreement: bool = True
    # Without an EHR a `Patient/…` reference cannot be checked; by default that holds.
    ignore_unverifiable_reference_without_ehr: bool = False
    # Longest replaced-by chain followed (A → B → C is 2 hops).
    max_link_hops: int = 10


DEFAULT_POLICY = MatchPolicy()
DEFAULT = DEFAULT_POLICY


def decide(claim: SubjectClaim, self_reported: SelfReported | None,
           ehr_candidates: Sequence[PatientRecord] | None,
           index_candidates: Sequence[PatientRecord],
           policy: MatchPolicy = DEFAULT_POLICY) -> Verdict:
    """Decide whose upload this is. `ehr_candidates=None` means no EHR is configured (the
    index decides); an empty sequence means the EHR was asked and knows no such patient."""
    if not claim.reference and not claim.identifier:
        return Held(HoldReason.NO_SUBJECT, "the upload does not name its subject patient")
    index = _Pool(index_candidates, "local patient index record")
    if ehr_candidates is None:
        return _decide(claim, self_reported, index, None, policy)
    return _decide(claim, self_reported, _Pool(ehr_candidates, "EHR record"), index, policy)


# -- internals -----------------------------------------------------------------------------

class _Pool:
    """Records from one source, by ref (the first of duplicate refs wins)."""

    def __init__(self, records: Iterable[PatientRecord], label: str) -> None:
        self.label = label
        self.by_ref: dict[str, PatientRecord] = {}
        for r in records:
            self.by_ref.setdefault(r.ref, r)

    def __bool__(self) -> bool:
        return bool(self.by_ref)

    def records(self) -> list[PatientRecord]:
        return [self.by_ref[k] for k in sorted(self.by_ref)]


@dataclass(frozen=True)
class _Resolution:
    start: PatientRecord
    chain: tuple[PatientRecord, ...]  # start … last record reached
    target: PatientRecord | None  # the active survivor, or None
    failure: HoldReason | None
    detail: str

    @property
    def hops(self) -> int:
        return len(self.chain) - 1


@dataclass(frozen=True)
class _Found:
    """What one part of the claim (reference or identifier) led to."""

    hits: tuple[PatientRecord, ...]
    resolutions: tuple[_Resolution, ...]

    @property
    def targets(self) -> list[PatientRecord]:
        seen: dict[str, PatientRecord] = {}
        for r in self.resolutions:
            if r.target is not None:
                seen.setdefault(r.target.ref, r.target)
        return [seen[k] for k in sorted(seen)]

    @property
    def failures(self) -> list[_Resolution]:
        order = {HoldReason.MERGED_NO_SURVIVOR: 0, HoldReason.INACTIVE: 1}
        return sorted((r for r in self.resolutions if r.failure is not None),
                      key=lambda r: (order.get(r.failure, 9) if r.failure else 9, r.start.ref))

    @property
    def involved(self) -> list[PatientRecord]:
        return [rec for r in self.resolutions for rec in r.chain]


def _decide(claim: SubjectClaim, self_reported: SelfReported | None, pool: _Pool,
            crosscheck: _Pool | None, policy: MatchPolicy) -> Verdict:
    ehr_mode = crosscheck is not None
    parts: list[tuple[str, _Found]] = []
    evidence: list[str] = []
    if claim.reference:
        hits = [r for r in pool.records() if r.ref == claim.reference]
        if hits or ehr_mode or not policy.ignore_unverifiable_reference_without_ehr:
            parts.append(("reference", _find(hits, pool, policy)))
        else:
            evidence.append("subject reference not checked: no EHR is configured")
    if claim.identifier:
        ident = claim.identifier
        parts.append(("identifier",
                      _find([r for r in pool.records() if r.has_identifier(ident)], pool, policy)))

    if not parts:
        return Held(HoldReason.NO_MATCH, "the subject reference cannot be checked without an EHR")
    targets: dict[str, PatientRecord] = {}
    for part, found in parts:
        if not found.hits:
            return _no_match(part, pool, crosscheck, claim, policy)
        if len(found.targets) > 1:
            return Held(HoldReason.AMBIGUOUS,
                        f"several distinct patients have the subject {part} in the "
                        f"{_source(pool)}", _sorted(found.involved))
        if found.failures:
            first = found.failures[0]
            detail = first.detail if not found.targets else (
                f"{first.detail}; another record with the subject {part} is active")
            return Held(first.failure or HoldReason.NO_MATCH, detail, _sorted(found.involved))
        target = found.targets[0]
        targets[target.ref] = target
        evidence.append(
            f"subject reference resolved to the {pool.label}" if part == "reference" else
            f"subject identifier matched exactly (system and value) in the {_source(pool)}")
        hops = max((r.hops for r in found.resolutions), default=0)
        if hops:
            evidence.append(f"followed {hops} replaced-by link(s) to the surviving patient")
    if len(targets) > 1:
        return Held(HoldReason.AMBIGUOUS,
                    "the subject reference and the subject identifier lead to different patients",
                    _sorted(targets.values()))
    patient = next(iter(targets.values()))
    if len(parts) == 2:
        evidence.append("subject reference and identifier lead to the same patient")

    conflicts: list[str] = []
    if crosscheck:
        _crosscheck(patient, claim, crosscheck, policy, conflicts, evidence)
    if self_reported is not None and not self_reported.is_empty:
        _check_self_reported(patient, self_reported, pool.label, policy, conflicts, evidence)
    else:
        evidence.append("no self-reported demographics to compare")
    if conflicts:
        return Held(HoldReason.DEMOGRAPHICS_CONFLICT, "; ".join(_unique(conflicts)), (patient,))
    return Matched(patient, tuple(_unique(evidence)))


def _find(hits: list[PatientRecord], pool: _Pool, policy: MatchPolicy) -> _Found:
    return _Found(tuple(hits), tuple(_follow(h, pool, policy) for h in hits))


def _follow(start: PatientRecord, pool: _Pool, policy: MatchPolicy) -> _Resolution:
    """Follow replaced-by from a record to the active survivor."""
    chain = [start]
    current = start
    while current.replaced_by:
        nxt = pool.by_ref.get(current.replaced_by)
        if nxt is None:
            return _Resolution(start, tuple(chain), None, HoldReason.MERGED_NO_SURVIVOR,
                               "the patient was merged (replaced-by) into a patient that "
                               f"could not be found in the {_source(pool)}")
        if any(r.ref == nxt.ref for r in chain):
            return _Resolution(start, tuple(chain), None, HoldReason.MERGED_NO_SURVIVOR,
                               "the patient's replaced-by links form a cycle")
        if len(chain) > policy.max_link_hops:
            return _Resolution(start, tuple(chain), None, HoldReason.MERGED_NO_SURVIVOR,
                               "the patient's replaced-by chain is longer than allowed")
        chain.append(nxt)
        current = nxt
    if not current.active:
        detail = ("the patient is inactive and not linked to a replacement" if len(chain) == 1
                  else "the surviving patient of a merge is inactive")
        return _Resolution(start, tuple(chain), None, HoldReason.INACTIVE, detail)
    return _Resolution(start, tuple(chain), current, None, "")


def _no_match(part: str, pool: _Pool, crosscheck: _Pool | None, claim: SubjectClaim,
              policy: MatchPolicy) -> Held:
    if crosscheck is not None and claim.identifier is not None:
        ident = claim.identifier
        in_index = _find([r for r in crosscheck.records() if r.has_identifier(ident)],
                         crosscheck, policy)
        if in_index.hits:
            return Held(HoldReason.NO_MATCH,
                        f"no EHR patient has the subject {part}; the local patient index "
                        "knows the subject identifier", _sorted(in_index.involved))
    if part == "reference" and crosscheck is None:
        return Held(HoldReason.NO_MATCH,
                    "the subject reference cannot be checked without an EHR")
    return Held(HoldReason.NO_MATCH, f"no patient has the subject {part} in the {_source(pool)}")


def _crosscheck(patient: PatientRecord, claim: SubjectClaim, index: _Pool, policy: MatchPolicy,
                conflicts: list[str], evidence: list[str]) -> None:
    """The EHR's patient against the index's patient(s) for the same identifier(s)."""
    idents = set(patient.identifiers)
    if claim.identifier is not None:
        idents.add(claim.identifier)
    hits = [r for r in index.records() if idents.intersection(r.identifiers)]
    others = _find(hits, index, policy).targets
    if not others:
        return
    disagree: list[str] = []
    for other in others:
        if patient.birth_date and other.birth_date and _compare_dates(
                patient.birth_date, other.birth_date) not in (_Date.SAME, _Date.PARTIAL):
            disagree.append("birth date")
        if _stated(patient.sex) and _stated(other.sex) and patient.sex != other.sex:
            disagree.append("sex")
    if not disagree:
        evidence.append("the local patient index agrees with the EHR record on birth date and sex")
    elif policy.require_ehr_and_index_agreement:
        conflicts.append("the EHR record and the local patient index disagree on "
                         + " and ".join(_unique(disagree)))
    else:
        evidence.append("the EHR record and the local patient index disagree on "
                        + " and ".join(_unique(disagree)) + " (not required by policy)")


def _check_self_reported(patient: PatientRecord, sr: SelfReported, label: str,
                         policy: MatchPolicy, conflicts: list[str], evidence: list[str]) -> None:
    def disagree(required: bool, text: str) -> None:
        (conflicts if required else evidence).append(
            text if required else f"{text} (not required by policy)")

    if sr.birth_date:
        if not patient.birth_date:
            evidence.append(f"the {label} has no birth date; self-reported birth date not compared")
        else:
            d = _compare_dates(sr.birth_date, patient.birth_date)
            need = policy.require_self_reported_birth_date_match
            if d is _Date.SAME:
                evidence.append("self-reported birth date matches")
            elif d is _Date.PARTIAL:
                evidence.append("self-reported birth date agrees at the precision given")
            elif d is _Date.TRANSPOSED:
                disagree(need, f"self-reported birth date differs from the {label} "
                               "(day and month transposed)")
            elif d is _Date.INVALID:
                disagree(need, "self-reported birth date cannot be compared (not a valid date)")
            else:
                disagree(need, f"self-reported birth date differs from the {label}")

    if sr.names:
        if not patient.names:
            evidence.append(f"the {label} has no name; self-reported name not compared")
        else:
            m = best_name_match(sr.names, patient.names)
            need = policy.require_self_reported_name_match
            if m is NameMatch.EXACT:
                evidence.append("self-reported name matches exactly")
            elif m is NameMatch.NORMALISED_EQUAL:
                evidence.append("self-reported name matches after normalisation "
                                "(case, accents, punctuation, width; middle names optional)")
            elif m is NameMatch.SWAPPED and policy.allow_name_order_swap:
                evidence.append("self-reported name matches with given and family names swapped")
            elif m is NameMatch.SWAPPED:
                disagree(need, f"self-reported name matches the {label} only with given and "
                               "family names swapped")
            else:
                disagree(need, f"self-reported name differs from the {label}")

    if policy.compare_sex_when_present and _stated(sr.sex) and _stated(patient.sex):
        if (sr.sex or "").lower() == (patient.sex or "").lower():
            evidence.append("self-reported sex matches")
        else:
            conflicts.append(f"self-reported sex differs from the {label}")

    for ident in sr.identifiers:
        if patient.has_identifier(ident):
            evidence.append("self-reported identifier matches")
        elif any(i.system == ident.system for i in patient.identifiers):
            disagree(policy.require_self_reported_identifier_match,
                     f"self-reported identifier differs from the {label}'s identifier "
                     "in the same system")


class _Date(Enum):
    SAME = "same"
    PARTIAL = "partial"  # equal at the precision both give (YYYY or YYYY-MM)
    TRANSPOSED = "transposed"  # same year, day and month swapped
    DIFFERENT = "different"
    INVALID = "invalid"


_DATE_RE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")


def _parse_date(text: str) -> tuple[int, int | None, int | None] | None:
    m = _DATE_RE.match(text.strip())
    if not m:
        return None
    year, month, day = int(m.group(1)), m.group(2), m.group(3)
    try:
        if day is not None and month is not None:
            date(year, int(month), int(day))
        elif month is not None and not 1 <= int(month) <= 12:
            return None
    except ValueError:
        return None
    return (year, int(month) if month else None, int(day) if day else None)


def _compare_dates(a: str, b: str) -> _Date:
    pa, pb = _parse_date(a), _parse_date(b)
    if pa is None or pb is None:
        return _Date.INVALID
    if pa == pb:
        return _Date.SAME
    (ya, ma, da), (yb, mb, db) = pa, pb
    if None not in (ma, da, mb, db):
        if ya == yb and ma == db and da == mb:
            return _Date.TRANSPOSED
        return _Date.DIFFERENT
    common = [(x, y) for x, y in ((ya, yb), (ma, mb), (da, db)) if x is not None and y is not None]
    return _Date.PARTIAL if all(x == y for x, y in common) else _Date.DIFFERENT


def _stated(sex: str | None) -> bool:
    return bool(sex) and (sex or "").lower() != "unknown"


def _source(pool: _Pool) -> str:
    return "EHR" if pool.label.startswith("EHR") else "local patient index"


def _sorted(records: Iterable[PatientRecord]) -> tuple[PatientRecord, ...]:
    seen: dict[str, PatientRecord] = {}
    for r in records:
        seen.setdefault(r.ref, r)
    return tuple(seen[k] for k in sorted(seen))


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
