"""The ADT write path (AdtFeed + PatientIndex) on SQLite and PostgreSQL: the semantics the
faster statements must keep (repeat MSH-10 applied once, older events recorded but not applied,
unchanged A08 still recorded, corrections on change, merges, A47), batches of messages in one
transaction with a savepoint each, and a statement budget per A08.

PostgreSQL runs when FHIRBRIDGE_TEST_POSTGRES_URL is set (a fresh schema per test).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import Connection, event, func, select, text

from fhirbridge.config import IdentifierDomain
from fhirbridge.hl7 import AckDecision, ParsedMessage, parse_adt
from fhirbridge.identity.model import Identifier
from fhirbridge.pipeline.adt_feed import AdtFeed
from fhirbridge.store.db import Database
from tests.support.databases import fresh_database
from fhirbridge.store.models import Hl7Message, IndexHistory, IndexIdentifier, IndexPatient, Job
from fhirbridge.store.patient_index import PatientIndex

MRN = "urn:oid:2.16.840.1.113883.3.7777"
REGION = "urn:oid:2.16.840.1.113883.3.999"
DOMAINS = [IdentifierDomain(fhir_system=MRN, hl7_assigning_authority="HOSP", default=True),
           IdentifierDomain(fhir_system=REGION, hl7_assigning_authority="REGION")]


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    yield from fresh_database(request.param, tmp_path)


@pytest.fixture
def feed(db: Database) -> AdtFeed:
    return AdtFeed(db, PatientIndex(db), DOMAINS)


def msg(event: str, pid: str, *, cid: str | None = None, when: str = "20261120100000",
        mrg: str = "", sender: str = "ADT") -> ParsedMessage:
    segs = [f"MSH|^~\\&|{sender}|HOSP|FHIRBRIDGE|HOSP|{when}||ADT^{event}|"
            f"{cid or uuid.uuid4().hex[:20]}|P|2.5.1", f"EVN|{event}|{when}", pid]
    if mrg:
        segs.append(mrg)
    return parse_adt(("\r".join(segs) + "\r").encode())


def pid(mrn: str, name: str = "Müller^José", dob: str = "19840307", sex: str = "M",
        extra: str = "") -> str:
    return f"PID|1||{mrn}^^^HOSP^MR{extra}||{name}||{dob}|{sex}"


def count(db: Database, model: type, *where: object) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def patient(feed: AdtFeed, mrn: str):  # type: ignore[no-untyped-def]
    recs = feed.index.find_by_identifier(MRN, mrn)
    assert len(recs) == 1
    return recs[0]


def history(db: Database, mrn: str) -> list[IndexHistory]:
    with db.session() as s:
        key = s.scalar(select(IndexIdentifier.patient_key).where(
            IndexIdentifier.system == MRN, IndexIdentifier.value == mrn))
        return list(s.scalars(select(IndexHistory).where(IndexHistory.patient_key == key)
                              .order_by(IndexHistory.id)))


def jobs(db: Database) -> list[dict]:  # type: ignore[type-arg]
    with db.session() as s:
        return [json.loads(j.payload_json) for j in s.scalars(select(Job).order_by(Job.id))]


# -- semantics --------------------------------------------------------------------------------
def test_create_then_unchanged_a08_is_recorded_without_correction(feed: AdtFeed,
                                                                   db: Database) -> None:
    assert feed.apply(msg("A04", pid("M1", extra="~R1^^^REGION^PI"))).code == "AA"
    rec = patient(feed, "M1")
    assert rec.identifiers == (Identifier(MRN, "M1"), Identifier(REGION, "R1"))
    assert rec.names[0].family == "Müller" and rec.names[0].given == ("José",)
    assert rec.birth_date == "1984-03-07" and rec.sex == "male" and rec.active
    assert feed.apply(msg("A08", pid("M1"), when="20261120110000")).code == "AA"
    assert patient(feed, "M1") == rec
    assert [h.applied for h in history(db, "M1")] == [True, True]
    assert count(db, Hl7Message) == 2
    assert jobs(db) == []  # nothing changed: no correction


def test_repeated_control_id_is_acknowledged_again_and_applied_once(feed: AdtFeed,
                                                                     db: Database) -> None:
    m = msg("A04", pid("M2"), cid="REPEAT-1")
    assert feed.apply(m) == AckDecision.accept()
    assert feed.apply(m) == AckDecision("AA", "")
    # the same control id from another sender is another message
    assert feed.apply(msg("A08", pid("M2"), cid="REPEAT-1", sender="OTHER")).code == "AA"
    assert count(db, Hl7Message) == 2
    assert len(history(db, "M2")) == 2


def test_older_event_is_recorded_but_does_not_overwrite(feed: AdtFeed, db: Database) -> None:
    assert feed.apply(msg("A04", pid("M3", "Old^Name"), when="20261120100000")).code == "AA"
    assert feed.apply(msg("A08", pid("M3", "New^Name"), when="20261120120000")).code == "AA"
    # older (even though it arrives later): AA, history says not applied, data unchanged
    assert feed.apply(msg("A08", pid("M3", "Stale^Name", sex="F"),
                          when="20261120110000")).code == "AA"
    rec = patient(feed, "M3")
    assert rec.names[0].family == "New" and rec.sex == "male"
    assert [h.applied for h in history(db, "M3")] == [True, True, False]
    # a newer event in another zone (earlier wall-clock time, later instant) is applied
    assert feed.apply(msg("A08", pid("M3", "Zone^Name"), when="20261120123000")).code == "AA"
    assert feed.apply(msg("A08", pid("M3", "Later^Name"),
                          when="20261120080000-0500")).code == "AA"  # 13:00Z
    assert patient(feed, "M3").names[0].family == "Later"
    assert feed.apply(msg("A08", pid("M3", "Earlier^Name"),
                          when="20261120132000+0100")).code == "AA"  # 12:20Z: older
    assert patient(feed, "M3").names[0].family == "Later"


def test_demographic_change_enqueues_a_correction(feed: AdtFeed, db: Database) -> None:
    assert feed.apply(msg("A04", pid("M4", extra="~R4^^^REGION^PI"))).code == "AA"
    assert feed.apply(msg("A08", pid("M4", "Kelly^Siobhán", sex="F"),
                          when="20261120110000")).code == "AA"
    assert jobs(db) == [{"old": [[MRN, "M4"], [REGION, "R4"]], "new": [MRN, "M4"],
                         "reason": "ADT A08"}]
    rec = patient(feed, "M4")
    assert rec.names[0].family == "Kelly" and rec.sex == "female"
    # an A08 without PID-5/7/8 keeps what is known
    assert feed.apply(msg("A08", "PID|1||M4^^^HOSP^MR", when="20261120120000")).code == "AA"
    assert patient(feed, "M4") == rec
    assert len(jobs(db)) == 1


def test_new_identifier_is_attached_and_conflict_is_ae(feed: AdtFeed, db: Database) -> None:
    assert feed.apply(msg("A04", pid("M5"))).code == "AA"
    assert feed.apply(msg("A08", pid("M5", extra="~R5^^^REGION^PI"))).code == "AA"
    assert patient(feed, "M5").identifiers == (Identifier(MRN, "M5"), Identifier(REGION, "R5"))
    assert feed.apply(msg("A04", pid("M6"))).code == "AA"
    before = count(db, IndexHistory), count(db, Hl7Message), count(db, IndexIdentifier)
    d = feed.apply(msg("A08", pid("M6", extra="~R5^^^REGION^PI")))
    assert d.code == "AE" and "merge" in d.text
    assert (count(db, IndexHistory), count(db, Hl7Message), count(db, IndexIdentifier)) == before
    d = feed.apply(msg("A08", "PID|1||X1^^^ELSEWHERE^MR||Doe^Jane"))
    assert d.code == "AE" and "configured domain" in d.text


def test_merge_and_repeat(feed: AdtFeed, db: Database) -> None:
    assert feed.apply(msg("A04", pid("OLD7"))).code == "AA"
    assert feed.apply(msg("A04", pid("NEW7", "Kelly^Siobhán", sex="F"))).code == "AA"
    a40 = msg("A40", pid("NEW7", "Kelly^Siobhán", sex="F"), mrg="MRG|OLD7^^^HOSP^MR",
              when="20261120110000")
    assert feed.apply(a40).code == "AA"
    assert feed.apply(a40).code == "AA"  # a repeat: stored answer
    old = patient(feed, "OLD7")
    new = patient(feed, "NEW7")
    assert not old.active and old.replaced_by == new.ref
    # an A08 naming the old MRN updates the survivor
    assert feed.apply(msg("A08", pid("OLD7", "Kelly^Siobhan", sex="F"),
                          when="20261120120000")).code == "AA"
    assert patient(feed, "NEW7").names[0].given == ("Siobhan",)
    assert len(jobs(db)) == 2  # the A40 and the A08 rename


def test_a47_changes_the_identifier(feed: AdtFeed, db: Database) -> None:
    assert feed.apply(msg("A04", pid("WRONG8"))).code == "AA"
    key = patient(feed, "WRONG8").ref
    assert feed.apply(msg("A47", pid("RIGHT8"), mrg="MRG|WRONG8^^^HOSP^MR")).code == "AA"
    assert feed.index.find_by_identifier(MRN, "WRONG8") == []
    assert patient(feed, "RIGHT8").ref == key
    d = feed.apply(msg("A47", pid("RIGHT9"), mrg="MRG|NOBODY^^^HOSP^MR"))
    assert d.code == "AE"


# -- batches: one transaction, a savepoint per message ----------------------------------------
def test_batch_one_bad_message_gets_ae_others_are_stored(feed: AdtFeed, db: Database) -> None:
    assert feed.apply(msg("A04", pid("B1"))).code == "AA"
    assert feed.apply(msg("A04", pid("B2"))).code == "AA"
    batch = [msg("A08", pid("B1", "One^Name"), when="20261120110000"),
             msg("A08", pid("B1", extra="~R9^^^REGION^PI")),
             msg("A08", pid("B2", extra="~R9^^^REGION^PI")),  # R9 is B1's now: AE
             msg("A04", pid("B3")),
             msg("A08", "PID|1||X1^^^ELSEWHERE^MR||Doe^Jane")]  # no configured domain: AE
    out = feed.apply_batch(batch)
    assert [getattr(o, "code", None) for o in out] == ["AA", "AA", "AE", "AA", "AE"]
    assert patient(feed, "B1").names[0].family == "One"
    assert patient(feed, "B1").identifiers == (Identifier(MRN, "B1"), Identifier(REGION, "R9"))
    assert patient(feed, "B2").identifiers == (Identifier(MRN, "B2"),)
    assert patient(feed, "B3").active
    assert count(db, Hl7Message) == 2 + 3


def test_batch_repeat_inside_the_batch_is_applied_once(feed: AdtFeed, db: Database) -> None:
    m = msg("A04", pid("C1"), cid="SAME-1")
    out = feed.apply_batch([m, msg("A04", pid("C2")), m])
    assert [o.code for o in out] == ["AA", "AA", "AA"]  # type: ignore[union-attr]
    assert count(db, Hl7Message) == 2 and len(history(db, "C1")) == 1


def test_batch_exception_in_one_message_keeps_the_others(feed: AdtFeed, db: Database,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    real = feed.index.upsert

    def flaky(s, facts, **kw):  # type: ignore[no-untyped-def]
        if facts.identifiers and facts.identifiers[0].value == "BOOM":
            conn = s if isinstance(s, Connection) else s.connection()
            conn.execute(text("INSERT INTO index_history (patient_key, event_type, "
                                        "control_id, applied, snapshot_json, recorded_at) "
                                        "VALUES ('half-done', 'A08', '', true, '{}', "
                                        "CURRENT_TIMESTAMP)"))
            raise RuntimeError("boom")
        return real(s, facts, **kw)

    monkeypatch.setattr(feed.index, "upsert", flaky)
    out = feed.apply_batch([msg("A04", pid("D1")), msg("A04", pid("BOOM")),
                            msg("A04", pid("D2"))])
    assert out[0] == AckDecision.accept() and out[2] == AckDecision.accept()
    assert isinstance(out[1], RuntimeError)
    assert count(db, IndexHistory, IndexHistory.patient_key == "half-done") == 0
    assert count(db, Hl7Message) == 2
    patient(feed, "D1")
    patient(feed, "D2")


def test_batch_commit_failure_answers_nothing_aa_uncommitted(feed: AdtFeed, db: Database,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """When the shared commit fails, each message is applied again on its own; a message
    whose own transaction fails too gets its exception (→ AE), never AA."""
    calls = {"n": 0}
    failing = {"on": True}

    def fail_commit(conn) -> None:  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if failing["on"] and calls["n"] == 1:
            raise RuntimeError("disk full")

    event.listen(db.engine, "commit", fail_commit)
    try:
        out = feed.apply_batch([msg("A04", pid("E1")), msg("A04", pid("E2"))])
    finally:
        event.remove(db.engine, "commit", fail_commit)
    assert [o.code for o in out] == ["AA", "AA"]  # type: ignore[union-attr]
    assert count(db, Hl7Message) == 2 and len(history(db, "E1")) == 1

    def always_fail(conn) -> None:  # type: ignore[no-untyped-def]
        raise RuntimeError("disk full")

    event.listen(db.engine, "commit", always_fail)
    try:
        out = feed.apply_batch([msg("A04", pid("E3")), msg("A04", pid("E4"))])
    finally:
        event.remove(db.engine, "commit", always_fail)
    assert all(isinstance(o, Exception) for o in out)
    assert count(db, Hl7Message) == 2
    assert feed.index.find_by_identifier(MRN, "E3") == []


# -- cost -------------------------------------------------------------------------------------
def test_repeated_a08_statement_budget(feed: AdtFeed, db: Database) -> None:
    """An A08 for a known patient with unchanged demographics: dedup look-up, one patient
    look-up, history and message inserts (+ BEGIN/COMMIT) — no per-row ORM round trips."""
    assert feed.apply(msg("A04", pid("F1", extra="~R1^^^REGION^PI"))).code == "AA"
    statements: list[str] = []

    def count_stmt(conn, cursor, statement, *a) -> None:  # type: ignore[no-untyped-def]
        statements.append(statement.split()[0].upper())

    event.listen(db.engine, "before_cursor_execute", count_stmt)
    try:
        assert feed.apply(msg("A08", pid("F1", extra="~R1^^^REGION^PI"))).code == "AA"
    finally:
        event.remove(db.engine, "before_cursor_execute", count_stmt)
    work = [s for s in statements if s in ("SELECT", "INSERT", "UPDATE", "DELETE")]
    assert len(work) <= 5, statements
    assert work.count("UPDATE") <= 1


def test_history_and_last_event_in_utc(feed: AdtFeed, db: Database) -> None:
    assert feed.apply(msg("A04", pid("G1"), when="20261120100000+0100")).code == "AA"
    with db.session() as s:
        p = s.scalar(select(IndexPatient))
        assert p is not None and p.last_event_at is not None
        at = p.last_event_at if p.last_event_at.tzinfo else \
            p.last_event_at.replace(tzinfo=timezone.utc)
        assert at == datetime(2026, 11, 20, 9, 0, tzinfo=timezone.utc)


def _state(db: Database) -> dict:  # type: ignore[type-arg]
    """The index with patient keys replaced by their sorted identifiers."""
    with db.session() as s:
        idents: dict[str, list[str]] = {}
        for i in s.scalars(select(IndexIdentifier).order_by(IndexIdentifier.id)):
            idents.setdefault(i.patient_key, []).append(f"{i.system}|{i.value}")
        patients = list(s.scalars(select(IndexPatient)))
        name = {p.key: ",".join(idents.get(p.key, [])) or "stub" for p in patients}
        return {
            "patients": sorted((name[p.key], p.names_json, p.birth_date, p.sex, p.active,
                                name.get(p.merged_into or "", ""), str(p.last_event_at))
                               for p in patients),
            "history": sorted((name.get(h.patient_key, "?"), h.event_type, h.control_id,
                               h.applied, h.snapshot_json)
                              for h in s.scalars(select(IndexHistory))),
            "messages": sorted((m.sender, m.control_id, m.ack_code, m.ack_text)
                               for m in s.scalars(select(Hl7Message))),
            "jobs": sorted(j.payload_json for j in s.scalars(select(Job))),
        }


def _scenario() -> list[ParsedMessage]:
    a40 = msg("A40", pid("S2", "Kelly^Ann", sex="F"), mrg="MRG|S1^^^HOSP^MR",
              when="20261120110000", cid="S-A40")
    return [
        msg("A04", pid("S1", "Old^Ann", sex="F"), cid="S-1"),
        msg("A04", pid("S2", "Kelly^Ann", sex="F", extra="~RS2^^^REGION^PI"), cid="S-2"),
        msg("A08", pid("S1", "Older^Ann", sex="F"), when="20261120090000", cid="S-3"),
        a40,
        msg("A08", pid("S1", "Kelly^Anne", sex="F"), when="20261120120000", cid="S-4"),
        a40,  # repeat
        msg("A47", pid("S9"), mrg="MRG|S2^^^HOSP^MR", when="20261120130000", cid="S-A47"),
        msg("A08", pid("S3", extra="~RS2^^^REGION^PI"), cid="S-5"),  # RS2 is S9's: AE
        msg("A04", pid("S3"), cid="S-6"),
        msg("A40", pid("S4"), mrg="MRG|GONE^^^HOSP^MR", cid="S-7"),  # unknown prior: stub
        msg("A08", pid("S9", "Kelly^Anne", sex="F"), when="20261120140000", cid="S-8"),
        msg("A08", pid("S4", "New^Bob"), when="20261120150000", cid="S-9"),
        msg("A47", pid("S10"), mrg="MRG|NOBODY^^^HOSP^MR", cid="S-10"),  # AE
        msg("A31", pid("S3", "Three^Tom"), when="20261120160000", cid="S-11"),
        msg("A08", pid("S4", extra="~RS2^^^REGION^PI"), cid="S-12"),  # two patients: AE
        msg("A08", "PID|1||X1^^^ELSEWHERE^MR||Doe^Jane", cid="S-13"),  # no domain: AE
        msg("A08", pid("S4", "Newer^Bob"), when="20261120170000", cid="S-14"),
    ]


@pytest.mark.parametrize("size", [2, 3, 5, 64])
def test_batches_give_the_same_answers_and_state_as_one_by_one(
        db: Database, tmp_path: Path, size: int) -> None:
    """The reference applies each message in its own transaction on SQLite."""
    reference_db = Database(f"sqlite:///{tmp_path / 'reference.db'}")
    reference_db.create_schema()
    try:
        reference = AdtFeed(reference_db, PatientIndex(reference_db), DOMAINS)
        expected = [reference.apply(m) for m in _scenario()]
        want = _state(reference_db)
    finally:
        reference_db.dispose()
    batched = AdtFeed(db, PatientIndex(db), DOMAINS)
    scenario = _scenario()
    got: list[object] = []
    for k in range(0, len(scenario), size):
        got.extend(batched.apply_batch(scenario[k:k + size]))
    assert got == expected
    assert [d.code for d in expected] == ["AA"] * 12 + ["AE", "AA", "AE", "AE", "AA"]
    have = _state(db)
    if not db.is_sqlite:  # timestamps read back with their zone on PostgreSQL
        for state in (want, have):
            state["patients"] = [p[:-1] for p in state["patients"]]
    assert have == want
