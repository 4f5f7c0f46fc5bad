"""HL7 v2 decoding, ADT → events and ACK building (fhirbridge.hl7.message/adt/ack), no sockets."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import hl7
import pytest

from fhirbridge.hl7 import (
    CX,
    AckDecision,
    IdentifierChange,
    MessageRejected,
    OtherEvent,
    PatientMerge,
    PatientUpsert,
    PersonName,
    build_ack,
    decode_message,
    parse_adt,
)
from fhirbridge.hl7.ack import ack_bytes, rejection_ack, reply_code
from fhirbridge.hl7.message import (
    Delimiters,
    EscapeError,
    decode_text,
    encode_text,
    parse_date,
    parse_dtm,
)

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "adt"
PHI = ("Müller", "José", "MRN", "19840307", "1984", "Dupont", "4711")


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def msg(*segments: str, encoding: str = "utf-8") -> bytes:
    return ("\r".join(segments) + "\r").encode(encoding)


MSH_A08 = "MSH|^~\\&|ADT|HOSP|FHIRBRIDGE|HOSP|20261120100000||ADT^A08^ADT_A01|CTRL-1|P|2.5.1"
PID_OK = "PID|1||MRN1^^^HOSP^MR||Müller^José||19840307|M"


def rejected(raw: bytes) -> MessageRejected:
    with pytest.raises(MessageRejected) as info:
        parse_adt(raw)
    return info.value


def parse_ack(data: bytes, encoding: str = "utf-8") -> hl7.Message:
    return hl7.parse(data.decode(encoding))


# -- samples: every event type ----------------------------------------------------------------
@pytest.mark.parametrize("name,cls,event_type", [
    ("a01.hl7", PatientUpsert, "A01"),
    ("a08.hl7", PatientUpsert, "A08"),
    ("a08-latin1.hl7", PatientUpsert, "A08"),
    ("a28.hl7", PatientUpsert, "A28"),
    ("a31.hl7", PatientUpsert, "A31"),
    ("a40.hl7", PatientMerge, "A40"),
    ("a47.hl7", IdentifierChange, "A47"),
])
def test_samples_parse_to_their_event(name: str, cls: type, event_type: str) -> None:
    raw = sample(name)
    assert b"\n" not in raw and raw.count(b"\r") >= 3  # CR segment separators
    parsed = parse_adt(raw)
    assert isinstance(parsed.event, cls)
    assert parsed.event.event_type == event_type
    assert parsed.event.message_control_id == parsed.header.control_id != ""
    assert parsed.event.message_datetime.tzinfo is not None


def test_a01_identifiers_names_dates() -> None:
    ev = parse_adt(sample("a01.hl7")).event
    assert isinstance(ev, PatientUpsert)
    assert ev.sending_application == "ADT" and ev.sending_facility == "HOSP"
    plus1 = timezone(timedelta(hours=1))
    assert ev.message_datetime == datetime(2026, 11, 20, 8, 30, tzinfo=plus1)
    assert ev.event_datetime == datetime(2026, 11, 20, 8, 25, tzinfo=plus1)  # EVN-2
    p = ev.patient
    assert p.identifiers == (
        CX("MRN10001", "HOSP", "MR"),
        CX("4711", "REGION", "PI", universal_id="2.16.840.1.113883.3.999",
           universal_id_type="ISO"),
    )
    # XPN order: family ^ given ^ middle ^ suffix ^ prefix ^ degree ^ type
    assert p.names == (PersonName(family="Müller", given="José", middle="Antonio", suffix="Jr",
                                  prefix="Dr", name_type="L"),)
    assert p.birth_date == "1984-03-07" and p.sex == "M"
    assert p.deceased is None and p.death_datetime is None


def test_a08_escape_sequences_decoded() -> None:
    ev = parse_adt(sample("a08.hl7")).event
    assert isinstance(ev, PatientUpsert)
    first, second = ev.patient.names
    assert first.family == "Dupont&Durand"  # \T\
    assert first.given == "Renée"  # \XC3A9\ = UTF-8 bytes of é
    assert second.family == "O^Neill"  # \S\
    assert second.given == "Ren\\"  # \E\
    assert second.name_type == "A"
    assert ev.patient.birth_date == "1980-01-15"  # YYYYMMDDHHMM accepted
    assert [cx.assigning_authority for cx in ev.patient.identifiers] == ["HOSP", "NATIONAL"]
    # no zone in MSH-7 / EVN-2: read as UTC
    assert ev.message_datetime == datetime(2026, 11, 20, 10, 0, tzinfo=timezone.utc)


def test_a28_japanese_name_repetitions() -> None:
    ev = parse_adt(sample("a28.hl7")).event
    assert isinstance(ev, PatientUpsert)
    names = {(n.representation, n.family, n.given) for n in ev.patient.names}
    assert names == {("A", "Yamada", "Tarou"), ("I", "山田", "太郎"), ("P", "やまだ", "たろう")}
    assert ev.message_datetime.utcoffset() == timedelta(hours=9)
    assert ev.patient.identifiers[1].universal_id == "1.2.392.100495.20.3.51"


def test_a31_death_and_partial_birth_date() -> None:
    ev = parse_adt(sample("a31.hl7")).event
    assert isinstance(ev, PatientUpsert)
    assert ev.patient.birth_date is None  # "1950": coarser than a day
    assert ev.patient.deceased is True
    assert ev.patient.death_datetime == datetime(2026, 11, 19, 23, 15, tzinfo=timezone.utc)
    assert ev.patient.names[0].family == "Nguyễn"  # no MSH-18: UTF-8


def test_a40_several_pid_mrg_pairs() -> None:
    ev = parse_adt(sample("a40.hl7")).event
    assert isinstance(ev, PatientMerge)
    assert len(ev.merges) == 2
    a, b = ev.merges
    assert a.surviving.identifiers == (CX("MRN10001", "HOSP", "MR"),)
    assert [c.id_number for c in a.prior_identifiers] == ["MRN20001", "TMP-77"]
    assert a.prior_identifiers[1].assigning_authority == "REGION"
    assert b.surviving.identifiers[0].id_number == "MRN10002"
    assert b.prior_identifiers == (CX("MRN20002", "HOSP", "MR"),)


def test_a47_identifier_change() -> None:
    ev = parse_adt(sample("a47.hl7")).event
    assert isinstance(ev, IdentifierChange)
    assert ev.prior_identifiers == (CX("MRN10001", "HOSP", "MR"),)
    assert ev.patient.identifiers == (CX("MRN10009", "HOSP", "MR"),)


@pytest.mark.parametrize("trigger", ["A18", "A34", "A36"])
def test_older_merges_one_pair(trigger: str) -> None:
    raw = msg(MSH_A08.replace("ADT^A08^ADT_A01", f"ADT^{trigger}"), f"EVN|{trigger}|20261120",
              PID_OK, "MRG|OLD1^^^HOSP^MR")
    ev = parse_adt(raw).event
    assert isinstance(ev, PatientMerge) and ev.event_type == trigger
    assert ev.merges[0].prior_identifiers == (CX("OLD1", "HOSP", "MR"),)
    two = msg(MSH_A08.replace("ADT^A08^ADT_A01", f"ADT^{trigger}"), PID_OK, "MRG|O1",
              PID_OK, "MRG|O2")
    assert rejected(two).reason_code == "100"


@pytest.mark.parametrize("trigger", ["A02", "A03", "A11", "Z99"])
def test_other_adt_events(trigger: str) -> None:
    raw = msg(MSH_A08.replace("A08^ADT_A01", trigger), "EVN||20261120095900", PID_OK)
    ev = parse_adt(raw).event
    assert type(ev) is OtherEvent and ev.event_type == trigger
    assert ev.event_datetime == datetime(2026, 11, 20, 9, 59, tzinfo=timezone.utc)


def test_trigger_from_evn_when_msh9_has_none() -> None:
    raw = msg(MSH_A08.replace("ADT^A08^ADT_A01", "ADT"), "EVN|A08|20261120", PID_OK)
    assert parse_adt(raw).event.event_type == "A08"


def test_event_datetime_falls_back_to_msh7_and_default_tz() -> None:
    raw = msg(MSH_A08, PID_OK)  # no EVN
    ev = parse_adt(raw).event
    assert ev.event_datetime == ev.message_datetime
    cet = timezone(timedelta(hours=1))
    ev2 = parse_adt(raw, default_tz=cet).event
    assert ev2.message_datetime == datetime(2026, 11, 20, 10, 0, tzinfo=cet)


def test_lf_and_crlf_separators_are_normalised() -> None:
    cr = parse_adt(sample("a40.hl7")).event
    assert parse_adt(sample("a40.hl7").replace(b"\r", b"\n")).event == cr
    assert parse_adt(sample("a40.hl7").replace(b"\r", b"\r\n")).event == cr
    assert parse_adt(b"\n\n" + sample("a40.hl7") + b"\r\r\n").event == cr


def test_repeated_control_id_parses_the_same() -> None:
    raw = sample("a08.hl7")
    first, second = parse_adt(raw), parse_adt(raw)
    assert first.event == second.event and first.header == second.header
    assert hash(first.event) == hash(second.event)  # frozen, hashable


def test_hl7_null_is_empty() -> None:
    raw = msg(MSH_A08, 'PID|1||MRN1^^^HOSP^MR~""||""^""||""|""')
    p = parse_adt(raw).event.patient  # type: ignore[union-attr]
    assert p.identifiers == (CX("MRN1", "HOSP", "MR"),)
    assert p.names == () and p.birth_date is None and p.sex is None


def test_msh18_8859_1() -> None:
    raw = sample("a08-latin1.hl7")
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")  # really Latin-1 bytes
    parsed = parse_adt(raw)
    assert parsed.header.encoding == "iso8859-1"
    ev = parsed.event
    assert isinstance(ev, PatientUpsert)
    assert (ev.patient.names[0].family, ev.patient.names[0].given) == ("Brontë", "Zoë")
    ack = ack_bytes(parsed.header, AckDecision.accept())
    assert parse_ack(ack, "latin-1")["MSH.18"] == "8859/1"
    # the same bytes without MSH-18 are not UTF-8: AR 102, never mojibake
    err = rejected(raw.replace(b"|8859/1", b""))
    assert err.reason_code == "102" and err.location == ("MSH", 18)


def test_hex_escape_in_latin1_message() -> None:
    raw = msg(MSH_A08 + "||||||8859/1", "PID|1||MRN1^^^HOSP||M\\XFC\\ller^Zo\\XEB\\",
              encoding="latin-1")
    name = parse_adt(raw).event.patient.names[0]  # type: ignore[union-attr]
    assert (name.family, name.given) == ("Müller", "Zoë")


def test_iso_ir87_japanese_charset() -> None:
    raw = msg(MSH_A08 + "||||||~ISO IR87", "PID|1||MRN1^^^HOSP||山田^太郎", encoding="iso2022_jp")
    assert b"\x1b$B" in raw
    parsed = parse_adt(raw)
    assert parsed.event.patient.names[0].family == "山田"  # type: ignore[union-attr]
    ack = parse_ack(ack_bytes(parsed.header, AckDecision.accept()))
    assert str(ack.segment("MSH")(18)) == "~ISO IR87"


def test_enhanced_mode_fields_accepted() -> None:
    parsed = parse_adt(sample("a01.hl7"))  # MSH-15 AL, MSH-16 NE
    assert (parsed.header.accept_ack_type, parsed.header.application_ack_type) == ("AL", "NE")
    code = reply_code(parsed.header, "AA")  # v2.5.1 §2.9.3: accept ACK after the commit
    ack = parse_ack(ack_bytes(parsed.header, AckDecision.accept(), ack_code=code))
    assert ack["MSA.1"] == "CA" and ack["MSH.15"] == "" and ack["MSH.16"] == ""


@pytest.mark.parametrize("msh15_16,aa,ae,ar", [
    ("", "AA", "AE", "AR"),  # original mode unchanged
    ("|||AL|NE", "CA", "CE", "CR"),
    ("|||AL|AL", "CA", "CE", "CR"),  # no application ACK: MSH-16 treated as NE
    ("||||AL", "CA", "CE", "CR"),  # enhanced, MSH-15 empty: accept ACK always
    ("|||NE|NE", None, None, None),
    ("|||SU|NE", "CA", None, None),
    ("|||ER|NE", None, "CE", "CR"),
])
def test_reply_code_enhanced_mode(msh15_16: str, aa: str | None, ae: str | None,
                                  ar: str | None) -> None:
    header = parse_adt(msg(MSH_A08 + msh15_16, PID_OK)).header
    assert [reply_code(header, c) for c in ("AA", "AE", "AR")] == [aa, ae, ar]


@pytest.mark.parametrize("value", [
    "M\\C2842\\ller",  # §2.7.2 single-byte character set switch
    "\\M2442\\Yamada",  # §2.7.3 multi-byte switch
    "M\\XFC0\\ller",  # odd number of hex digits
    "M\\XGG\\ller",  # not hex
])
def test_unsupported_escapes_are_ae_102(value: str) -> None:
    err = rejected(msg(MSH_A08, f"PID|1||MRN1^^^HOSP||{value}^José||19840307"))
    assert (err.ack_code, err.reason_code) == ("AE", "102")
    for phi in PHI:
        assert phi not in err.text
    with pytest.raises(EscapeError):
        decode_text(value, Delimiters())


def test_utf8_bytes_declared_8859_1_are_ae() -> None:
    raw = msg(MSH_A08 + "||||||8859/1", PID_OK)  # UTF-8 bytes: would read "MÃ¼ller"
    err = rejected(raw)
    assert (err.ack_code, err.reason_code, err.location) == ("AE", "102", ("MSH", 18))
    latin1 = msg(MSH_A08 + "||||||8859/1", PID_OK, encoding="latin-1")
    name = parse_adt(latin1).event.patient.names[0]  # type: ignore[union-attr]
    assert (name.family, name.given) == ("Müller", "José")


def test_five_encoding_characters_v27() -> None:
    raw = msg(MSH_A08.replace("^~\\&", "^~\\&#").replace("2.5.1", "2.7"), PID_OK)
    assert parse_adt(raw).event.patient.names[0].given == "José"  # type: ignore[union-attr]


def test_other_delimiters() -> None:
    raw = msg("MSH#*$!@#ADT#HOSP#FB#HOSP#20261120##ADT*A08#C9#P#2.5.1",
              "PID#1##MRN1***HOSP@1.2.3@ISO$MRN2***OTHER##Doe*Jane!F!Ann")
    ev = parse_adt(raw).event
    assert isinstance(ev, PatientUpsert)
    assert ev.patient.identifiers == (CX("MRN1", "HOSP", universal_id="1.2.3",
                                         universal_id_type="ISO"), CX("MRN2", "OTHER"))
    assert ev.patient.names[0].given == "Jane#Ann"  # \F\ with ! as escape → '#'


# -- malformed input → MessageRejected with a table 0357 code ---------------------------------
@pytest.mark.parametrize("raw,code,ack", [  # AR: unusable MSH, version, type; AE: content
    (b"", "100", "AR"),
    (b"\x00\xff\xfe garbage \x0b\x1c\x01\x02" * 50, "100", "AR"),
    (msg(PID_OK), "100", "AR"),  # no MSH
    (msg("MSH|^~|ADT|HOSP|FB|HOSP|20261120||ADT^A08|C1|P|2.5.1", PID_OK), "102", "AR"),  # MSH-2
    (msg("MSH|^~\\&|ADT|HOSP|FB|HOSP|20261120||ADT^A08|C1|P|2.5.1||||||KLINGON", PID_OK),
     "103", "AR"),
    (msg(MSH_A08.replace("|2.5.1", "|9.9"), PID_OK), "203", "AR"),
    (msg(MSH_A08.replace("|2.5.1", "|2.2"), PID_OK), "203", "AR"),
    (msg(MSH_A08.replace("|2.5.1", "|"), PID_OK), "101", "AR"),
    (msg(MSH_A08.replace("|CTRL-1|", "||"), PID_OK), "101", "AR"),
    (msg(MSH_A08.replace("|20261120100000|", "||"), PID_OK), "101", "AR"),
    (msg(MSH_A08.replace("|20261120100000|", "|yesterday|"), PID_OK), "102", "AR"),
    (msg(MSH_A08.replace("ADT^A08^ADT_A01", "ORU^R01^ORU_R01"), PID_OK), "200", "AR"),
    (msg(MSH_A08.replace("ADT^A08^ADT_A01", "ACK^A08^ACK"), "MSA|AA|X"), "200", "AR"),
    (msg(MSH_A08.replace("ADT^A08^ADT_A01", "ADT"), PID_OK), "101", "AR"),  # no trigger
    (msg(MSH_A08, "EVN|A08|20261340"), "102", "AE"),  # bad EVN-2
    (msg(MSH_A08), "100", "AE"),  # A08 without PID
    (msg(MSH_A08, "PID|1||^^^HOSP||Doe^John"), "101", "AE"),  # PID-3 empty
    (msg(MSH_A08, PID_OK.replace("19840307", "19840231")), "102", "AE"),  # no 31 February
    (msg(MSH_A08, "PID|1||MRN1||Doe||19840307|M|||||||||||||||||||||notadate"), "102", "AE"),
    (msg(MSH_A08.replace("A08^ADT_A01", "A40"), "MRG|OLD1", PID_OK), "100", "AE"),
    (msg(MSH_A08.replace("A08^ADT_A01", "A40"), PID_OK), "100", "AE"),
    (msg(MSH_A08.replace("A08^ADT_A01", "A40"), PID_OK, "MRG|"), "101", "AE"),
    (msg(MSH_A08.replace("A08^ADT_A01", "A47"), PID_OK, "MRG|O1", PID_OK, "MRG|O2"), "100",
     "AE"),
    (msg(MSH_A08, "P\x01D|1||MRN1"), "100", "AR"),
    (msg(MSH_A08, PID_OK, MSH_A08.replace("CTRL-1", "CTRL-2"), PID_OK), "100",
     "AR"),  # 2 messages
])
def test_rejections(raw: bytes, code: str, ack: str) -> None:
    """v2.5.1 §2.9.2: AR for a message that cannot be processed (MSH, version, type); AE for
    one whose content is wrong (many engines read AR as "resend later")."""
    err = rejected(raw)
    assert err.reason_code == code, err.text
    assert err.ack_code == ack
    for phi in PHI:
        assert phi not in err.text
    reply = rejection_ack(err)  # an AR/AE can always be built
    parsed = parse_ack(reply, err.header.encoding if err.header else "utf-8")
    assert parsed["MSA.1"] == ack
    assert str(parsed.segment("ERR")).find(code) > 0
    for phi in PHI:
        assert phi.encode() not in reply


def test_rejection_keeps_what_msh_says() -> None:
    err = rejected(msg(MSH_A08.replace("|2.5.1", "|9.9"), PID_OK))
    assert err.header is not None and err.header.control_id == "CTRL-1"
    assert err.location == ("MSH", 12)
    ack = parse_ack(rejection_ack(err))
    assert ack["MSA.2"] == "CTRL-1" and ack["MSH.5"] == "ADT" and ack["MSH.12"] == "9.9"
    assert str(ack.segment("ERR")) == "ERR||MSH^1^12|203^Unsupported version id^HL70357|E||||" \
        "MSH-12 version id is not supported (2.3 to 2.8 are)"


def test_bad_encoding_characters_still_answer_with_control_id() -> None:
    err = rejected(msg("MSH|^^^^|ADT|HOSP|FB|HOSP|20261120||ADT^A08|C-77|P|2.5.1", PID_OK))
    assert err.reason_code == "102" and err.location == ("MSH", 2)
    ack = parse_ack(rejection_ack(err))
    assert ack["MSH.2"] == "^~\\&" and ack["MSA.2"] == "C-77" and ack["MSA.1"] == "AR"


def test_no_msh_ack_from_defaults() -> None:
    err = rejected(b"\x00\x01binary\xff")
    assert err.header is None
    ack = parse_ack(rejection_ack(err))
    assert ack["MSH.3"] == "FHIRBRIDGE" and ack["MSH.12"] == "2.5.1"
    assert str(ack.segment("MSH")(9)) == "ACK^^ACK" and ack["MSA.1"] == "AR" and ack["MSA.2"] == ""


# -- ACK building ---------------------------------------------------------------------------
def test_ack_swaps_addresses_and_echoes() -> None:
    parsed = parse_adt(sample("a28.hl7"))
    when = datetime(2026, 11, 20, 12, 0, 1, tzinfo=timezone.utc)
    text = build_ack(parsed.header, "AA", control_id="ACK1", timestamp=when)
    assert text == ("MSH|^~\\&|FHIRBRIDGE|HOSP|PIX|CLINIC|20261120120001+0000||ACK^A28^ACK|ACK1|P"
                    "|2.5||||||UNICODE UTF-8\rMSA|AA|ADT-A28-0004|\r")
    a, b = (parse_ack(ack_bytes(parsed.header, AckDecision.accept())) for _ in range(2))
    assert a["MSH.10"] != b["MSH.10"] and len(a["MSH.10"]) <= 20  # new control ids


def test_ack_ae_with_err_v25_and_v23() -> None:
    v25 = parse_adt(sample("a01.hl7")).header
    ack = parse_ack(ack_bytes(v25, AckDecision.error("PID-3 has no identifier in a domain",
                                                     "204")))
    assert ack["MSA.1"] == "AE" and ack["MSA.3"] == "PID-3 has no identifier in a domain"
    assert ack["ERR.3.1.1"] == "204" and ack["ERR.3.1.3"] == "HL70357" and ack["ERR.4"] == "E"
    v231 = parse_adt(sample("a08.hl7")).header
    ack = parse_ack(ack_bytes(v231, AckDecision.error("internal", "207")))
    assert ack["MSH.12"] == "2.3.1"
    assert ack["ERR.1.1.4.1"] == "207" and ack["ERR.1.1.4.3"] == "HL70357"


def test_ack_text_is_escaped_and_bounded() -> None:
    h = parse_adt(sample("a01.hl7")).header
    ack = ack_bytes(h, AckDecision.error("a|b^c&d~e\\f " + "x" * 200, "207"))
    parsed = parse_ack(ack)
    assert parsed["MSA.3"].startswith("a|b^c&d~e\\f x")  # python-hl7 unescapes on read
    assert len(str(parsed.segment("MSA")(3))) <= 80 + 20
    assert len(parsed.segment("MSA")) == 4


def test_ack_code_must_be_from_table_0008() -> None:
    with pytest.raises(ValueError):
        build_ack(None, "XX")
    assert "MSA|CA|" in build_ack(None, "CA")


# -- building blocks ----------------------------------------------------------------------------
def test_escape_round_trip() -> None:
    d = Delimiters()
    value = "a|b^c&d~e\\f"
    assert decode_text(encode_text(value, d), d) == value
    assert decode_text("x\\H\\bold\\N\\y\\.br\\z\\Zlocal\\", d) == "xboldy z"
    assert decode_text("unterminated \\F", d) == "unterminated \\F"
    assert decode_text("\\XE5B1B1\\", d, "utf-8") == "山"


def test_dtm_and_dates() -> None:
    assert parse_dtm("20261120083000.25-0500") == datetime(
        2026, 11, 20, 8, 30, 0, 250000, tzinfo=timezone(timedelta(hours=-5)))
    assert parse_dtm("2026") == datetime(2026, 1, 1, tzinfo=timezone.utc)
    naive = parse_dtm("202611201030", default_tz=None)
    assert naive is not None and naive.tzinfo is None
    assert parse_dtm("") is None
    for bad in ("2026-11-20", "20261320", "20261120+2500", "20261120x"):
        with pytest.raises(ValueError):
            parse_dtm(bad)
    assert parse_date("19840307") == "1984-03-07"
    assert parse_date("198403071230+0100") == "1984-03-07"
    assert parse_date("198403") is None


def test_decode_message_is_generic() -> None:
    m = decode_message(msg(MSH_A08.replace("ADT^A08^ADT_A01", "ORU^R01"), "OBX|1|ST|x||v"))
    assert m.header.message_code == "ORU" and m.segment_ids == ("MSH", "OBX")
    assert m.value(m.first("OBX"), 5) == "v"
