"""Resolve an upload's subject to one patient: gather the evidence (EHR, ADT index), then let
the pure match policy decide (fhirbridge.identity.policy). Never guesses.

IHE PDQm ITI-78 identifier search; PIXm / FHIR merges: follow Patient.link `replaced-by`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from fhirbridge.adapters.ehr import FhirEhr
from fhirbridge.identity.model import (
    Identifier,
    PatientRecord,
    SelfReported,
    SubjectClaim,
    patient_record_from_fhir,
)
from fhirbridge.identity.policy import DEFAULT_POLICY, MatchPolicy, Verdict, decide

MAX_LINK_HOPS = 5


class PatientIndexLookup(Protocol):
    """The local patient index (fed by ADT); see fhirbridge.store.patient_index."""

    def find_by_identifier(self, system: str, value: str) -> list[PatientRecord]: ...
    def get(self, ref: str) -> PatientRecord | None: ...


class PatientResolver:
    def __init__(self, ehr: FhirEhr | None, index: PatientIndexLookup | None,
                 policy: MatchPolicy = DEFAULT_POLICY) -> None:
        self.ehr = ehr
        self.index = index
        self.policy = policy

    def resolve(self, claim: SubjectClaim, self_reported: SelfReported | None) -> Verdict:
        """EhrUnavailable propagates: an unreachable EHR is a retry, not a hold."""
        ehr_records: list[PatientRecord] | None = None  # None: no EHR configured
        if self.ehr is not None:
            resources: list[dict[str, Any]] = []
            if claim.reference:
                found = self.ehr.read_patient(claim.reference)
                if found is not None:
                    resources.append(found)
            if claim.identifier:
                resources.extend(self.ehr.search_patients(claim.identifier.system,
                                                          claim.identifier.value))
            ehr_records = self._follow_ehr_links(resources)
        index_records: list[PatientRecord] = []
        if self.index is not None and claim.identifier is not None:
            index_records = self._follow_index_links(
                self.index.find_by_identifier(claim.identifier.system, claim.identifier.value))
        return decide(claim, self_reported, ehr_records, index_records, self.policy)

    def _follow_ehr_links(self, resources: list[dict[str, Any]]) -> list[PatientRecord]:
        ehr = self.ehr
        assert ehr is not None

        def fetch(ref: str) -> PatientRecord | None:
            found = ehr.read_patient(ref)
            return patient_record_from_fhir(found, base_url=ehr.base) if found else None

        return _follow_links([patient_record_from_fhir(r, base_url=ehr.base)
                              for r in resources], fetch)

    def _follow_index_links(self, records: list[PatientRecord]) -> list[PatientRecord]:
        assert self.index is not None
        return _follow_links(records, self.index.get)


def _follow_links(records: list[PatientRecord],
                  fetch: Callable[[str], PatientRecord | None]) -> list[PatientRecord]:
    """The records plus every survivor reached through `replaced_by` (bounded; the policy
    judges chains and cycles)."""
    seen: dict[str, PatientRecord] = {}
    todo = list(records)
    hops = 0
    while todo and hops <= MAX_LINK_HOPS * max(1, len(records)):
        rec = todo.pop(0)
        if rec.ref in seen:
            continue
        seen[rec.ref] = rec
        if rec.replaced_by and rec.replaced_by not in seen:
            hops += 1
            survivor = fetch(rec.replaced_by)
            if survivor is not None:
                todo.append(survivor)
    return list(seen.values())


def identifier_in_domains(record: PatientRecord, systems: list[str]) -> Identifier | None:
    """The record's identifier in the first configured domain that it has (domain order)."""
    for system in systems:
        for ident in record.identifiers:
            if ident.system == system and ident.value:
                return ident
    return None
