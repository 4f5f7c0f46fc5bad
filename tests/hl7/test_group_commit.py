"""Group commit behind the MLLP listener: many connections, one writer thread, one transaction
per batch with a savepoint per message, every ACK only after the batch's commit returned.

Real sockets against `MLLPServer(GroupCommitter(AdtFeed(...)).submit)` on SQLite (and
PostgreSQL when FHIRBRIDGE_TEST_POSTGRES_URL is set).
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select

from fhirbridge.config import IdentifierDomain
from fhirbridge.hl7 import MLLPServer
from fhirbridge.pipeline.adt_feed import AdtFeed, GroupCommitter
from fhirbridge.store.db import Database
from tests.support.databases import fresh_database
from fhirbridge.store.models import Hl7Message, IndexHistory, IndexIdentifier
from fhirbridge.store.patient_index import PatientIndex
from tests.hl7.test_mllp import Loop, frame, msa, read_acks

MRN = "urn:oid:2.16.840.1.113883.3.7777"
REGION = "urn:oid:2.16.840.1.113883.3.999"
DOMAINS = [IdentifierDomain(fhir_system=MRN, hl7_assigning_authority="HOSP", default=True),
           IdentifierDomain(fhir_system=REGION, hl7_assigning_authority="REGION")]


def a08(cid: str, mrn: str, name: str = "Müller^José", *, when: str = "20261120100000",
        extra: str = "", trigger: str = "A08") -> bytes:
    return (f"MSH|^~\\&|ADT|HOSP|FHIRBRIDGE|HOSP|{when}||ADT^{trigger}|{cid}|P|2.5.1\r"
            f"EVN|{trigger}|{when}\rPID|1||{mrn}^^^HOSP^MR{extra}||{name}||19840307|M\r"
            ).encode()


@pytest.fixture(scope="module")
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    yield from fresh_database(request.param, tmp_path)


MakeService = Callable[..., "Service"]


class Service:
    def __init__(self, loop: Loop, db: Database, *, max_wait: float = 0.0,
                 max_batch: int = 64, active_window: float = 0.05) -> None:
        self.db = db
        self.feed = AdtFeed(db, PatientIndex(db), DOMAINS)
        self.writer = GroupCommitter(self.feed, max_batch=max_batch, max_wait=max_wait,
                                     active_window=active_window).start()
        self.server = MLLPServer(self.writer.submit, idle_timeout=30, on_stop=self.writer.close)
        self.loop = loop
        loop.run(self.server.start("127.0.0.1", 0))
        # a separate engine: it only sees what was committed
        self.observer = Database(db.url)

    @property
    def port(self) -> int:
        return self.server.port

    def stored(self, control_id: str) -> bool:
        with self.observer.session() as s:
            return s.scalar(select(func.count()).select_from(Hl7Message).where(
                Hl7Message.control_id == control_id)) == 1

    def count(self, model: type) -> int:
        with self.observer.session() as s:
            return int(s.scalar(select(func.count()).select_from(model)) or 0)

    def stop(self) -> None:
        self.loop.run(self.server.stop())
        self.observer.dispose()


@pytest.fixture
def make_service(loop: Loop, db: Database) -> Iterator[MakeService]:
    services: list[Service] = []

    def make(**kw: float) -> Service:
        svc = Service(loop, db, **kw)
        services.append(svc)
        return svc

    yield make
    for svc in services:
        svc.stop()


def one_by_one(port: int, messages: list[bytes],
               check: Callable[[tuple[str, str, str]], None] | None = None
               ) -> list[tuple[str, str, str]]:
    """Send each message and wait for its ACK before the next (as ADT senders do)."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        for m in messages:
            s.sendall(frame(m))
            ack = read_acks(s, 1)
            assert ack, "connection closed without an ACK"
            out.append(msa(ack[0]))
            if check is not None:
                check(out[-1])
    return out


# -- many connections -------------------------------------------------------------------------
def test_concurrent_connections_committed_before_aa_and_in_order(
        make_service: MakeService) -> None:
    svc = make_service()
    conns, per_conn = 8, 25
    tag = uuid.uuid4().hex[:8]

    def check(answer: tuple[str, str, str]) -> None:
        code, cid, _ = answer
        assert code == "AA"
        assert svc.stored(cid), "AA for a message another connection cannot see committed"

    def sender(c: int) -> list[tuple[str, str, str]]:
        # every connection updates its own patient; names carry the sequence number and the
        # event times grow, so the final name shows the order in which they were applied
        msgs = [a08(f"{tag}-{c}-{n}", f"P{tag}{c}", f"Name{n:03d}^Conn{c}",
                    when=f"2026112010{n // 60:02d}{n % 60:02d}") for n in range(per_conn)]
        return one_by_one(svc.port, msgs, check)

    with ThreadPoolExecutor(conns) as pool:
        results = list(pool.map(sender, range(conns)))
    assert all(code == "AA" for r in results for code, _, _ in r)
    assert svc.count(Hl7Message) == conns * per_conn
    for c in range(conns):
        rec = svc.feed.index.find_by_identifier(MRN, f"P{tag}{c}")[0]
        assert rec.names[0].family == f"Name{per_conn - 1:03d}"
        with svc.observer.session() as s:
            key = rec.ref.removeprefix("index:")
            applied = list(s.scalars(select(IndexHistory.control_id).where(
                IndexHistory.patient_key == key).order_by(IndexHistory.id)))
        assert applied == [f"{tag}-{c}-{n}" for n in range(per_conn)]  # per-connection order
    assert svc.writer.messages == conns * per_conn
    assert svc.writer.batches < svc.writer.messages  # some messages shared a commit


def test_bad_message_in_a_batch_gets_ae_others_aa_and_stored(make_service: MakeService) -> None:
    # Five connections that each sent a message already count as active: the writer waits
    # (up to max_wait) until it holds one message from each, so they share one transaction.
    svc = make_service(max_wait=1.0, active_window=60)
    tag = uuid.uuid4().hex[:8]
    one_by_one(svc.port, [a08(f"{tag}-s1", f"A{tag}", extra=f"~R{tag}^^^REGION^PI"),
                          a08(f"{tag}-s2", f"B{tag}")])
    good = [a08(f"{tag}-g{n}", f"G{tag}{n}") for n in range(4)]
    bad = a08(f"{tag}-bad", f"B{tag}", extra=f"~R{tag}^^^REGION^PI")  # R… is A's: AE
    warmed, go = threading.Barrier(6), threading.Barrier(6)

    def send(args: tuple[int, bytes]) -> tuple[str, str, str, str]:
        n, m = args
        with socket.create_connection(("127.0.0.1", svc.port), timeout=20) as s:
            s.sendall(frame(a08(f"{tag}-w{n}", f"W{tag}{n}")))
            assert msa(read_acks(s, 1)[0])[0] == "AA"
            warmed.wait()
            go.wait()
            s.sendall(frame(m))
            acks = read_acks(s, 1)
            return msa(acks[0]) + (acks[0].decode(),)  # type: ignore[return-value]

    with ThreadPoolExecutor(5) as pool:
        futures = pool.map(send, enumerate([*good[:2], bad, *good[2:]]))
        warmed.wait()
        batches_before = svc.writer.batches
        go.wait()
        answers = list(futures)
    assert svc.writer.batches == batches_before + 1  # one shared transaction
    codes = {cid: code for code, cid, *_ in answers}
    assert codes == {**{f"{tag}-g{n}": "AA" for n in range(4)}, f"{tag}-bad": "AE"}
    bad_ack = next(a for a in answers if a[1] == f"{tag}-bad")[3]
    assert "ERR|" in bad_ack and "207" in bad_ack and "merge" in bad_ack
    for n in range(4):
        assert svc.stored(f"{tag}-g{n}")
    assert not svc.stored(f"{tag}-bad")
    with svc.observer.session() as s:  # the refused message attached nothing
        owner = s.scalar(select(IndexIdentifier.patient_key).where(
            IndexIdentifier.system == REGION, IndexIdentifier.value == f"R{tag}"))
    assert owner == svc.feed.index.find_by_identifier(MRN, f"A{tag}")[0].ref.removeprefix(
        "index:")


def test_repeated_control_id_across_connections_applied_once(make_service: MakeService) -> None:
    svc = make_service(max_wait=0.2)
    tag = uuid.uuid4().hex[:8]
    m = a08(f"{tag}-dup", f"D{tag}")
    barrier = threading.Barrier(4)

    def send(_: int) -> str:
        with socket.create_connection(("127.0.0.1", svc.port), timeout=20) as s:
            barrier.wait()
            s.sendall(frame(m))
            return msa(read_acks(s, 1)[0])[0]

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(send, range(4))) == ["AA"] * 4
    assert svc.count(Hl7Message) == 1 and svc.count(IndexHistory) == 1


# -- never AA before the commit ---------------------------------------------------------------
def test_no_ack_while_the_commit_is_blocked(make_service: MakeService, db: Database) -> None:
    svc = make_service()
    tag = uuid.uuid4().hex[:8]
    gate, entered = threading.Event(), threading.Event()

    def hold_commit(conn: object) -> None:
        entered.set()
        gate.wait(10)

    event.listen(db.engine, "commit", hold_commit)
    try:
        with socket.create_connection(("127.0.0.1", svc.port), timeout=10) as s:
            s.sendall(frame(a08(f"{tag}-1", f"H{tag}")))
            assert entered.wait(5)
            s.settimeout(0.5)
            with pytest.raises(TimeoutError):
                s.recv(65536)  # the commit has not returned: no ACK yet
            gate.set()
            s.settimeout(10)
            assert msa(read_acks(s, 1)[0])[0] == "AA"
    finally:
        gate.set()
        event.remove(db.engine, "commit", hold_commit)
    assert svc.stored(f"{tag}-1")


def test_failed_commit_never_answers_aa(make_service: MakeService, db: Database) -> None:
    svc = make_service(max_wait=0.3)
    tag = uuid.uuid4().hex[:8]

    def fail(conn: object) -> None:
        raise RuntimeError("disk full")

    event.listen(db.engine, "commit", fail)
    try:
        barrier = threading.Barrier(3)

        def send(n: int) -> str:
            with socket.create_connection(("127.0.0.1", svc.port), timeout=20) as s:
                barrier.wait()
                s.sendall(frame(a08(f"{tag}-{n}", f"F{tag}{n}")))
                return msa(read_acks(s, 1)[0])[0]

        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(send, range(3))) == ["AE"] * 3
    finally:
        event.remove(db.engine, "commit", fail)
    assert svc.count(Hl7Message) == 0 and svc.count(IndexHistory) == 0
    # the writer keeps working afterwards
    assert one_by_one(svc.port, [a08(f"{tag}-ok", f"F{tag}ok")])[0][0] == "AA"


def test_writer_crash_answers_ae(make_service: MakeService,
        monkeypatch: pytest.MonkeyPatch) -> None:
    svc = make_service()

    def crash(batch: object) -> list[object]:
        raise MemoryError("simulated")

    monkeypatch.setattr(svc.feed, "apply_batch", crash)
    tag = uuid.uuid4().hex[:8]
    code, _, text_ = one_by_one(svc.port, [a08(f"{tag}-x", f"X{tag}")])[0]
    assert code == "AE" and "X" + tag not in text_
    assert svc.count(Hl7Message) == 0
    monkeypatch.undo()
    assert one_by_one(svc.port, [a08(f"{tag}-y", f"X{tag}")])[0][0] == "AA"


def test_stop_finishes_the_queue_and_ends_the_thread(loop: Loop, db: Database) -> None:
    svc = Service(loop, db)
    tag = uuid.uuid4().hex[:8]
    assert one_by_one(svc.port, [a08(f"{tag}-1", f"S{tag}")])[0][0] == "AA"
    thread = svc.writer._thread
    assert thread is not None and thread.is_alive()
    t0 = time.monotonic()
    svc.stop()
    assert not thread.is_alive() and time.monotonic() - t0 < 10


# -- the field splitter that replaced python-hl7's parse on this path ------------------------
def _python_hl7_repetitions(segment: Any, number: int) -> list[list[list[str]]]:
    """What `raw_repetitions` returned when segments came from `hl7.parse`."""
    if segment is None or number >= len(segment):
        return []
    out: list[list[list[str]]] = []
    for rep in segment[number]:
        if isinstance(rep, str):
            out.append([[rep]])
        else:
            out.append([[c] if isinstance(c, str) else [str(x) for x in c] for c in rep])
    return out


def _corpus() -> list[bytes]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from mllp_transport import a08_message, small_a08_message

    samples = sorted((Path(__file__).resolve().parents[2] / "samples" / "adt").glob("*.hl7"))
    extra = ["MSH|^~\\&|A|B|C|D|20261120||ADT^A08|X1|P|2.5\rPID|1||A&B&C^^^HOSP&1.2&ISO^MR~~"
             "X^^^HOSP||a\\S\\b^c\\T\\d~^~||||||||||||||||||||||Y|\r",
             "MSH#:*@$#A#B#C#D#20261120##ADT:A08#X2#P#2.5\rPID#1##Z1:::HOSP:MR*Z2@q:::HOSP##"
             "N1:G1@g2*N2\r"]
    return ([p.read_bytes() for p in samples] + [a08_message(1).encode(),
            small_a08_message(2).encode()] + [e.encode() for e in extra])


@pytest.mark.parametrize("raw", _corpus())
def test_field_split_matches_python_hl7(raw: bytes) -> None:
    import hl7

    from fhirbridge.hl7.message import decode_message, raw_repetitions

    msg = decode_message(raw)
    text_ = raw.decode(msg.header.encoding).replace("\r\n", "\r").replace("\n", "\r")
    reference = hl7.parse("\r".join(line for line in text_.split("\r") if line.strip()))
    assert len(reference) == len(msg.parsed)
    for ours, theirs in zip(msg.parsed, reference, strict=True):
        assert len(ours) == len(theirs)
        for n in range(1, len(theirs) + 1):
            assert raw_repetitions(ours, n, msg.delimiters) == _python_hl7_repetitions(
                theirs, n), (ours[0], n)


def test_dead_connection_is_replaced_without_ae(make_service: MakeService,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer keeps one connection; when it dies (database restarted) the message is
    applied on a fresh one and answered AA, as the pool's pre-ping did before."""
    svc = make_service()
    tag = uuid.uuid4().hex[:8]
    assert one_by_one(svc.port, [a08(f"{tag}-1", f"K{tag}")])[0][0] == "AA"
    real = svc.feed.apply_batch
    killed = []

    def kill_then_apply(batch: list[Any]) -> list[Any]:
        held = svc.feed._held.conn  # runs in the writer thread: its connection
        if held is not None and not killed:
            held.connection.dbapi_connection.close()
            killed.append(True)
        return real(batch)

    monkeypatch.setattr(svc.feed, "apply_batch", kill_then_apply)
    assert one_by_one(svc.port, [a08(f"{tag}-2", f"K{tag}", "New^Name",
                                     when="20261120110000")])[0][0] == "AA"
    assert killed and svc.stored(f"{tag}-2")
    assert svc.feed.index.find_by_identifier(MRN, f"K{tag}")[0].names[0].family == "New"
