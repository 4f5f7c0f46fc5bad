"""Apply HL7 v2 ADT events to the patient index, durably, before the ACK (HL7 v2.5.1 2.9.2
original-mode acknowledgment: AA only after commit).

PID-3 / MRG-1 CX identifiers map to FHIR systems through the configured identifier domains
(CX-4 namespace id = hl7_assigning_authority, or CX-4 universal id = the system's OID);
identifiers from unknown domains are ignored. A repeated MSH-10 from the same sender is
acknowledged again with the stored answer and applied once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from fhirbridge.config import IdentifierDomain
from fhirbridge.hl7 import (
    CX,
    AckDecision,
    IdentifierChange,
    OtherEvent,
    ParsedMessage,
    Patient,
    PatientMerge,
    PatientUpsert,
)
from fhirbridge.identity.model import Identifier, Name
from fhirbridge.pipeline.corrections import enqueue_correction
from fhirbridge.store.db import Database
from fhirbridge.store.models import Hl7Message
from fhirbridge.store.patient_index import IndexOutcome, PatientFacts, PatientIndex

log = logging.getLogger("fhirbridge.adt")

HL7_SEX_TO_FHIR = {"F": "female", "M": "male", "O": "other", "A": "other", "U": "unknown",
                   "N": "unknown"}


class _Refused(Exception):
    def __init__(self, outcome: IndexOutcome) -> None:
        self.outcome = outcome


class AdtFeed:
    def __init__(self, db: Database, index: PatientIndex, domains: list[IdentifierDomain],
                 on_applied: Callable[[str], None] | None = None) -> None:
        self.db = db
        self.index = index
        self.domains = domains
        self.on_applied = on_applied

    def identifier(self, cx: CX) -> Identifier | None:
        for d in self.domains:
            if cx.assigning_authority and cx.assigning_authority == d.hl7_assigning_authority:
                return Identifier(d.fhir_system, cx.id_number)
            if cx.universal_id and d.fhir_system == f"urn:oid:{cx.universal_id}":
                return Identifier(d.fhir_system, cx.id_number)
        return None

    def identifiers(self, cxs: tuple[CX, ...]) -> tuple[Identifier, ...]:
        out: list[Identifier] = []
        for cx in cxs:
            i = self.identifier(cx)
            if i is not None and i not in out:
                out.append(i)
        return tuple(out)

    def facts(self, patient: Patient) -> PatientFacts:
        names = tuple(
            Name(family=n.family, given=tuple(g for g in (n.given, *n.middle.split()) if g),
                 prefix=n.prefix, suffix=n.suffix)
            for n in patient.names if n.family or n.given)
        return PatientFacts(
            identifiers=self.identifiers(patient.identifiers),
            names=names,
            birth_date=patient.birth_date,
            sex=HL7_SEX_TO_FHIR.get(patient.sex or "") if patient.sex else None,
        )

    def apply(self, parsed: ParsedMessage) -> AckDecision:
        """Run in a worker thread: one transaction per message; AA only after it commits."""
        ev = parsed.event
        sender = f"{ev.sending_application}|{ev.sending_facility}"
        try:
            with self.db.transaction() as s:
                seen = s.scalar(select(Hl7Message).where(
                    Hl7Message.sender == sender,
                    Hl7Message.control_id == ev.message_control_id))
                if seen is not None:
                    return AckDecision(seen.ack_code, seen.ack_text)
                outcome = self._apply_event(s, ev)
                if outcome.ack != "AA":
                    raise _Refused(outcome)  # roll back whatever was half done
                s.add(Hl7Message(sender=sender, control_id=ev.message_control_id,
                                 event_type=ev.event_type, ack_code="AA",
                                 ack_text=outcome.text))
                for old, new, reason in outcome.corrections:
                    enqueue_correction(s, old, new, f"ADT {reason}")
        except _Refused as exc:
            return AckDecision.error(exc.outcome.text, "207")
        except IntegrityError:  # the same control id committed concurrently: answer as it did
            with self.db.session() as s:
                seen = s.scalar(select(Hl7Message).where(
                    Hl7Message.sender == sender,
                    Hl7Message.control_id == ev.message_control_id))
            if seen is None:
                raise
            return AckDecision(seen.ack_code, seen.ack_text)
        if self.on_applied is not None:
            self.on_applied(ev.event_type)
        return AckDecision.accept()

    def _apply_event(self, s: object, ev: object) -> IndexOutcome:
        kw = {"event_at": getattr(ev, "event_datetime", None),
              "event_type": getattr(ev, "event_type", ""),
              "control_id": getattr(ev, "message_control_id", "")}
        if isinstance(ev, PatientUpsert):
            return self.index.upsert(s, self.facts(ev.patient), **kw)  # type: ignore[arg-type]
        if isinstance(ev, PatientMerge):
            total = IndexOutcome()
            for pair in ev.merges:
                out = self.index.merge(s, self.facts(pair.surviving),  # type: ignore[arg-type]
                                       self.identifiers(pair.prior_identifiers), **kw)
                if out.ack != "AA":
                    return out
                total.corrections.extend(out.corrections)
            return total
        if isinstance(ev, IdentifierChange):
            facts = self.facts(ev.patient)
            total = IndexOutcome()
            for old in self.identifiers(ev.prior_identifiers):
                new = next((i for i in facts.identifiers if i.system == old.system), None)
                if new is None:
                    return IndexOutcome("AE", "A47: PID-3 has no identifier in the domain of "
                                        "MRG-1", False)
                out = self.index.change_identifier(s, old, new, facts,  # type: ignore[arg-type]
                                                   **kw)
                if out.ack != "AA":
                    return out
                total.corrections.extend(out.corrections)
            if not total.corrections:
                return IndexOutcome("AE", "A47: MRG-1 has no identifier in a configured domain",
                                    False)
            return total
        if isinstance(ev, OtherEvent):
            return IndexOutcome(text="event recorded; not used by fhirbridge", applied=False)
        return IndexOutcome("AE", "unsupported event", False)
