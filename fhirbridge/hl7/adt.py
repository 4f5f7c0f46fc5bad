"""ADT messages → patient events (frozen dataclasses), no database I/O.

Follows HL7 v2.5.1 Chapter 3 (Patient Administration): §3.3.1/4/5/8/28/31 A01, A04, A05, A08,
A28, A31 (demographics), §3.3.18/34/36 A18, A34, A36 and §3.3.40 A40 (merges, A40 with
repeating PID/MRG groups), §3.3.47 A47 (change patient identifier list); segments §3.4.1 EVN,
§3.4.2 PID (PID-3 CX §2.A.14, PID-5 XPN §2.A.88, PID-7, PID-8, PID-29, PID-30), §3.4.9 MRG.

Date/times without a zone offset are taken as UTC unless `parse_adt(default_tz=…)` says
otherwise (HL7 means the sender's local time; the sender's zone is configuration, not data).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from typing import Any, TypeAlias

from fhirbridge.hl7.message import (
    DATA_TYPE_ERROR,
    REQUIRED_FIELD_MISSING,
    SEGMENT_SEQUENCE_ERROR,
    UNSUPPORTED_MESSAGE_TYPE,
    EscapeError,
    Hl7Message,
    MessageHeader,
    MessageRejected,
    decode_message,
    parse_date,
    parse_dtm,
    safe_token,
)

UPSERT_EVENTS = frozenset({"A01", "A04", "A05", "A08", "A28", "A31"})
MERGE_EVENTS = frozenset({"A40", "A18", "A34", "A36"})
IDENTIFIER_CHANGE_EVENTS = frozenset({"A47"})
ADT_SEGMENTS = frozenset({"EVN", "PID", "MRG"})  # the only ones read; others are not parsed


@dataclass(frozen=True, slots=True)
class CX:
    """One identifier (CX, §2.A.14): CX-1 id number, CX-4 assigning authority (HD-1 namespace
    id; HD-2 universal id and HD-3 its type kept too), CX-5 identifier type code (table 0203)."""

    id_number: str
    assigning_authority: str = ""
    identifier_type_code: str = ""
    universal_id: str = ""
    universal_id_type: str = ""


@dataclass(frozen=True, slots=True)
class PersonName:
    """One XPN repetition (§2.A.88): family^given^middle^suffix^prefix^degree^type^representation.
    `family` is FN-1 (surname); `middle` is XPN-3 (second and further given names)."""

    family: str = ""
    given: str = ""
    middle: str = ""
    suffix: str = ""
    prefix: str = ""
    name_type: str = ""  # XPN-7, table 0200 (L legal, D display, …)
    representation: str = ""  # XPN-8, table 4000 (A alphabetic, I ideographic, P phonetic)


@dataclass(frozen=True, slots=True)
class Patient:
    """What one PID segment says about a patient."""

    identifiers: tuple[CX, ...]  # PID-3, every repetition with a CX-1
    names: tuple[PersonName, ...] = ()  # PID-5 repetitions
    birth_date: str | None = None  # PID-7 → YYYY-MM-DD; None if absent or coarser than a day
    sex: str | None = None  # PID-8 raw code (table 0001: F M O U A N …)
    death_datetime: datetime | None = None  # PID-29
    deceased: bool | None = None  # PID-30 Y/N; None when absent


@dataclass(frozen=True, slots=True, kw_only=True)
class AdtEvent:
    """Fields every event carries (MSH, EVN)."""

    message_control_id: str  # MSH-10
    event_type: str  # "A08" (MSH-9.2, EVN-1 when MSH-9.2 is empty)
    message_datetime: datetime  # MSH-7
    event_datetime: datetime  # EVN-2 recorded date/time, else MSH-7
    sending_application: str  # MSH-3 HD-1 (or HD-2)
    sending_facility: str  # MSH-4 HD-1 (or HD-2)


@dataclass(frozen=True, slots=True, kw_only=True)
class PatientUpsert(AdtEvent):
    """A01, A04, A05, A08, A28, A31: create or update the patient named by PID-3."""

    patient: Patient


@dataclass(frozen=True, slots=True)
class MergePair:
    """One PID/MRG group: the patients named by MRG-1 are subsumed by the PID-3 patient."""

    surviving: Patient
    prior_identifiers: tuple[CX, ...]  # MRG-1


@dataclass(frozen=True, slots=True, kw_only=True)
class PatientMerge(AdtEvent):
    """A40 (one or more PID/MRG groups); A18, A34, A36 (one group)."""

    merges: tuple[MergePair, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class IdentifierChange(AdtEvent):
    """A47: the identifier in MRG-1 is replaced by the one in PID-3 on the same patient."""

    patient: Patient  # PID: identifiers are the new (correct) ones
    prior_identifiers: tuple[CX, ...]  # MRG-1: the old (incorrect) ones


@dataclass(frozen=True, slots=True, kw_only=True)
class OtherEvent(AdtEvent):
    """Any other ADT trigger: acknowledged AA and recorded, nothing applied."""


Event: TypeAlias = PatientUpsert | PatientMerge | IdentifierChange | OtherEvent


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    """`parse_adt`'s result: the event and the header the ACK is built from; `peer` is the
    MLLP sender ("203.0.113.7:51234", with " CN=…" for a verified TLS client certificate),
    filled in by the listener for the audit trail."""

    header: MessageHeader
    event: Event
    peer: str = ""


def parse_adt(raw: bytes, *, default_tz: tzinfo | None = timezone.utc) -> ParsedMessage:
    """Decode one ADT message (bytes between MLLP framing) into an event.

    Raises MessageRejected: AR when the bytes are not an acceptable HL7 v2 message (unusable
    MSH, unsupported version) or not ADT (200); AE (v2.5.1 §2.9.2: the message was understood,
    its content is wrong) when a segment or field the event needs is missing or malformed
    (100/101/102), including an escape sequence that cannot be decoded (102)."""
    msg = decode_message(raw, default_tz=default_tz, segments=ADT_SEGMENTS)
    h = msg.header
    if h.message_code != "ADT":
        raise MessageRejected(UNSUPPORTED_MESSAGE_TYPE, "message type "
                              f"{safe_token(h.message_code) or '(empty)'} is not supported; "
                              "only ADT is accepted", header=h, location=("MSH", 9))
    try:
        return _parse_adt(msg, default_tz)
    except EscapeError:
        raise MessageRejected(DATA_TYPE_ERROR, "a field uses an escape sequence that is not "
                              "supported (character-set switch or malformed hex)", header=h,
                              ack_code="AE") from None
    except MessageRejected as exc:
        if exc.location is None or exc.location[0] != "MSH":
            exc.ack_code = "AE"  # content error, not an unusable message
        raise


def _parse_adt(msg: Hl7Message, default_tz: tzinfo | None) -> ParsedMessage:
    h = msg.header
    evn = msg.first("EVN")
    trigger = h.trigger_event or (msg.value(evn, 1).strip() if evn is not None else "")
    if not trigger:
        raise MessageRejected(REQUIRED_FIELD_MISSING, "MSH-9.2 trigger event is missing",
                              header=h, location=("MSH", 9))
    trigger = trigger.upper()
    assert h.message_datetime is not None  # decode_message guarantees it
    event_dt = h.message_datetime
    if evn is not None:
        try:
            event_dt = parse_dtm(msg.value(evn, 2), default_tz=default_tz) or event_dt
        except ValueError:
            raise MessageRejected(DATA_TYPE_ERROR, "EVN-2 recorded date/time is not a valid "
                                  "DTM", header=h, location=("EVN", 2)) from None
    common: dict[str, Any] = dict(
        message_control_id=h.control_id, event_type=trigger,
        message_datetime=h.message_datetime, event_datetime=event_dt,
        sending_application=h.sending_application, sending_facility=h.sending_facility)
    event: Event
    if trigger in UPSERT_EVENTS:
        pid = msg.first("PID")
        if pid is None:
            raise MessageRejected(SEGMENT_SEQUENCE_ERROR, "PID segment is missing", header=h,
                                  location=("PID", 0))
        event = PatientUpsert(**common, patient=_patient(msg, pid, default_tz))
    elif trigger in MERGE_EVENTS or trigger in IDENTIFIER_CHANGE_EVENTS:
        pairs = _pid_mrg_groups(msg, default_tz)
        if trigger in IDENTIFIER_CHANGE_EVENTS:
            if len(pairs) != 1:
                raise MessageRejected(SEGMENT_SEQUENCE_ERROR, "A47 needs exactly one PID/MRG "
                                      "group", header=h, location=("PID", 0))
            event = IdentifierChange(**common, patient=pairs[0].surviving,
                                     prior_identifiers=pairs[0].prior_identifiers)
        else:
            if trigger != "A40" and len(pairs) != 1:
                raise MessageRejected(SEGMENT_SEQUENCE_ERROR, f"{trigger} needs exactly one "
                                      "PID/MRG group", header=h, location=("PID", 0))
            event = PatientMerge(**common, merges=tuple(pairs))
    else:
        event = OtherEvent(**common)
    return ParsedMessage(header=h, event=event)


def _pid_mrg_groups(msg: Hl7Message, default_tz: tzinfo | None) -> list[MergePair]:
    """PID [PD1] MRG [PV1] … groups in order (ADT_A39 PATIENT group, ADT_A30)."""
    h = msg.header
    pairs: list[MergePair] = []
    current: Any | None = None
    for sid, seg in msg.ordered():
        if sid == "PID":
            if current is not None:
                raise MessageRejected(SEGMENT_SEQUENCE_ERROR, "PID segment without its MRG "
                                      "segment", header=h, location=("MRG", 0))
            current = seg
        elif sid == "MRG":
            if current is None:
                raise MessageRejected(SEGMENT_SEQUENCE_ERROR, "MRG segment without a "
                                      "preceding PID segment", header=h, location=("MRG", 0))
            prior = _identifiers(msg, seg, 1)
            if not prior:
                raise MessageRejected(REQUIRED_FIELD_MISSING, "MRG-1 prior patient identifier "
                                      "list is empty", header=h, location=("MRG", 1))
            pairs.append(MergePair(_patient(msg, current, default_tz), prior))
            current = None
    if current is not None:
        raise MessageRejected(SEGMENT_SEQUENCE_ERROR, "PID segment without its MRG segment",
                              header=h, location=("MRG", 0))
    if not pairs:
        raise MessageRejected(SEGMENT_SEQUENCE_ERROR, "PID and MRG segments are missing",
                              header=h, location=("PID", 0))
    return pairs


def _patient(msg: Hl7Message, pid: Any, default_tz: tzinfo | None) -> Patient:
    h = msg.header
    identifiers = _identifiers(msg, pid, 3)
    if not identifiers:
        raise MessageRejected(REQUIRED_FIELD_MISSING, "PID-3 patient identifier list is empty",
                              header=h, location=("PID", 3))
    try:
        birth_date = parse_date(msg.value(pid, 7))
    except ValueError:
        raise MessageRejected(DATA_TYPE_ERROR, "PID-7 date of birth is not a valid date",
                              header=h, location=("PID", 7)) from None
    try:
        death = parse_dtm(msg.value(pid, 29), default_tz=default_tz)
    except ValueError:
        raise MessageRejected(DATA_TYPE_ERROR, "PID-29 death date/time is not a valid DTM",
                              header=h, location=("PID", 29)) from None
    sex = msg.value(pid, 8).strip().upper() or None
    indicator = msg.value(pid, 30).strip().upper()
    deceased = True if indicator == "Y" else False if indicator == "N" else None
    return Patient(identifiers=identifiers, names=_names(msg, pid, 5), birth_date=birth_date,
                   sex=sex, death_datetime=death, deceased=deceased)


def _part(rep: list[list[str]], component: int, subcomponent: int = 1) -> str:
    try:
        return rep[component - 1][subcomponent - 1].strip()
    except IndexError:
        return ""


def _identifiers(msg: Hl7Message, seg: Any, number: int) -> tuple[CX, ...]:
    out: list[CX] = []
    for rep in msg.field(seg, number):
        if not _part(rep, 1):
            continue
        cx = CX(id_number=_part(rep, 1), assigning_authority=_part(rep, 4, 1),
                identifier_type_code=_part(rep, 5), universal_id=_part(rep, 4, 2),
                universal_id_type=_part(rep, 4, 3))
        if cx not in out:
            out.append(cx)
    return tuple(out)


def _names(msg: Hl7Message, seg: Any, number: int) -> tuple[PersonName, ...]:
    out: list[PersonName] = []
    for rep in msg.field(seg, number):
        name = PersonName(family=_part(rep, 1), given=_part(rep, 2), middle=_part(rep, 3),
                          suffix=_part(rep, 4), prefix=_part(rep, 5), name_type=_part(rep, 7),
                          representation=_part(rep, 8))
        if any((name.family, name.given, name.middle, name.suffix, name.prefix)):
            out.append(name)
    return tuple(out)
