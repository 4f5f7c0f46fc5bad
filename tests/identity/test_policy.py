"""fhirbridge.identity.policy: the match policy (FHIR R4 Patient, IHE PIXm/PDQm), run over an
adversarial identity corpus (tests/identity/corpus.json). Zero wrong-patient matches, always."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fhirbridge.identity import model, names, policy
from fhirbridge.identity.model import (
    Identifier,
    Name,
    PatientRecord,
    SelfReported,
    SubjectClaim,
    names_from_fhir,
    patient_record_from_fhir,
    relative_patient_reference,
    self_reported_from_fhir,
)
from fhirbridge.identity.policy import (
    DEFAULT,
    DEFAULT_POLICY,
    Held,
    HoldReason,
    Matched,
    MatchPolicy,
    Verdict,
    decide,
)

CORPUS_PATH = Path(__file__).with_name("corpus.json")
CORPUS: dict[str, Any] = json.loads(CORPUS_PATH.read_text(encoding="utf-8"))
CASES: list[dict[str, Any]] = CORPUS["cases"]


# -- corpus → model --------------------------------------------------------------------------

def claim_of(case: dict[str, Any]) -> SubjectClaim:
    c = case["claim"]
    ident = c.get("identifier")
    return SubjectClaim(reference=c.get("reference"),
                        identifier=Identifier(ident["system"], ident["value"]) if ident else None)


def self_reported_of(case: dict[str, Any]) -> SelfReported | None:
    sr = case["self_reported"]
    return self_reported_from_fhir(sr) if sr is not None else None


def ehr_of(case: dict[str, Any]) -> list[PatientRecord] | None:
    if case["ehr"] is None:
        return None
    return [patient_record_from_fhir(r) for r in case["ehr"]]


def index_of(case: dict[str, Any]) -> list[PatientRecord]:
    return [PatientRecord(
        source="index", ref=r["ref"],
        identifiers=tuple(Identifier(i["system"], i["value"]) for i in r["identifier"]),
        names=names_from_fhir(r["name"]), birth_date=r.get("birthDate"), sex=r.get("gender"),
        active=r.get("active", True), replaced_by=r.get("replaced_by"),
    ) for r in case["index"]]


def run(case: dict[str, Any], pol: MatchPolicy = DEFAULT_POLICY, *,
        reverse: bool = False) -> Verdict:
    ehr, index = ehr_of(case), index_of(case)
    if reverse:
        ehr = list(reversed(ehr)) if ehr is not None else None
        index = list(reversed(index))
    return decide(claim_of(case), self_reported_of(case), ehr, index, pol)


def describe(v: Verdict) -> str:
    if isinstance(v, Matched):
        return f"Matched({v.patient.ref})"
    return f"Held({v.reason.value}: {v.detail})"


def check_case(case: dict[str, Any], v: Verdict) -> None:
    """Fail loudly on a wrong-patient match; then check the exact expected outcome."""
    expected = case["expect"]
    if isinstance(v, Matched) and v.patient.ref != expected.get("matched"):
        pytest.fail(f"WRONG PATIENT in case {case['id']!r}: matched {v.patient.ref}, expected "
                    f"{expected}", pytrace=False)
    if "matched" in expected:
        assert isinstance(v, Matched), f"{case['id']}: expected a match, got {describe(v)}"
    else:
        assert isinstance(v, Held), f"{case['id']}: expected a hold, got {describe(v)}"
        assert v.reason.value == expected["held"], f"{case['id']}: {describe(v)}"


# -- the corpus ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_corpus_case(case: dict[str, Any]) -> None:
    check_case(case, run(case))


def test_corpus_summary(capsys: pytest.CaptureFixture[str]) -> None:
    counts: Counter[str] = Counter()
    wrong: list[str] = []
    clean_missed: list[str] = []
    for case in CASES:
        v = run(case)
        expected = case["expect"]
        counts["cases"] += 1
        counts["clean"] += bool(case["clean"])
        if isinstance(v, Matched):
            counts["matched"] += 1
            if v.patient.ref != expected.get("matched"):
                wrong.append(f"{case['id']}: {v.patient.ref} instead of {expected}")
        else:
            counts["held"] += 1
            counts[f"held:{v.reason.value}"] += 1
            if case["clean"]:
                clean_missed.append(f"{case['id']}: {describe(v)}")
    with capsys.disabled():
        print(f"\nidentity corpus: {counts['cases']} cases, {counts['clean']} clean, "
              f"{counts['matched']} matched, {counts['held']} held, "
              f"{len(wrong)} wrong-patient matches, "
              f"{counts['clean'] - len(clean_missed)}/{counts['clean']} clean matched; holds: "
              + ", ".join(f"{k[5:]}={n}" for k, n in sorted(counts.items())
                          if k.startswith("held:")))
    assert wrong == [], f"WRONG-PATIENT MATCHES: {wrong}"
    assert clean_missed == [], f"clean cases not matched automatically: {clean_missed}"
    assert counts["cases"] >= 40
    assert counts["clean"] == counts["matched"]
    for reason in HoldReason:
        assert counts[f"held:{reason.value}"] >= 1, f"no corpus case holds with {reason}"


def test_corpus_is_well_formed() -> None:
    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids))
    required = ["twins-identifier-picks-anna", "twins-self-reported-other-twin",
                "same-name-wrong-dob", "dob-transposed-day-month", "mrn-typo-near-candidate",
                "identifier-other-domain", "merged-by-identifier", "merged-chain-of-two",
                "merged-survivor-missing", "inactive-no-link", "accents-upper-ascii",
                "apostrophe-missing", "hyphen-space", "japanese-halfwidth-kana",
                "swapped-latin", "self-reported-mrn-differs", "no-subject"]
    assert not set(required) - set(ids)
    for c in CASES:
        assert c["clean"] == ("matched" in c["expect"]), c["id"]
        assert set(c) == {"id", "about", "claim", "self_reported", "ehr", "index", "expect",
                          "clean"}, c["id"]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_candidate_order_does_not_matter(case: dict[str, Any]) -> None:
    assert run(case, reverse=True) == run(case)


def _resolves_to(start: PatientRecord, target: PatientRecord,
                 pool: list[PatientRecord]) -> bool:
    by_ref = {r.ref: r for r in pool}
    seen: set[str] = set()
    cur: PatientRecord | None = start
    while cur is not None and cur.ref not in seen:
        if cur.ref == target.ref:
            return True
        seen.add(cur.ref)
        cur = by_ref.get(cur.replaced_by) if cur.replaced_by else None
    return False


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_a_match_is_always_backed_by_the_exact_claim(case: dict[str, Any]) -> None:
    """Whatever the demographics say, a match means: a supplied record carries the claimed
    identifier exactly (or is the referenced one) and leads to the patient by replaced-by."""
    v = run(case)
    if not isinstance(v, Matched):
        return
    claim = claim_of(case)
    ehr = ehr_of(case)
    pool = ehr if ehr is not None else index_of(case)
    if claim.identifier is not None:
        assert any(_resolves_to(r, v.patient, pool) for r in pool
                   if r.has_identifier(claim.identifier))
    if claim.reference is not None and ehr is not None:
        assert any(_resolves_to(r, v.patient, pool) for r in pool if r.ref == claim.reference)


def _mutations(value: str) -> set[str]:
    out = {value.lower(), value.upper(), value + " ", " " + value, value + "0", value[:-1]}
    for i in range(len(value)):
        out.add(value[:i] + value[i + 1:])  # deletion
        for ch in "0179OlI-":
            out.add(value[:i] + ch + value[i + 1:])  # substitution
        if i + 1 < len(value):
            out.add(value[:i] + value[i + 1] + value[i] + value[i + 2:])  # transposition
    out.discard(value)
    return out


IDENTIFIER_CLEAN = [c for c in CASES if c["clean"] and "identifier" in c["claim"]
                    and "reference" not in c["claim"]]


@pytest.mark.parametrize("case", IDENTIFIER_CLEAN, ids=[c["id"] for c in IDENTIFIER_CLEAN])
def test_identifier_typos_and_other_domains_never_match(case: dict[str, Any]) -> None:
    """Every single-character typo of a matching MRN, and the right MRN in the wrong system,
    either holds or matches the one patient that really carries the mistyped value."""
    ident = claim_of(case).identifier
    assert ident is not None
    ehr, index = ehr_of(case), index_of(case)
    pool = ehr if ehr is not None else index
    variants = [Identifier(ident.system, v) for v in _mutations(ident.value)]
    variants += [Identifier(s, ident.value) for s in
                 (ident.system + "/", ident.system.upper(), "urn:oid:9.9.9", "")]
    for wrong in variants:
        v = decide(SubjectClaim(identifier=wrong), self_reported_of(case), ehr, index)
        if isinstance(v, Matched):
            assert any(_resolves_to(r, v.patient, pool) for r in pool
                       if r.has_identifier(wrong)), f"{wrong} fuzzily matched {v.patient.ref}"


# -- no PHI in what users see ----------------------------------------------------------------

def _phi_of(case: dict[str, Any]) -> set[str]:
    """Names, birth dates (and their years), identifier values appearing in a case."""
    found: set[str] = set()

    def walk(node: Any, key: str = "") -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, str) and key in ("family", "given", "text", "value", "birthDate",
                                               "prefix", "suffix"):
            found.add(node)
            found.update(w for w in re.split(r"[\s\-.'’,]+", node) if len(w) >= 2)
            if key == "birthDate":
                found.add(node[:4])

    walk(case["claim"])
    walk(case["self_reported"])
    walk(case["ehr"])
    walk(case["index"])
    return found


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_detail_and_evidence_carry_no_phi(case: dict[str, Any]) -> None:
    v = run(case)
    texts = [v.detail] if isinstance(v, Held) else list(v.evidence)
    assert all(texts), "a verdict must explain itself"
    for text in texts:
        for phi in _phi_of(case):
            assert not re.search(rf"(?<!\w){re.escape(phi)}(?!\w)", text, re.IGNORECASE), \
                f"{case['id']}: {phi!r} appears in {text!r}"


# -- the knobs -------------------------------------------------------------------------------

def case_by_id(cid: str) -> dict[str, Any]:
    return next(c for c in CASES if c["id"] == cid)


def test_defaults_are_strict() -> None:
    assert DEFAULT is DEFAULT_POLICY
    assert DEFAULT == MatchPolicy(
        require_self_reported_birth_date_match=True, require_self_reported_name_match=True,
        allow_name_order_swap=True, compare_sex_when_present=True,
        require_self_reported_identifier_match=True, require_ehr_and_index_agreement=True,
        ignore_unverifiable_reference_without_ehr=False, max_link_hops=10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT.allow_name_order_swap = False  # type: ignore[misc]


def test_name_order_swap_can_be_refused() -> None:
    v = run(case_by_id("swapped-latin"), MatchPolicy(allow_name_order_swap=False))
    assert isinstance(v, Held) and v.reason is HoldReason.DEMOGRAPHICS_CONFLICT
    assert "swapped" in v.detail
    ok = run(case_by_id("swapped-latin"))
    assert isinstance(ok, Matched)
    assert "self-reported name matches with given and family names swapped" in ok.evidence


def test_birth_date_mismatch_can_be_tolerated() -> None:
    case = case_by_id("dob-transposed-day-month")
    held = run(case)
    assert isinstance(held, Held)
    assert held.detail == "self-reported birth date differs from the EHR record " \
                          "(day and month transposed)"
    v = run(case, MatchPolicy(require_self_reported_birth_date_match=False))
    assert isinstance(v, Matched) and v.patient.ref == "Patient/jose"
    assert any("not required by policy" in e for e in v.evidence)


def test_name_mismatch_can_be_tolerated_but_not_birth_date() -> None:
    pol = MatchPolicy(require_self_reported_name_match=False)
    assert isinstance(run(case_by_id("twins-self-reported-other-twin"), pol), Matched)
    assert isinstance(run(case_by_id("same-name-wrong-dob"), pol), Held)


def test_sex_comparison_can_be_switched_off() -> None:
    assert isinstance(run(case_by_id("sex-conflict"),
                          MatchPolicy(compare_sex_when_present=False)), Matched)


def test_self_reported_identifier_knob() -> None:
    case = case_by_id("self-reported-mrn-differs")
    assert isinstance(run(case, MatchPolicy(require_self_reported_identifier_match=False)),
                      Matched)


def test_ehr_index_agreement_knob() -> None:
    case = case_by_id("ehr-and-index-dob-differs")
    held = run(case)
    assert isinstance(held, Held)
    assert held.detail == "the EHR record and the local patient index disagree on birth date"
    v = run(case, MatchPolicy(require_ehr_and_index_agreement=False))
    assert isinstance(v, Matched) and v.patient.source == "ehr"


def test_reference_without_ehr_knob() -> None:
    case = case_by_id("index-only-reference")
    v = run(case, MatchPolicy(ignore_unverifiable_reference_without_ehr=True))
    assert isinstance(v, Matched) and v.patient.ref == "index:K1"
    assert "subject reference not checked: no EHR is configured" in v.evidence
    only_ref = decide(SubjectClaim(reference="Patient/jose"), None, None, index_of(case),
                      MatchPolicy(ignore_unverifiable_reference_without_ehr=True))
    assert isinstance(only_ref, Held) and only_ref.reason is HoldReason.NO_MATCH


def test_link_hop_limit() -> None:
    case = case_by_id("merged-chain-of-two")
    assert isinstance(run(case, MatchPolicy(max_link_hops=2)), Matched)
    v = run(case, MatchPolicy(max_link_hops=1))
    assert isinstance(v, Held) and v.reason is HoldReason.MERGED_NO_SURVIVOR


# -- verdict details -------------------------------------------------------------------------

def test_hold_reason_codes() -> None:
    assert {r.value for r in HoldReason} == {
        "no-match", "ambiguous", "demographics-conflict", "merged-no-survivor", "inactive",
        "no-subject"}


def test_matched_evidence_for_a_merge() -> None:
    v = run(case_by_id("merged-chain-of-two"))
    assert isinstance(v, Matched)
    assert v.evidence == (
        "subject identifier matched exactly (system and value) in the EHR",
        "followed 2 replaced-by link(s) to the surviving patient",
        "no self-reported demographics to compare",
    )


def test_held_candidates_are_what_a_reviewer_needs() -> None:
    amb = run(case_by_id("identifier-two-active-patients"))
    assert isinstance(amb, Held)
    assert [c.ref for c in amb.candidates] == ["Patient/dup-a", "Patient/dup-b"]
    merged = run(case_by_id("merged-survivor-missing"))
    assert isinstance(merged, Held) and [c.ref for c in merged.candidates] == ["Patient/merge-old"]
    conflict = run(case_by_id("twins-self-reported-other-twin"))
    assert isinstance(conflict, Held)
    assert [c.ref for c in conflict.candidates] == ["Patient/twin-anna"]
    index_only = run(case_by_id("ehr-empty-index-knows"))
    assert isinstance(index_only, Held) and [c.ref for c in index_only.candidates] == ["index:K1"]
    assert isinstance(run(case_by_id("mrn-typo-near-candidate")), Held)
    typo = run(case_by_id("mrn-typo-near-candidate"))
    assert isinstance(typo, Held) and typo.candidates == ()


def test_several_conflicts_are_all_reported() -> None:
    v = run(case_by_id("someone-else-entirely"))
    assert isinstance(v, Held)
    assert v.detail == ("self-reported birth date differs from the EHR record; "
                        "self-reported name differs from the EHR record")
    sex = run(case_by_id("sex-conflict"))
    assert isinstance(sex, Held) and sex.detail == "self-reported sex differs from the EHR record"


def test_empty_self_reported_is_no_evidence() -> None:
    jose = patient_record_from_fhir(case_by_id("ref-only")["ehr"][0])
    v = decide(SubjectClaim(reference="Patient/jose"), SelfReported(), [jose], [])
    assert isinstance(v, Matched)
    assert "no self-reported demographics to compare" in v.evidence


# -- FHIR R4 Patient → model -----------------------------------------------------------------

def test_patient_record_from_fhir() -> None:
    rec = patient_record_from_fhir({
        "resourceType": "Patient", "id": "p1",
        "identifier": [{"system": "urn:oid:1.2.3", "value": "A1"}, {"value": "no-system"},
                       {"system": "urn:oid:1.2.3"}, {"system": "urn:oid:1.2.3", "value": "A1"}],
        "name": [{"use": "old", "family": "Weber", "given": ["Karin"]},
                 {"family": "Nick", "given": ["K"], "use": "nickname"},
                 {"use": "usual", "family": "Schmidt", "given": ["Kari"]},
                 {"use": "official", "family": "Schmidt", "given": ["Karin", "Anna"],
                  "prefix": ["Dr.", "med."], "suffix": ["PhD"]},
                 {"text": "Karin Schmidt"}],
        "birthDate": "1972-12-24", "gender": "female",
        "link": [{"type": "seealso", "other": {"reference": "Patient/x"}},
                 {"type": "replaced-by", "other": {"reference": "Patient/p2"}}],
    })
    assert rec == PatientRecord(
        source="ehr", ref="Patient/p1", identifiers=(Identifier("urn:oid:1.2.3", "A1"),),
        names=(Name("Schmidt", ("Karin", "Anna"), "Dr. med.", "PhD"),
               Name("Schmidt", ("Kari",)), Name("Schmidt", ("Karin",)),
               Name("Nick", ("K",)), Name("Weber", ("Karin",))),
        birth_date="1972-12-24", sex="female", active=True, replaced_by="Patient/p2")


def test_patient_record_defaults_and_edges() -> None:
    rec = patient_record_from_fhir({"resourceType": "Patient", "id": "p3", "active": False})
    assert rec.active is False and rec.names == () and rec.identifiers == ()
    assert rec.birth_date is None and rec.sex is None and rec.replaced_by is None
    assert patient_record_from_fhir({"id": "p4"}).active is True
    linked = {"id": "p5", "link": [{"type": "replaced-by", "other": {
        "reference": "https://ehr.example/fhir/Patient/p6/_history/2"}}]}
    assert patient_record_from_fhir(linked, base_url="https://ehr.example/fhir/").replaced_by \
        == "Patient/p6"
    # without the EHR's base (or with another one) an absolute link stays absolute
    assert patient_record_from_fhir(linked).replaced_by \
        == "https://ehr.example/fhir/Patient/p6/_history/2"
    assert patient_record_from_fhir(linked, base_url="https://ehr.example/fhir2").replaced_by \
        == "https://ehr.example/fhir/Patient/p6/_history/2"
    assert relative_patient_reference("Patient/p6/_history/1") == "Patient/p6"
    assert relative_patient_reference("#src") == "#src"
    with pytest.raises(ValueError):
        patient_record_from_fhir({"resourceType": "Patient"})


def test_text_only_names() -> None:
    assert names_from_fhir([{"text": "José María Müller"}]) == (
        Name("Müller", ("José", "María")),)
    assert names_from_fhir([{"text": "Müller, José María"}]) == (
        Name("Müller", ("José", "María")),)
    assert names_from_fhir([{"text": "山田 太郎"}]) == (Name("山田", ("太郎",)),)
    assert names_from_fhir([{"text": "  "}, {}, "junk"]) == ()


def test_self_reported_from_fhir() -> None:
    sr = self_reported_from_fhir({
        "resourceType": "Patient", "id": "src",
        "name": [{"family": "Müller", "given": ["José"]}], "birthDate": "1984-07-03",
        "gender": "male", "identifier": [{"system": "urn:oid:1.2.3", "value": "A1"}]})
    assert sr == SelfReported(names=(Name("Müller", ("José",)),), birth_date="1984-07-03",
                              sex="male", identifiers=(Identifier("urn:oid:1.2.3", "A1"),))
    assert self_reported_from_fhir({"resourceType": "Patient"}).is_empty


# -- purity ----------------------------------------------------------------------------------

ALLOWED_IMPORTS = {"__future__", "re", "unicodedata", "collections.abc", "dataclasses",
                   "typing", "enum", "datetime", "fhirbridge.identity.model",
                   "fhirbridge.identity.names"}


@pytest.mark.parametrize("module", [model, names, policy])
def test_identity_core_does_no_io(module: Any) -> None:
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported <= ALLOWED_IMPORTS
    assert not re.search(r"\b(open|print|input)\(", Path(module.__file__).read_text())
