"""HL7 v2.5.1 §2.9 acknowledgments over real MLLP sockets: AE for content errors, AR only for an
unusable message; unsupported trigger events; enhanced mode (MSH-15/16); undecodable escapes.

Real sockets against `MLLPServer(GroupCommitter(AdtFeed(...)).submit)` on SQLite.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import hl7
import pytest
from sqlalchemy import func, select

from fhirbridge.hl7 import MLLPServer
from fhirbridge.pipeline.adt_feed import NOT_APPLIED_TEXT, AdtFeed, GroupCommitter
from fhirbridge.store.db import Database
from fhirbridge.store.models import Hl7Message, IndexIdentifier
from fhirbridge.store.patient_index import PatientIndex
from tests.hl7.test_group_commit import DOMAINS
from tests.hl7.test_mllp import Loop, frame, read_acks
from tests.support.databases import fresh_database

PHI = (b"M\xc3\xbcller", b"Jos\xc3\xa9", b"MRN", b"19840307")


def message(cid: str, pid: str = "PID|1||MRN1^^^HOSP^MR||Müller^José||19840307|M", *,
            trigger: str = "A08", msh_tail: str = "", msg_type: str = "ADT",
            version: str = "2.5.1", encoding: str = "utf-8") -> bytes:
    return (f"MSH|^~\\&|ADT|HOSP|FHIRBRIDGE|HOSP|20261120100000||{msg_type}^{trigger}|{cid}|P|"
            f"{version}{msh_tail}\rEVN|{trigger}|20261120095900\r{pid}\r").encode(encoding)


class Feed:
    """The service's ADT path: listener → group committer → AdtFeed → patient index."""

    def __init__(self, loop: Loop, db: Database, unsupported_events: str = "AE") -> None:
        self.db = db
        self.feed = AdtFeed(db, PatientIndex(db), DOMAINS,
                            unsupported_events=unsupported_events)
        self.writer = GroupCommitter(self.feed).start()
        self.server = MLLPServer(self.writer.submit, idle_timeout=30, on_stop=self.writer.close)
        self.loop = loop
        loop.run(self.server.start("127.0.0.1", 0))
        self.observer = Database(db.url)  # sees only what was committed

    def exchange(self, *messages: bytes, expect: int | None = None) -> list[bytes]:
        """Send the frames on one connection; read `expect` answers (one per message)."""
        n = len(messages) if expect is None else expect
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=10) as s:
            s.sendall(b"".join(frame(m) for m in messages))
            return read_acks(s, n)

    def recorded(self, control_id: str) -> tuple[str, str] | None:
        with self.observer.session() as s:
            row = s.execute(select(Hl7Message.ack_code, Hl7Message.ack_text).where(
                Hl7Message.control_id == control_id)).first()
        return None if row is None else (row[0], row[1])

    def identifiers(self) -> int:
        with self.observer.session() as s:
            return int(s.scalar(select(func.count()).select_from(IndexIdentifier)) or 0)

    def stop(self) -> None:
        self.loop.run(self.server.stop())
        self.observer.dispose()


@pytest.fixture(scope="module")
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.close()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    yield from fresh_database("sqlite", tmp_path)


@pytest.fixture
def feed(loop: Loop, db: Database) -> Iterator[Feed]:
    f = Feed(loop, db)
    yield f
    f.stop()


def parts(ack: bytes, encoding: str = "utf-8") -> dict[str, str]:
    """MSA-1..3 and the first ERR segment's ERR-2, ERR-3.1 and ERR-4 of one ACK."""
    m = hl7.parse(ack.decode(encoding))
    msa = m.segment("MSA")
    out = {"MSA.1": str(msa(1)), "MSA.2": str(msa(2)),
           "MSA.3": str(msa(3)) if len(msa) > 3 else "", "ERR": ""}
    if any(str(seg(0)) == "ERR" for seg in m):
        out.update({"ERR": str(m.segment("ERR")), "ERR.2": str(m.segment("ERR")(2)),
                    "ERR.3.1": str(m["ERR.3.1.1"]), "ERR.4": str(m["ERR.4"])})
    return out


# -- 12: content errors are AE with an ERR segment; AR only for an unusable message ---------
@pytest.mark.parametrize("pid,location,code", [
    ("PID|1||^^^HOSP^MR||Müller^José||19840307|M", "PID^1^3", "101"),  # empty PID-3
    ("PID|1||MRN1^^^HOSP^MR||Müller^José||20231345|M", "PID^1^7", "102"),  # month 13
    ("PID|1||MRN1^^^NOWHERE^MR||Müller^José||19840307|M", "PID^1^3", "204"),  # unknown domain
])
def test_content_errors_are_ae_with_err(feed: Feed, pid: str, location: str,
                                        code: str) -> None:
    ack, after = feed.exchange(message("BAD1", pid), message("GOOD1"))
    p = parts(ack)
    assert (p["MSA.1"], p["MSA.2"]) == ("AE", "BAD1"), ack  # not AR ("resend later")
    assert (p["ERR.2"], p["ERR.3.1"], p["ERR.4"]) == (location, code, "E"), ack
    assert "HL70357" in p["ERR"]
    for phi in PHI:
        assert phi not in ack
    assert feed.recorded("BAD1") is None  # nothing applied for a refused message
    assert parts(after)["MSA.1"] == "AA" and feed.recorded("GOOD1") == ("AA", "")


@pytest.mark.parametrize("raw,code", [
    (message("V1", version="9.9"), "203"),  # unsupported version
    (message("T1", msg_type="ORU", trigger="R01"), "200"),  # not ADT
    (message("E1").replace(b"^~\\&", b"^~", 1), "102"),  # unusable MSH-2
])
def test_unusable_messages_stay_ar(feed: Feed, raw: bytes, code: str) -> None:
    (ack,) = feed.exchange(raw)
    p = parts(ack)
    assert p["MSA.1"] == "AR" and p["ERR.3.1"] == code, ack


# -- 13: unsupported trigger events: recorded, never a bare AA -------------------------------
@pytest.mark.parametrize("trigger", ["A02", "A03", "A11", "A13"])
def test_unsupported_event_is_ae_201_and_recorded(feed: Feed, trigger: str) -> None:
    cid = f"U-{trigger}"
    (ack,) = feed.exchange(message(cid, trigger=trigger))
    p = parts(ack)
    assert (p["MSA.1"], p["MSA.2"]) == ("AE", cid), ack
    assert (p["ERR.3.1"], p["ERR.2"]) == ("201", "MSH^1^9"), ack  # table 0357 unsupported event
    assert "Unsupported event code" in p["ERR"]
    assert feed.recorded(cid) == ("AE", NOT_APPLIED_TEXT)
    assert feed.identifiers() == 0  # nothing applied to the index
    (again,) = feed.exchange(message(cid, trigger=trigger))  # a resend: the same answer
    assert parts(again)["MSA.1"] == "AE" and parts(again)["ERR.3.1"] == "201"


def test_unsupported_event_aa_with_note_when_configured(loop: Loop, db: Database) -> None:
    f = Feed(loop, db, unsupported_events="AA")
    try:
        (ack,) = f.exchange(message("U-AA", trigger="A03"))
        p = parts(ack)
        assert (p["MSA.1"], p["MSA.3"]) == ("AA", NOT_APPLIED_TEXT), ack
        assert p["ERR"] == ""
        assert f.recorded("U-AA") == ("AA", NOT_APPLIED_TEXT)
        assert f.identifiers() == 0
    finally:
        f.stop()


def test_unsupported_events_setting_is_checked() -> None:
    with pytest.raises(ValueError):
        AdtFeed(None, None, DOMAINS, unsupported_events="AR")  # type: ignore[arg-type]


# -- 14: enhanced mode -----------------------------------------------------------------------
def test_enhanced_al_gets_ca_after_commit(feed: Feed) -> None:
    (ack,) = feed.exchange(message("ENH1", msh_tail="|||AL|NE"))
    p = parts(ack)
    assert (p["MSA.1"], p["MSA.2"]) == ("CA", "ENH1"), ack
    assert feed.recorded("ENH1") == ("AA", "")  # committed when the CA left


def test_enhanced_ne_gets_no_ack(feed: Feed) -> None:
    # NE: no accept ACK; the next (original-mode) message's AA is the only answer
    # (answers come in order: an ACK for ENH-NE would come before ORIG1's)
    acks = feed.exchange(message("ENH-NE", msh_tail="|||NE|NE"), message("ORIG1"), expect=1)
    assert [parts(a)["MSA.2"] for a in acks] == ["ORIG1"]
    assert parts(acks[0])["MSA.1"] == "AA"
    assert feed.recorded("ENH-NE") == ("AA", "")  # applied all the same


def test_enhanced_er_su_conditions(feed: Feed) -> None:
    bad_pid = "PID|1||^^^HOSP^MR||Müller^José||19840307|M"
    acks = feed.exchange(
        message("ER-OK", msh_tail="|||ER|NE"),  # success, ER: nothing
        message("ER-BAD", bad_pid, msh_tail="|||ER|NE"),  # error, ER: CE
        message("SU-BAD", bad_pid, msh_tail="|||SU|NE"),  # error, SU: nothing
        message("SU-OK", msh_tail="|||SU|NE"),  # success, SU: CA
        message("V-CR", version="9.9", msh_tail="|||AL|NE"),  # unsupported version: CR
        expect=3)
    got = [(parts(a)["MSA.1"], parts(a)["MSA.2"]) for a in acks]
    assert got == [("CE", "ER-BAD"), ("CA", "SU-OK"), ("CR", "V-CR")]
    ce = parts(acks[0])
    assert (ce["ERR.2"], ce["ERR.3.1"]) == ("PID^1^3", "101")


def test_enhanced_application_ack_requested_gets_only_ca(feed: Feed) -> None:
    # fhirbridge applies at accept time and sends no separate application ACK (MSH-16 = NE)
    acks = feed.exchange(message("APP1", msh_tail="|||AL|AL"), message("ORIG2"))
    assert [(parts(a)["MSA.1"], parts(a)["MSA.2"]) for a in acks] == [("CA", "APP1"),
                                                                     ("AA", "ORIG2")]


def test_original_mode_unchanged(feed: Feed) -> None:
    (ack,) = feed.exchange(message("ORIG3"))
    assert parts(ack)["MSA.1"] == "AA"
    assert b"|CA|" not in ack


# -- 15: escapes the decoder does not implement; UTF-8 bytes declared 8859/1 -----------------
@pytest.mark.parametrize("name", [
    "M\\C2842\\uller^Jos\\C2842\\e",  # ISO 2022 single-byte switch (§2.7.2)
    "M\\M248440\\uller^Jose",  # ISO 2022 multi-byte switch (§2.7.3)
    "M\\XFC0\\ller^Jose",  # odd number of hex digits
    "M\\XZZ\\ller^Jose",  # not hex
])
def test_unsupported_escape_is_ae_102(feed: Feed, name: str) -> None:
    pid = f"PID|1||MRN1^^^HOSP^MR||{name}||19840307|M"
    (ack,) = feed.exchange(message("ESC1", pid))
    p = parts(ack)
    assert (p["MSA.1"], p["ERR.3.1"]) == ("AE", "102"), ack
    assert feed.recorded("ESC1") is None and feed.identifiers() == 0


def test_utf8_bytes_declared_latin1_is_ae(feed: Feed) -> None:
    (ack,) = feed.exchange(message("CS1", msh_tail="||||||8859/1"))  # UTF-8 "Müller"
    p = parts(ack, "latin-1")
    assert (p["MSA.1"], p["ERR.2"], p["ERR.3.1"]) == ("AE", "MSH^1^18", "102"), ack
    assert feed.recorded("CS1") is None and feed.identifiers() == 0


def test_real_latin1_is_still_aa(feed: Feed) -> None:
    raw = message("CS2", msh_tail="||||||8859/1", encoding="latin-1")
    assert b"M\xfcller" in raw
    (ack,) = feed.exchange(raw)
    assert parts(ack, "latin-1")["MSA.1"] == "AA"
    assert feed.recorded("CS2") == ("AA", "")
