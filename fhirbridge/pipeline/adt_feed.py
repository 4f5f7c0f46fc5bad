"""Apply HL7 v2 ADT events to the patient index, durably, before the ACK (HL7 v2.5.1 2.9.2
original-mode acknowledgment: AA only after commit).

PID-3 / MRG-1 CX identifiers map to FHIR systems through the configured identifier domains
(CX-4 namespace id = hl7_assigning_authority, or CX-4 universal id = the system's OID);
identifiers from unknown domains are ignored (none left in PID-3/MRG-1: AE 204, HL7 table
0357 unknown key identifier). A repeated MSH-10 from the same sender is acknowledged again with
the stored answer and applied once. Trigger events fhirbridge does not apply (A02, A03, A11 …)
are recorded and answered as `[mllp] unsupported_events` says: AE 201 (default) or AA with
MSA-3 "not applied: event not supported" (v2.5.1 §2.9.2; never a bare AA).

Write path: `GroupCommitter` applies messages from all connections in batches, one
transaction per batch (`AdtFeed.apply_batch`: a message answered AE or raising is rolled back
alone), and answers each message only after that commit; the patient index's upsert uses Core
statements (docs/decisions.md, "ADT write path").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, bindparam, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fhirbridge.audit import Agent, AuditRecorder, AuditRow, adt_event
from fhirbridge.config import IdentifierDomain
from fhirbridge.hl7 import (
    CX,
    AckDecision,
    AdtEvent,
    IdentifierChange,
    OtherEvent,
    ParsedMessage,
    Patient,
    PatientMerge,
    PatientUpsert,
)
from fhirbridge.hl7.message import UNSUPPORTED_EVENT_CODE
from fhirbridge.identity.model import Identifier, Name
from fhirbridge.pipeline.corrections import enqueue_correction
from fhirbridge.store.db import Database
from fhirbridge.store.models import Hl7Message, utcnow
from fhirbridge.store.patient_index import IndexOutcome, PatientFacts, PatientIndex

log = logging.getLogger("fhirbridge.adt")

HL7_SEX_TO_FHIR = {"F": "female", "M": "male", "O": "other", "A": "other", "U": "unknown",
                   "N": "unknown"}


class _Redo(Exception):
    """A message without a savepoint raised: roll back, run the batch with savepoints."""


#: MSA-3 / stored ack_text for a trigger event that is recorded but not applied
NOT_APPLIED_TEXT = "not applied: event not supported"
_UNSUPPORTED = (UNSUPPORTED_EVENT_CODE, ("MSH", 9))  # HL7 table 0357, at MSH-9.2


class _Refused(Exception):
    def __init__(self, decision: AckDecision) -> None:
        self.decision = decision


_MESSAGES = Hl7Message.__table__
_MESSAGE_INSERT = insert(_MESSAGES)
_SEEN_STMT = select(_MESSAGES.c.ack_code, _MESSAGES.c.ack_text).where(
    _MESSAGES.c.sender == bindparam("sender"), _MESSAGES.c.control_id == bindparam("cid"))


def _seen(conn: Connection, sender: str, control_id: str) -> AckDecision | None:
    """The stored answer to an earlier message with this (sender, MSH-10), if any."""
    row = conn.execute(_SEEN_STMT, {"sender": sender, "cid": control_id}).first()
    if row is None:
        return None
    if row.ack_code == "AE" and row.ack_text == NOT_APPLIED_TEXT:
        return AckDecision.error(row.ack_text, *_UNSUPPORTED)
    return AckDecision(row.ack_code, row.ack_text)


class AdtFeed:
    def __init__(self, db: Database, index: PatientIndex, domains: list[IdentifierDomain],
                 on_applied: Callable[[str], None] | None = None,
                 audit: AuditRecorder | None = None, unsupported_events: str = "AE") -> None:
        if unsupported_events not in ("AE", "AA"):
            raise ValueError("unsupported_events must be AE or AA")
        self.unsupported_events = unsupported_events
        self.db = db
        self.index = index
        self.domains = domains
        self.on_applied = on_applied
        self.audit = audit  # an AuditEvent per applied change, in the same transaction
        self._held = threading.local()
        self._audit = threading.local()  # this transaction's AuditEvent rows (.rows)

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
        """Run in a worker thread: one transaction for this message; AA only after it
        commits. Exceptions propagate (the listener answers AE 207)."""
        ev = parsed.event
        sender = f"{ev.sending_application}|{ev.sending_facility}"
        self._audit.rows = []
        try:
            with self._transaction() as conn:
                decision, applied = self._apply_one(conn, ev, sender, parsed.peer)
                if decision.code != "AA" and applied is None:
                    raise _Refused(decision)  # roll back whatever was half done
                self._insert_audit(conn)
        except _Refused as exc:
            return exc.decision
        except IntegrityError:  # the same control id committed concurrently: answer as it did
            with self._transaction() as conn:
                seen = _seen(conn, sender, ev.message_control_id)
            if seen is None:
                raise
            return seen
        self._forward_audit()
        if applied and self.on_applied is not None:
            self.on_applied(ev.event_type)
        return decision

    def apply_batch(self, batch: list[ParsedMessage]) -> list[AckDecision | Exception]:
        """Group commit: apply `batch` in order in ONE transaction, then commit once. Returns
        one AckDecision (or the exception, → AE) per message; an AA is only returned once the
        shared commit has returned.

        A message that is refused (AE) or raises is rolled back alone. Merges and A47 run in
        a SAVEPOINT each. Upserts (and events not applied) write nothing before they are sure
        to be accepted, so they run without one; should one of them raise, the whole
        transaction is rolled back (nothing was acknowledged) and the batch is run again with
        a SAVEPOINT for every message.

        When the transaction itself fails (BEGIN, a savepoint or the COMMIT), nothing of the
        batch is known to be committed: every message is applied again in a transaction of
        its own (`apply`; a message that did commit is found by its MSH-10)."""
        if len(batch) == 1:
            try:
                return [self.apply(batch[0])]
            except Exception as exc:
                if not getattr(self._held, "active", False):
                    return [exc]
                # The held connection may have died (database restarted): once more on a
                # fresh one. Safe: had the first attempt committed, its MSH-10 is found.
                log.warning("ADT message %s failed (%s): retrying on a new connection",
                            batch[0].event.message_control_id[:32], type(exc).__name__)
                try:
                    return [self.apply(batch[0])]
                except Exception as again:
                    return [again]
        try:
            try:
                results, applied_types = self._batch(batch, savepoints=False)
            except _Redo:
                results, applied_types = self._batch(batch, savepoints=True)
        except Exception as exc:
            log.warning("ADT batch of %d not committed (%s): applying one by one", len(batch),
                        type(exc).__name__)
            out: list[AckDecision | Exception] = []
            for parsed in batch:
                try:
                    out.append(self.apply(parsed))
                except Exception as one_exc:
                    out.append(one_exc)
            return out
        if self.on_applied is not None:
            for event_type in applied_types:
                self.on_applied(event_type)
        return results

    def _batch(self, batch: list[ParsedMessage], *, savepoints: bool
               ) -> tuple[list[AckDecision | Exception], list[str]]:
        results: list[AckDecision | Exception] = []
        applied_types: list[str] = []
        self._audit.rows = []
        with self._transaction() as conn:
            for parsed in batch:
                ev = parsed.event
                sender = f"{ev.sending_application}|{ev.sending_facility}"
                if savepoints or not isinstance(ev, (PatientUpsert, OtherEvent)):
                    sp = conn.begin_nested()
                    try:
                        decision, applied = self._apply_one(conn, ev, sender, parsed.peer)
                    except IntegrityError as exc:
                        sp.rollback()
                        seen = _seen(conn, sender, ev.message_control_id)
                        results.append(seen if seen is not None else exc)
                        continue
                    except Exception as exc:
                        log.error("ADT message %s (%s) failed in a batch: %s",
                                  ev.message_control_id[:32], ev.event_type,
                                  type(exc).__name__)
                        sp.rollback()
                        results.append(exc)
                        continue
                    if decision.code != "AA" and applied is None:
                        sp.rollback()
                    else:
                        sp.commit()
                else:
                    try:
                        # PatientIndex.upsert returns AE before it writes anything
                        decision, applied = self._apply_one(conn, ev, sender, parsed.peer)
                    except Exception as exc:
                        raise _Redo() from exc  # rolls the whole transaction back
                if applied:
                    applied_types.append(ev.event_type)
                results.append(decision)
            self._insert_audit(conn)  # one multi-row INSERT for the batch, before COMMIT
        self._forward_audit()
        return results, applied_types

    def _insert_audit(self, conn: Connection) -> None:
        rows: list[AuditRow] = getattr(self._audit, "rows", [])
        if rows and self.audit is not None:
            self.audit.insert(conn, rows)

    def _forward_audit(self) -> None:
        """After the commit: the syslog copy of this transaction's AuditEvents."""
        rows: list[AuditRow] = getattr(self._audit, "rows", [])
        self._audit.rows = []
        if rows and self.audit is not None:
            self.audit.forward(rows)

    def _audit_row(self, ev: AdtEvent, peer: str) -> AuditRow | None:
        """The AuditEvent of an applied patient change (ITI-8 style): agent = the sending
        application|facility (MSH-3|MSH-4) and the MLLP peer; entity = the patient (its
        first identifier in a configured domain) and the message (MSH-10)."""
        if self.audit is None:
            return None
        if isinstance(ev, PatientMerge):
            cxs = ev.merges[0].surviving.identifiers if ev.merges else ()
        elif isinstance(ev, (PatientUpsert, IdentifierChange)):
            cxs = ev.patient.identifiers
        else:
            return None
        ids = self.identifiers(cxs)
        address = peer.split(" ", 1)[0].rsplit(":", 1)[0].strip("[]") if peer else ""
        return adt_event(event_type=ev.event_type, control_id=ev.message_control_id,
                         patient=(ids[0].system, ids[0].value) if ids else None,
                         agent=Agent(f"{ev.sending_application}|{ev.sending_facility}", peer,
                                     address, "mllp"),
                         source_id=self.audit.source_id)

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """A Core connection in a durable transaction (what `Database.transaction()` gives,
        without the ORM session's cost: ~60 instead of ~150 µs per transaction). In a
        thread inside `holding_connection()` the same connection is reused (no pool checkout
        and, on PostgreSQL, no pre-ping round trip); after any error it is dropped and the
        next transaction starts on a fresh one."""
        if not getattr(self._held, "active", False):
            with self.db.engine.connect() as conn, conn.begin():
                yield conn
            return
        held: Connection | None = self._held.conn
        if held is None:
            held = self._held.conn = self.db.engine.connect()
        try:
            with held.begin():
                yield held
        except (_Refused, _Redo):
            raise  # rolled back; the connection is fine
        except BaseException:
            self._held.conn = None  # possibly broken: the next transaction reconnects
            with contextlib.suppress(Exception):
                held.close()
            raise

    @contextmanager
    def holding_connection(self) -> Iterator[None]:
        """Keep one connection (opened when first needed) for this thread's transactions:
        the group-commit writer."""
        self._held.active, self._held.conn = True, None
        try:
            yield
        finally:
            conn, self._held.conn, self._held.active = self._held.conn, None, False
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

    def _apply_one(self, conn: Connection, ev: AdtEvent, sender: str, peer: str = ""
                   ) -> tuple[AckDecision, bool | None]:
        """Inside the caller's transaction (or savepoint). Returns the answer and whether
        the message was applied now (True), was a repeat (False) or is refused (None: the
        caller rolls its work back)."""
        seen = _seen(conn, sender, ev.message_control_id)
        if seen is not None:
            return seen, False
        if isinstance(ev, OtherEvent):  # recorded, not applied, and the sender is told so
            if self.unsupported_events == "AA":
                decision = AckDecision.accept(NOT_APPLIED_TEXT)
            else:
                decision = AckDecision.error(NOT_APPLIED_TEXT, *_UNSUPPORTED)
            conn.execute(_MESSAGE_INSERT, {
                "sender": sender, "control_id": ev.message_control_id,
                "event_type": ev.event_type, "ack_code": decision.code,
                "ack_text": NOT_APPLIED_TEXT, "received_at": utcnow()})
            return decision, False
        outcome = self._apply_event(conn, ev)
        if outcome.ack != "AA":
            return AckDecision.error(outcome.text, *_error_code(outcome.text)), None
        conn.execute(_MESSAGE_INSERT, {
            "sender": sender, "control_id": ev.message_control_id,
            "event_type": ev.event_type, "ack_code": "AA", "ack_text": outcome.text,
            "received_at": utcnow()})
        if outcome.corrections:
            with _orm(conn) as s:
                for old, new, reason in outcome.corrections:
                    enqueue_correction(s, old, new, f"ADT {reason}")
        if outcome.applied and self.audit is not None:  # last: nothing after it can fail
            row = self._audit_row(ev, peer)
            if row is not None:
                self._audit.rows.append(row)
        return AckDecision.accept(), True

    def _apply_event(self, conn: Connection, ev: object) -> IndexOutcome:
        kw = {"event_at": getattr(ev, "event_datetime", None),
              "event_type": getattr(ev, "event_type", ""),
              "control_id": getattr(ev, "message_control_id", "")}
        if isinstance(ev, PatientUpsert):
            return self.index.upsert(conn, self.facts(ev.patient), **kw)  # type: ignore[arg-type]
        if isinstance(ev, PatientMerge):
            with _orm(conn) as s:
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
            with _orm(conn) as s:
                for old in self.identifiers(ev.prior_identifiers):
                    new = next((i for i in facts.identifiers if i.system == old.system), None)
                    if new is None:
                        return IndexOutcome("AE", "A47: PID-3 has no identifier in the domain "
                                            "of MRG-1", False)
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


def _error_code(text: str) -> tuple[str, tuple[str, int] | None]:
    """HL7 table 0357 code and ERR-2 location for a patient index refusal: no identifier
    in a configured domain / not known to the index → 204 unknown key identifier."""
    if "no identifier in a configured domain" in text or "not known to the index" in text \
            or "identifiers in a configured" in text:
        return "204", ("MRG", 1) if text.startswith(("MRG-1", "A47: MRG-1")) else ("PID", 3)
    if "in the domain of MRG-1" in text:
        return "204", ("PID", 3)
    return "207", None


@contextmanager
def _orm(conn: Connection) -> Iterator[Session]:
    """An ORM session inside the caller's Core transaction, in a SAVEPOINT of its own: its
    work is flushed and the savepoint released when the block ends (also on an early
    return); on an exception it is rolled back. The caller's transaction decides the rest.
    A fresh session each time, so no row cached earlier in the batch is seen."""
    s = Session(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False)
    try:
        yield s
        s.commit()
    finally:
        s.close()


class GroupCommitter:
    """One writer thread for the ADT feed: messages handed over by any MLLP connection are
    applied in batches, one transaction per batch (`AdtFeed.apply_batch`), and each caller's
    future is resolved only after that transaction's commit has returned, so an AA is never
    sent for an uncommitted message. A connection has one message in flight at a time, so
    its order is kept; batches run one after the other in arrival order.

    A batch is what is waiting when the writer is free, up to `max_batch`. While it holds
    fewer messages than there are connections that sent one in the last `active_window`
    seconds, the writer waits up to `max_wait` seconds for theirs (so four busy connections
    share one commit instead of alternating 1, 3, 1, 3); a lone busy connection never waits.
    """

    def __init__(self, feed: AdtFeed, *, max_batch: int = 64, max_wait: float = 0.002,
                 active_window: float = 0.05) -> None:
        self.feed = feed
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait)
        self.active_window = active_window
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._last_seen: dict[object, float] = {}  # submitter (connection task) → time
        self.batches = 0  # counters for tests and benchmarks
        self.messages = 0

    def start(self) -> GroupCommitter:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fhirbridge-adt-writer",
                                            daemon=True)
            self._thread.start()
        return self

    async def submit(self, parsed: ParsedMessage) -> AckDecision:
        """Await the answer for one message (raises what applying it raised)."""
        if self._thread is None:
            raise RuntimeError("GroupCommitter not started")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[AckDecision] = loop.create_future()
        now = time.monotonic()
        if len(self._last_seen) > 256:  # forget connections gone quiet
            self._last_seen = {k: t for k, t in self._last_seen.items()
                               if now - t < self.active_window}
        self._last_seen[asyncio.current_task()] = now
        self._queue.put((parsed, future, loop))
        return await future

    def _active(self) -> int:
        """Connections (submitting tasks) that sent a message within `active_window`."""
        cutoff = time.monotonic() - self.active_window
        return sum(1 for t in tuple(self._last_seen.values()) if t >= cutoff)

    def close(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then stop the writer thread."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    def _take(self, first: _Item) -> tuple[list[_Item], bool]:
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        expected = 0
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                if not expected:
                    expected = min(self.max_batch, self._active())
                left = deadline - time.monotonic()
                if left <= 0 or len(batch) >= expected:
                    break
                try:
                    item = self._queue.get(timeout=left)
                except queue.Empty:
                    break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        holding = getattr(self.feed, "holding_connection", None)
        with holding() if holding is not None else contextlib.nullcontext():
            self._loop()

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch, stopping = self._take(first)
            try:
                results = self.feed.apply_batch([parsed for parsed, _, _ in batch])
            except Exception as exc:  # apply_batch answers per message; be safe anyway
                results = [exc] * len(batch)
            self.batches += 1
            self.messages += len(batch)
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[AckDecision],
                                                                 AckDecision | Exception]]] = {}
            for (_, future, loop), result in zip(batch, results, strict=True):
                by_loop.setdefault(loop, []).append((future, result))
            for loop, answers in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_deliver, answers)
                except RuntimeError:  # that event loop is closed: nobody waits any more
                    pass


_Item = tuple[ParsedMessage, "asyncio.Future[AckDecision]", asyncio.AbstractEventLoop]


def _deliver(answers: list[tuple[asyncio.Future[AckDecision], AckDecision | Exception]]
             ) -> None:
    for future, result in answers:
        if future.done():  # the connection went away meanwhile
            continue
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)
