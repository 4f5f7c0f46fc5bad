"""Acknowledgments: MSH + MSA (+ ERR) for an inbound message, no I/O.

Follows HL7 v2.5.1 Chapter 2: §2.9.2 original acknowledgment rules (AA/AE/AR, table 0008),
§2.9.3 enhanced mode (accept acknowledgments CA/CE/CR as MSH-15 asks; see `reply_code`),
§2.15.9 MSH, §2.15.8 MSA, §2.15.5 ERR (ERR-3 HL7 error code, table 0357; ERR-4 severity) and
for v2.3/v2.4 peers ERR-1 (ELD). Texts name what is wrong and never carry patient data.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from fhirbridge.hl7.message import (
    APPLICATION_INTERNAL_ERROR,
    Delimiters,
    MessageHeader,
    MessageRejected,
    encode_text,
)

ACCEPT, ERROR, REJECT = "AA", "AE", "AR"
COMMIT_ACCEPT, COMMIT_ERROR, COMMIT_REJECT = "CA", "CE", "CR"  # enhanced mode, table 0008
_COMMIT = {ACCEPT: COMMIT_ACCEPT, ERROR: COMMIT_ERROR, REJECT: COMMIT_REJECT}

#: HL7 table 0357, the names used in ERR-3.2.
ERROR_NAMES = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "104": "Value too long",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}

DEFAULT_VERSION = "2.5.1"
MAX_TEXT = 80  # MSA-3 length in v2.5.1
_counter = itertools.count(1)
_prefix = f"{os.getpid() % 100000:05d}{int(time.time()) % 100000:05d}"


@dataclass(frozen=True, slots=True)
class AckDecision:
    """What the application says about a message it was handed: AA, or AE/AR with a text and
    an HL7 table 0357 code. Texts must not contain patient data."""

    code: str = ACCEPT
    text: str = ""
    error_code: str = ""
    location: tuple[str, int] | None = None  # ERR-2: (segment id, field number)

    @classmethod
    def accept(cls, text: str = "") -> AckDecision:
        return cls(ACCEPT, text)

    @classmethod
    def error(cls, text: str, error_code: str = APPLICATION_INTERNAL_ERROR,
              location: tuple[str, int] | None = None) -> AckDecision:
        return cls(ERROR, text, error_code, location)

    @classmethod
    def reject(cls, text: str, error_code: str) -> AckDecision:
        return cls(REJECT, text, error_code)


def new_control_id() -> str:
    """A control id for our ACK's MSH-10 (≤ 20 characters, unique per process run)."""
    return f"{_prefix}{next(_counter):010d}"


def reply_code(header: MessageHeader | None, code: str) -> str | None:
    """The MSA-1 to send for an original-mode decision `code` (AA/AE/AR), or None for none.

    Original mode (MSH-15 and MSH-16 both empty, §2.9.2): `code` itself. Enhanced mode
    (§2.9.3, either one present): the accept acknowledgment, sent once the message is
    durably committed (the listener calls this after the handler returned): AA → CA, AE → CE,
    AR → CR, as MSH-15 (table 0155) asks: AL (or empty, or unknown) always, NE never, SU
    only CA, ER only CE/CR. fhirbridge applies the message when it accepts it and sends no
    separate application acknowledgment: MSH-16 is treated as NE (README "Standards")."""
    if header is None or not (header.accept_ack_type or header.application_ack_type):
        return code
    commit = _COMMIT.get(code, code)
    mode = header.accept_ack_type.upper()
    if mode == "NE" or (mode == "SU" and commit != COMMIT_ACCEPT) or (
            mode == "ER" and commit == COMMIT_ACCEPT):
        return None
    return commit


def build_ack(header: MessageHeader | None, ack_code: str, *, text: str = "",
              error_code: str = "", error_location: tuple[str, int] | None = None,
              control_id: str | None = None, timestamp: datetime | None = None,
              application: str = "FHIRBRIDGE", facility: str = "") -> str:
    """The ACK message text (segments ended by <CR>) answering `header`'s message.

    Sending and receiving application/facility are swapped (our own names fill MSH-3/4 when
    the message left MSH-5/6 empty), MSH-9 is `ACK^<trigger>^ACK`, MSH-11/12 and MSH-18 are
    echoed. With no readable header an ACK with default delimiters and an empty MSA-2 is built.
    AE/AR carry an ERR segment when `error_code` is given."""
    if ack_code not in (ACCEPT, ERROR, REJECT, COMMIT_ACCEPT, COMMIT_ERROR, COMMIT_REJECT):
        raise ValueError("ack_code must be AA, AE, AR, CA, CE or CR")
    h = header if header is not None else MessageHeader()
    d: Delimiters = h.delimiters

    def esc(value: str) -> str:
        return encode_text(value, d)

    ts = (timestamp or datetime.now(timezone.utc)).astimezone(timezone.utc)
    version = h.version_raw or DEFAULT_VERSION
    trigger = esc(h.trigger_event)
    msh = [
        "MSH", d.encoding_characters,
        h.receiving_application_raw or esc(application),
        h.receiving_facility_raw or esc(facility),
        h.sending_application_raw, h.sending_facility_raw,
        ts.strftime("%Y%m%d%H%M%S") + "+0000", "",
        f"ACK{d.component}{trigger}{d.component}ACK",
        esc(control_id or new_control_id()),
        h.processing_id_raw or "P",
        version,
    ]
    if h.character_set_raw:
        msh += [""] * 5 + [h.character_set_raw]  # MSH-13 … MSH-17 empty, MSH-18
    short = _one_line(text)[:MAX_TEXT]
    segments = [
        d.field.join(msh),
        d.field.join(["MSA", ack_code, h.control_id_raw, esc(short)]),
    ]
    if ack_code not in (ACCEPT, COMMIT_ACCEPT) and error_code:
        segments.append(_err_segment(d, h, error_code, error_location, esc(_one_line(text))))
    return "\r".join(segments) + "\r"


def _err_segment(d: Delimiters, h: MessageHeader, code: str,
                 location: tuple[str, int] | None, text: str) -> str:
    name = ERROR_NAMES.get(code, "")
    if _version_tuple(h.version_id) >= (2, 5) or not h.version_id:
        # ERR-2 location (ERL), ERR-3 code (CWE), ERR-4 severity, ERR-8 user message
        loc = ""
        if location is not None:
            loc = d.component.join([location[0], "1", str(location[1])]) if location[1] else \
                location[0] + d.component + "1"
        cwe = d.component.join([code, name, "HL70357"])
        return d.field.join(["ERR", "", loc, cwe, "E", "", "", "", text])
    # v2.3 / v2.4: ERR-1 ELD = segment id ^ sequence ^ field position ^ code (CE, subcomponents)
    ce = d.subcomponent.join([code, name, "HL70357"])
    seg, fld = (location[0], str(location[1]) if location[1] else "") if location else ("", "")
    return d.field.join(["ERR", d.component.join([seg, "1" if seg else "", fld, ce])])


def encode_ack(ack: str, header: MessageHeader | None) -> bytes:
    """The ACK in the inbound message's character set (MSH-18), UTF-8 without a header."""
    encoding = header.encoding if header is not None else "utf-8"
    try:
        return ack.encode(encoding, errors="replace")
    except LookupError:
        return ack.encode("utf-8", errors="replace")


def ack_bytes(header: MessageHeader | None, decision: AckDecision, *,
              error_location: tuple[str, int] | None = None, application: str = "FHIRBRIDGE",
              facility: str = "", ack_code: str | None = None) -> bytes:
    """`build_ack` + `encode_ack` for an application decision (`ack_code`, e.g. from
    `reply_code`, replaces the decision's MSA-1)."""
    text = build_ack(header, ack_code or decision.code, text=decision.text,
                     error_code=decision.error_code,
                     error_location=error_location or decision.location,
                     application=application, facility=facility)
    return encode_ack(text, header)


def rejection_ack(exc: MessageRejected, *, application: str = "FHIRBRIDGE",
                  facility: str = "", ack_code: str | None = None) -> bytes:
    """The AR (or AE; `ack_code` CR/CE in enhanced mode) answering a message
    `decode_message`/`parse_adt` refused."""
    text = build_ack(exc.header, ack_code or exc.ack_code, text=exc.text,
                     error_code=exc.reason_code, error_location=exc.location,
                     application=application, facility=facility)
    return encode_ack(text, exc.header)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _version_tuple(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in v.split("."))
    except ValueError:
        return ()
