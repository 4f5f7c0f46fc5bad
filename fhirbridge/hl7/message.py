"""HL7 v2 message decoding: bytes → text by MSH-18, segments split on the delimiters, MSH checked.

Follows HL7 v2.5.1 Chapter 2 (Control): §2.5 message framework and delimiters, §2.6 message
construction rules, §2.7 escape sequences in text fields, §2.15.9 MSH (MSH-2 encoding
characters, MSH-9 message type, MSH-10 control id, MSH-12 version id, MSH-18 character set,
HL7 table 0211), §2.A.22 DTM / §2.A.77 TS for date/times; error codes are HL7 table 0357.

Nothing here opens a socket, a file or a database session. Exception texts name fields, never
their values (no PHI).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any

# -- HL7 table 0357 (message error condition codes) ---------------------------------------
SEGMENT_SEQUENCE_ERROR = "100"
REQUIRED_FIELD_MISSING = "101"
DATA_TYPE_ERROR = "102"
TABLE_VALUE_NOT_FOUND = "103"
UNSUPPORTED_MESSAGE_TYPE = "200"
UNSUPPORTED_EVENT_CODE = "201"
UNSUPPORTED_PROCESSING_ID = "202"
UNSUPPORTED_VERSION_ID = "203"
APPLICATION_INTERNAL_ERROR = "207"

#: MSH-12 VID-1 values accepted (HL7 table 0104, v2.3 to v2.8).
SUPPORTED_VERSIONS = frozenset(
    {"2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2"}
)

#: MSH-18 (HL7 table 0211) → Python codec. An empty MSH-18 means UTF-8 here (the standard's
#: default is ASCII, of which UTF-8 is a superset). UNICODE UTF-16/UTF-32 are not accepted:
#: their bytes collide with MLLP framing. Anything not listed is rejected (103).
CHARSETS: dict[str, str] = {
    "": "utf-8",
    "ASCII": "ascii",
    "ISO IR6": "ascii",
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",  # pre-v2.5 senders use the bare term for UTF-8 in practice
    "UTF-8": "utf-8",
    "UTF8": "utf-8",
    **{f"8859/{n}": f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15)},
    **{f"ISO-8859-{n}": f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15)},
    "ISO IR100": "iso8859-1",
    "ISO IR87": "iso2022_jp",  # JIS X 0208 through ISO 2022 escapes (JAHIS usage)
    "ISO IR159": "iso2022_jp_1",  # JIS X 0212
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "BIG-5": "big5",
}

DEFAULT_ENCODING_CHARACTERS = "^~\\&"
_SEGMENT_ID = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_DTM = re.compile(
    r"^(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,4}))?)?)?)?)?)?"
    r"([+-]\d{4})?$"
)
_SAFE_TOKEN = re.compile(r"[^A-Za-z0-9_.]")
_HEX = frozenset("0123456789abcdefABCDEF")


class EscapeError(ValueError):
    """A text field uses an escape sequence (§2.7) this decoder does not implement: a
    character-set switch (\\C..\\, \\M..\\, ISO 2022 shifts, §2.7.2/2.7.3) or a malformed
    \\X..\\ (odd length, not hex). Guessing would store a garbled name: refuse instead."""


class MessageRejected(Exception):
    """The message cannot be parsed or is not acceptable: answer AR (or AE) with this code.

    `reason_code` is an HL7 table 0357 code; `text` says what is structurally wrong and never
    carries a field value; `header` is what could be read of MSH (None when nothing could) so
    the ACK can still be addressed; `location` is (segment id, field number) when known.
    """

    def __init__(self, reason_code: str, text: str, *, header: MessageHeader | None = None,
                 location: tuple[str, int] | None = None, ack_code: str = "AR") -> None:
        super().__init__(f"{reason_code}: {text}")
        self.reason_code = reason_code
        self.text = text
        self.header = header
        self.location = location
        self.ack_code = ack_code


@dataclass(frozen=True, slots=True)
class Delimiters:
    """MSH-1 and MSH-2 (§2.5.4): field, component, repetition, escape, subcomponent."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    @property
    def encoding_characters(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent


_DEFAULT_DELIMITERS = Delimiters()


@dataclass(frozen=True, slots=True)
class MessageHeader:
    """What MSH says. The `*_raw` fields keep the field text exactly as received (escaped, with
    the message's own delimiters) for echoing in the ACK; the others are decoded values."""

    delimiters: Delimiters = field(default_factory=Delimiters)
    sending_application_raw: str = ""  # MSH-3 (HD)
    sending_facility_raw: str = ""  # MSH-4 (HD)
    receiving_application_raw: str = ""  # MSH-5
    receiving_facility_raw: str = ""  # MSH-6
    sending_application: str = ""  # HD-1 namespace id, or HD-2 universal id when HD-1 is empty
    sending_facility: str = ""
    message_code: str = ""  # MSH-9.1
    trigger_event: str = ""  # MSH-9.2
    message_structure: str = ""  # MSH-9.3
    control_id: str = ""  # MSH-10, decoded
    control_id_raw: str = ""  # MSH-10 as received, echoed in MSA-2
    processing_id_raw: str = ""  # MSH-11
    version_id: str = ""  # MSH-12 VID-1
    version_raw: str = ""  # MSH-12 as received
    accept_ack_type: str = ""  # MSH-15 (enhanced mode; we answer original mode anyway)
    application_ack_type: str = ""  # MSH-16
    character_set_raw: str = ""  # MSH-18 as received (all repetitions); "" when unknown
    encoding: str = "utf-8"  # the Python codec the message was decoded with; the ACK uses it
    message_datetime: datetime | None = None  # MSH-7


@dataclass(frozen=True)
class Hl7Message:
    """A decoded message whose MSH passed the checks. `parsed` holds one entry per kept
    segment: its raw (still escaped) fields split on MSH-1 only, numbered like the standard
    (`seg[n]` is field n; for MSH `seg[1]` is MSH-1 and `seg[2]` MSH-2). Repetitions,
    components and subcomponents are split when a field is read. Field accessors return
    decoded text: escape sequences resolved (§2.7), the HL7 null `""` read as empty."""

    header: MessageHeader
    parsed: list[list[str]]
    segment_ids: tuple[str, ...]

    @property
    def delimiters(self) -> Delimiters:
        return self.header.delimiters

    def segments(self, segment_id: str) -> list[Any]:
        return [s for sid, s in self.ordered() if sid == segment_id]

    def first(self, segment_id: str) -> Any | None:
        for sid, s in zip(self.segment_ids, self.parsed, strict=True):
            if sid == segment_id:
                return s
        return None

    def ordered(self) -> list[tuple[str, Any]]:
        return list(zip(self.segment_ids, self.parsed, strict=True))

    def text(self, raw: str) -> str:
        return decode_text(raw, self.header.delimiters, self.header.encoding)

    def field(self, segment: Any, number: int) -> list[list[list[str]]]:
        """Decoded repetitions → components → subcomponents of one field (empty list when
        the field is absent)."""
        return [[[self.text(s) for s in comp] for comp in rep]
                for rep in raw_repetitions(segment, number, self.header.delimiters)]

    def value(self, segment: Any, number: int, component: int = 1, subcomponent: int = 1,
              repetition: int = 1) -> str:
        reps = raw_repetitions(segment, number, self.header.delimiters)
        try:
            raw = reps[repetition - 1][component - 1][subcomponent - 1]
        except IndexError:
            return ""
        return self.text(raw)


# -- structure helpers ---------------------------------------------------------------------
def split_segment(line: str, fs: str) -> list[str]:
    """One segment's raw fields, indexed by field number (MSH: MSH-1 is inserted so that
    `seg[n]` is MSH-n, as for every other segment)."""
    fields = line.split(fs)
    if fields[0] == "MSH":
        fields.insert(1, fs)
    return fields


def raw_repetitions(segment: Any, number: int,
                    delimiters: Delimiters | None = None) -> list[list[list[str]]]:
    """Field `number` of a segment (from `split_segment`) as repetitions → components →
    subcomponents of raw (still escaped) strings. For MSH, `number` is the MSH field number
    as well; MSH-1 and MSH-2 are returned whole."""
    if segment is None or number >= len(segment) or number < 1:
        return []
    raw = segment[number]
    if segment[0] == "MSH" and number <= 2:
        return [[[raw]]]
    d = delimiters or _DEFAULT_DELIMITERS
    sub = d.subcomponent
    if d.repetition not in raw and d.component not in raw and sub not in raw:
        return [[[raw]]]
    return [[comp.split(sub) for comp in rep.split(d.component)]
            for rep in raw.split(d.repetition)]


def decode_text(raw: str, delimiters: Delimiters, encoding: str = "utf-8") -> str:
    """Resolve escape sequences in one leaf value (§2.7): \\F\\ \\S\\ \\T\\ \\R\\ \\E\\, \\Xhh..\\
    as bytes in the message's character set; highlighting, formatting and locally defined
    (\\Z..\\) sequences are dropped. `""` (the HL7 null) becomes "".

    Raises EscapeError for a character-set switch (\\C..\\, \\M..\\) or a \\X..\\ that is not
    an even number of hex digits: the text cannot be read faithfully."""
    if raw == '""':
        return ""
    esc = delimiters.escape
    if esc not in raw:
        return raw
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c != esc:
            out.append(c)
            i += 1
            continue
        end = raw.find(esc, i + 1)
        if end < 0:  # unterminated: keep the rest literally
            out.append(raw[i:])
            break
        seq = raw[i + 1:end]
        i = end + 1
        if seq == "F":
            out.append(delimiters.field)
        elif seq == "S":
            out.append(delimiters.component)
        elif seq == "T":
            out.append(delimiters.subcomponent)
        elif seq == "R":
            out.append(delimiters.repetition)
        elif seq == "E":
            out.append(esc)
        elif seq[:1] == "X" and len(seq) > 1:
            hexdigits = seq[1:]
            if len(hexdigits) % 2 or not all(ch in _HEX for ch in hexdigits):
                raise EscapeError("\\X..\\ escape is not an even number of hex digits")
            data = bytes.fromhex(hexdigits)
            try:
                out.append(data.decode(encoding))
            except (UnicodeDecodeError, LookupError):
                out.append(data.decode("latin-1"))
        elif seq in (".br", ".sp") or seq.startswith(".sp"):
            out.append(" ")
        elif seq[:1] in ("C", "M") and len(seq) > 1:  # §2.7.2/2.7.3 ISO 2022 switches
            raise EscapeError("character-set switch escapes (\\C..\\, \\M..\\) are not supported")
        # \H\ \N\ .fi .nf .in .ti .sk .ce \Zxx\ : dropped
    return "".join(out)


def encode_text(value: str, delimiters: Delimiters) -> str:
    """The reverse of `decode_text` for the delimiter characters (§2.7.1); escape first."""
    d = delimiters
    return (value.replace(d.escape, f"{d.escape}E{d.escape}")
            .replace(d.field, f"{d.escape}F{d.escape}")
            .replace(d.component, f"{d.escape}S{d.escape}")
            .replace(d.subcomponent, f"{d.escape}T{d.escape}")
            .replace(d.repetition, f"{d.escape}R{d.escape}")
            .replace("\r", " ").replace("\n", " "))


# -- date/time (§2.A.22 DTM, §2.A.77 TS) ------------------------------------------------------
def parse_dtm(value: str, *, default_tz: tzinfo | None = timezone.utc) -> datetime | None:
    """`YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]` → datetime; "" → None.

    With a zone offset the result carries it. Without one, HL7 says local time of the sender;
    we attach `default_tz` (UTC unless the caller knows the sender's zone); pass None to get a
    naive datetime. Raises ValueError when the value is not a DTM."""
    value = value.strip()
    if not value:
        return None
    m = _DTM.match(value)
    if m is None:
        raise ValueError("not an HL7 DTM")
    year, month, day, hour, minute, second, frac, zone = m.groups()
    micro = int((frac or "0").ljust(6, "0")[:6])
    dt = datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0),
                  int(second or 0), micro)
    if zone:
        sign = -1 if zone[0] == "-" else 1
        hh, mm = int(zone[1:3]), int(zone[3:5])
        if hh > 23 or mm > 59:
            raise ValueError("bad zone offset")
        return dt.replace(tzinfo=timezone(sign * timedelta(hours=hh, minutes=mm)))
    return dt.replace(tzinfo=default_tz) if default_tz is not None else dt


def parse_date(value: str) -> str | None:
    """A DTM/TS used as a date (PID-7) → "YYYY-MM-DD"; None when empty or coarser than a day.
    Raises ValueError when it is not a valid DTM."""
    value = value.strip()
    if not value:
        return None
    m = _DTM.match(value)
    if m is None:
        raise ValueError("not an HL7 DTM")
    parse_dtm(value)  # calendar and zone check
    year, month, day = m.group(1), m.group(2), m.group(3)
    if month is None or day is None:
        return None
    return f"{year}-{month}-{day}"


# -- decoding ---------------------------------------------------------------------------------
def charset_codec(msh18: str) -> str | None:
    """The Python codec for an MSH-18 value (its first repetition), or None if unsupported."""
    key = " ".join(msh18.strip().upper().split())
    return CHARSETS.get(key)


def decode_message(raw: bytes, *, default_tz: tzinfo | None = timezone.utc,
                   segments: Collection[str] | None = None) -> Hl7Message:
    """Decode and parse one message (the bytes between MLLP <VT> and <FS>) and check MSH.

    Every segment must start with a valid segment id; only MSH and the ids in `segments` (all
    when None) are kept — parsing is most of the cost, and an ADT message's
    PV1/NK1/OBX/IN1 … segments are not read by anything here.

    Raises MessageRejected (with whatever header could be read) when the bytes are not an
    acceptable HL7 v2 message."""
    start = 0
    n = len(raw)
    if raw.startswith(b"\xef\xbb\xbf"):
        start = 3
    while start < n and raw[start] in b" \t\r\n":
        start += 1
    if raw[start:start + 3] != b"MSH" or n - start < 8:
        raise MessageRejected(SEGMENT_SEQUENCE_ERROR, "the message does not start with an MSH "
                              "segment", location=("MSH", 0))
    data = raw[start:]
    fs_byte = data[3:4]
    if not _valid_delimiter(fs_byte):
        raise MessageRejected(DATA_TYPE_ERROR, "MSH-1 field separator is not a valid "
                              "delimiter", location=("MSH", 1))
    eol = _first_eol(data)
    msh_bytes = data[:eol]
    raw_fields = msh_bytes.split(fs_byte)  # [b"MSH", MSH-2, MSH-3, ...]
    enc_chars = raw_fields[1].decode("latin-1") if len(raw_fields) > 1 else ""
    fs = fs_byte.decode("latin-1")

    if not _valid_encoding_characters(enc_chars, fs):
        header = _fallback_header(raw_fields, fs)
        raise MessageRejected(DATA_TYPE_ERROR, "MSH-2 encoding characters are not valid",
                              header=header, location=("MSH", 2))
    delims = Delimiters(fs, enc_chars[0], enc_chars[1], enc_chars[2], enc_chars[3])

    msh18_raw = raw_fields[17].decode("latin-1") if len(raw_fields) > 17 else ""
    first_charset = msh18_raw.split(delims.repetition)[0]
    codec = charset_codec(first_charset)
    if codec == "ascii" or not first_charset.strip():
        # JAHIS style: first repetition empty/ASCII, ISO IR87 (IR159) announced as an
        # alternate set switched to with ISO 2022 escapes
        alternates = {" ".join(r.strip().upper().split())
                      for r in msh18_raw.split(delims.repetition)[1:]}
        if "ISO IR159" in alternates:
            codec = "iso2022_jp_1"
        elif "ISO IR87" in alternates:
            codec = "iso2022_jp"
    if codec is None:
        header = _fallback_header(raw_fields, fs, delims)
        raise MessageRejected(TABLE_VALUE_NOT_FOUND, "MSH-18 character set is not supported",
                              header=header, location=("MSH", 18))
    try:
        text = data.decode(codec)
    except UnicodeDecodeError:
        header = _fallback_header(raw_fields, fs, delims, msh18_raw, codec)
        raise MessageRejected(DATA_TYPE_ERROR, "the message bytes are not valid in the "
                              "declared character set (MSH-18)", header=header,
                              location=("MSH", 18)) from None

    # §2.6: segments end with <CR>; accept LF and CRLF too, drop empty lines.
    if "\n" in text:
        text = text.replace("\r\n", "\r").replace("\n", "\r")
    lines = [s for s in text.split("\r") if s.strip()]
    try:
        header = _read_header(lines[0].split(fs), delims, msh18_raw, codec, default_tz)
    except EscapeError:
        raise MessageRejected(DATA_TYPE_ERROR, "MSH uses an escape sequence that is not "
                              "supported", header=_fallback_header(raw_fields, fs, delims,
                                                                   msh18_raw, codec),
                              location=("MSH", 0)) from None
    if codec.startswith("iso8859") and not data.isascii() and _valid_utf8(data):
        # MSH-18 says ISO 8859 but the bytes are UTF-8 ("Müller" would be read "MÃ¼ller").
        # Real 8859 text with letters beyond ASCII is practically never valid UTF-8.
        raise MessageRejected(DATA_TYPE_ERROR, "the message bytes are UTF-8, not the "
                              "character set MSH-18 declares", header=header,
                              location=("MSH", 18), ack_code="AE")
    kept: list[str] = []
    ids: list[str] = []
    for i, line in enumerate(lines):
        sid = line[:3]
        if not _SEGMENT_ID.match(sid) or (len(line) > 3 and line[3] != fs):
            raise MessageRejected(SEGMENT_SEQUENCE_ERROR, f"segment {i + 1} has no valid "
                                  "segment id", header=header)
        if i > 0 and sid == "MSH":
            raise MessageRejected(SEGMENT_SEQUENCE_ERROR, "more than one MSH segment",
                                  header=header, location=("MSH", 0))
        if i == 0 or segments is None or sid in segments:
            kept.append(line)
            ids.append(sid)
    # Fields are split here; repetitions, components and subcomponents only when read
    # (python-hl7's parse built every container and was most of the cost of an ADT message).
    parsed = [split_segment(line, fs) for line in kept]
    return Hl7Message(header=header, parsed=parsed, segment_ids=tuple(ids))


def _read_header(fields: list[str], d: Delimiters, msh18_raw: str, codec: str,
                 default_tz: tzinfo | None) -> MessageHeader:
    """`fields` is the decoded MSH line split on MSH-1: fields[n - 1] is MSH-n."""
    def raw_field(n: int) -> str:
        return fields[n - 1] if n <= len(fields) else ""

    def comp(n: int, c: int = 1) -> str:
        parts = raw_field(n).split(d.repetition, 1)[0].split(d.component)
        if c > len(parts):
            return ""
        return decode_text(parts[c - 1].split(d.subcomponent, 1)[0], d, codec)

    def hd(n: int) -> str:
        return comp(n, 1) or comp(n, 2)

    base = dict(
        delimiters=d,
        sending_application_raw=raw_field(3), sending_facility_raw=raw_field(4),
        receiving_application_raw=raw_field(5), receiving_facility_raw=raw_field(6),
        sending_application=hd(3), sending_facility=hd(4),
        message_code=comp(9, 1).strip(), trigger_event=comp(9, 2).strip(),
        message_structure=comp(9, 3).strip(),
        control_id=comp(10).strip(), control_id_raw=raw_field(10),
        processing_id_raw=raw_field(11),
        version_id=comp(12).strip(), version_raw=raw_field(12),
        accept_ack_type=comp(15).strip(), application_ack_type=comp(16).strip(),
        character_set_raw=msh18_raw, encoding=codec,
    )
    partial = MessageHeader(**base)  # type: ignore[arg-type]
    if not partial.control_id:
        raise MessageRejected(REQUIRED_FIELD_MISSING, "MSH-10 message control id is missing",
                              header=partial, location=("MSH", 10))
    if not partial.version_id:
        raise MessageRejected(REQUIRED_FIELD_MISSING, "MSH-12 version id is missing",
                              header=partial, location=("MSH", 12))
    if partial.version_id not in SUPPORTED_VERSIONS:
        raise MessageRejected(UNSUPPORTED_VERSION_ID, "MSH-12 version id is not supported "
                              "(2.3 to 2.8 are)", header=partial, location=("MSH", 12))
    if not partial.message_code:
        raise MessageRejected(REQUIRED_FIELD_MISSING, "MSH-9 message type is missing",
                              header=partial, location=("MSH", 9))
    ts = comp(7)
    if not ts.strip():
        raise MessageRejected(REQUIRED_FIELD_MISSING, "MSH-7 date/time of message is missing",
                              header=partial, location=("MSH", 7))
    try:
        when = parse_dtm(ts, default_tz=default_tz)
    except ValueError:
        raise MessageRejected(DATA_TYPE_ERROR, "MSH-7 date/time of message is not a valid "
                              "DTM", header=partial, location=("MSH", 7)) from None
    return MessageHeader(**base, message_datetime=when)  # type: ignore[arg-type]


def _fallback_header(raw_fields: list[bytes], fs: str, delims: Delimiters | None = None,
                     msh18_raw: str = "", codec: str = "") -> MessageHeader:
    """Best-effort MSH for addressing an AR when the message itself cannot be decoded. With
    unknown delimiters only values free of any default delimiter are kept (they are echoed with
    default delimiters); values are read as Latin-1 so no byte is lost or raises."""
    trusted = delims is not None
    d = delims if delims is not None else Delimiters(field="|")

    def raw(n: int) -> str:
        i = n - 1  # raw_fields[0] is "MSH", raw_fields[1] is MSH-2
        if i >= len(raw_fields):
            return ""
        v = raw_fields[i].decode("latin-1")
        if any(ch < " " or ch == "\x7f" for ch in v):
            return ""
        if not trusted and any(ch in v for ch in "|^~\\&"):
            return ""
        if not v.isascii():
            return ""
        return v

    def first(v: str) -> str:
        return v.split(d.repetition)[0].split(d.component)[0]

    msg_type = raw(9).split(d.component) if trusted else [raw(9)]
    return MessageHeader(
        delimiters=d,
        sending_application_raw=raw(3), sending_facility_raw=raw(4),
        receiving_application_raw=raw(5), receiving_facility_raw=raw(6),
        sending_application=first(raw(3)), sending_facility=first(raw(4)),
        message_code=msg_type[0] if msg_type else "",
        trigger_event=msg_type[1] if len(msg_type) > 1 else "",
        control_id=raw(10), control_id_raw=raw(10),
        processing_id_raw=raw(11), version_id=first(raw(12)), version_raw=raw(12),
        character_set_raw=msh18_raw if codec else "",
        encoding=codec or "utf-8",
    )


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _first_eol(data: bytes) -> int:
    cr, lf = data.find(b"\r"), data.find(b"\n")
    ends = [i for i in (cr, lf) if i >= 0]
    return min(ends) if ends else len(data)


def _valid_delimiter(b: bytes) -> bool:
    if len(b) != 1:
        return False
    c = b[0]
    return 0x21 <= c <= 0x7E and not chr(c).isalnum()


def _valid_encoding_characters(enc: str, fs: str) -> bool:
    """MSH-2: component, repetition, escape, subcomponent (+ the v2.7 truncation character):
    distinct printable non-alphanumeric ASCII, none equal to the field separator."""
    if len(enc) not in (4, 5):
        return False
    if len(set(enc)) != len(enc) or fs in enc:
        return False
    return all(_valid_delimiter(ch.encode("latin-1")) for ch in enc)


def safe_token(value: str, limit: int = 16) -> str:
    """A code from the message reduced to [A-Za-z0-9_.], for texts that name it (never PHI)."""
    return _SAFE_TOKEN.sub("", value)[:limit]
