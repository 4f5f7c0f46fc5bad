"""The local patient index: identifiers per domain, current demographics with history, and
merge links from subsumed to surviving patient (IHE PAM / PIX feed semantics).

Fed by ADT (HL7 v2.5.1 3.3.1 A01 … 3.3.40 A40, 3.3.47 A47); read by the match policy.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache

from sqlalchemy import Connection, Select, and_, bindparam, insert, or_, select, update
from sqlalchemy.orm import Session

from fhirbridge.identity.model import Identifier, Name, PatientRecord
from fhirbridge.store.db import Database
from fhirbridge.store.models import IndexHistory, IndexIdentifier, IndexPatient, utcnow

INDEX_PREFIX = "index:"


@dataclass(frozen=True)
class PatientFacts:
    """Demographics carried by one ADT message, identifiers already mapped to FHIR systems."""

    identifiers: tuple[Identifier, ...]
    names: tuple[Name, ...] = ()
    birth_date: str | None = None  # YYYY-MM-DD
    sex: str | None = None  # FHIR gender


@dataclass
class IndexOutcome:
    """What applying one event did; `ack` is AA or AE, `text` never carries PHI."""

    ack: str = "AA"
    text: str = ""
    applied: bool = True
    # (old identifiers, identifier of the patient they now belong to, reason) for corrections
    corrections: list[tuple[tuple[Identifier, ...], Identifier, str]] = field(default_factory=list)


class PatientIndex:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- look-ups (fhirbridge.pipeline.patient.PatientIndexLookup) -------------------------
    # (prebuilt statements on the connection: a look-up runs for every upload)
    def find_by_identifier(self, system: str, value: str) -> list[PatientRecord]:
        with self.db.session() as s:
            conn = s.connection()
            key = conn.execute(_KEY_OF_IDENTIFIER, {"system": system, "value": value}).scalar()
            if key is None:
                return []
            rec = self._record(conn, key)
            return [rec] if rec else []

    def get(self, ref: str) -> PatientRecord | None:
        with self.db.session() as s:
            return self._record(s.connection(), ref.removeprefix(INDEX_PREFIX))

    @staticmethod
    def _record(conn: Connection, key: str) -> PatientRecord | None:
        p = conn.execute(_RECORD_STMT, {"key": key}).first()
        if p is None:
            return None
        idents = tuple(Identifier(system, value)
                       for system, value in conn.execute(_IDENTS_OF_STMT, {"key": key}))
        names = tuple(Name(family=n.get("family", ""), given=tuple(n.get("given", ())),
                           prefix=n.get("prefix", ""), suffix=n.get("suffix", ""))
                      for n in json.loads(p.names_json))
        return PatientRecord(
            source="index", ref=INDEX_PREFIX + key, identifiers=idents, names=names,
            birth_date=p.birth_date or None, sex=p.sex or None, active=p.active,
            replaced_by=INDEX_PREFIX + p.merged_into if p.merged_into else None)

    # -- events (run inside the caller's transaction) --------------------------------------
    def upsert(self, s: Session | Connection, facts: PatientFacts, *,
               event_at: datetime | None,
               event_type: str, control_id: str) -> IndexOutcome:
        """A01/A04/A05/A08/A28/A31: create or update; an event older than the last applied
        one is recorded in history but does not overwrite newer data.

        Core statements on the session's connection (no ORM objects): one look-up of the
        identifiers with their patients, the history insert, and an UPDATE only when a value
        changes (an A08 repeating the demographics writes its history row only).

        It answers AE only before writing anything: AdtFeed's group commit relies on that to
        run upserts without a savepoint each."""
        if not facts.identifiers:
            return IndexOutcome("AE", "PID-3 has no identifier in a configured domain", False)
        conn = s if isinstance(s, Connection) else s.connection()
        event_at = _as_utc(event_at)
        rows = conn.execute(_lookup_stmt(len(facts.identifiers)), _lookup_params(
            facts.identifiers)).all()
        found = {(r.system, r.value) for r in rows}
        patients: dict[str, _Row] = {}
        for r in rows:
            patients.setdefault(r.key, _Row(r.key, r.merged_into, r.names_json, r.birth_date,
                                            r.sex, r.last_event_at))
        survivors = {self._survivor_core(conn, k, patients) for k in list(patients)}
        if len(survivors) > 1:
            return IndexOutcome("AE", "PID-3 identifiers belong to different patients in the "
                                "index; a merge (A40) is needed first", False)
        missing = [i for i in facts.identifiers if (i.system, i.value) not in found]
        names_json = _names_json(facts.names) if facts.names else None
        if not survivors:
            key = uuid.uuid4().hex
            conn.execute(insert(_PATIENT), {
                "key": key, "active": True, "names_json": names_json or "[]",
                "birth_date": facts.birth_date if facts.birth_date is not None else "",
                "sex": facts.sex if facts.sex is not None else "", "last_event_at": event_at})
            self._insert_identifiers(conn, key, missing)
            self._history_core(conn, key, event_type, control_id, event_at, True, facts)
            return IndexOutcome()
        key = survivors.pop()
        self._insert_identifiers(conn, key, missing)
        p = patients.get(key) or self._patient_row(conn, key)
        assert p is not None
        if _older(event_at, p.last_event_at):
            self._history_core(conn, key, event_type, control_id, event_at, False, facts)
            return IndexOutcome(applied=False, text="older than the data already applied")
        values: dict[str, object] = {}
        if names_json is not None and names_json != p.names_json:
            values["names_json"] = names_json
        if facts.birth_date is not None and facts.birth_date != p.birth_date:
            values["birth_date"] = facts.birth_date
        if facts.sex is not None and facts.sex != p.sex:
            values["sex"] = facts.sex
        if event_at is not None and (p.last_event_at is None
                                     or _utc(event_at) != _utc(p.last_event_at)):
            values["last_event_at"] = event_at
        if values:
            conn.execute(update(_PATIENT).where(_PATIENT.c.key == key).values(**values))
        self._history_core(conn, key, event_type, control_id, event_at, True, facts)
        out = IndexOutcome()
        if values.keys() & {"names_json", "birth_date", "sex"}:
            idents = self._identifiers_core(conn, key)
            out.corrections.append((idents, idents[0], event_type))
        return out

    def merge(self, s: Session, survivor: PatientFacts, prior: tuple[Identifier, ...], *,
              event_at: datetime | None, event_type: str, control_id: str) -> IndexOutcome:
        """A40 (and A18/A34/A36): the patient named by MRG-1 is subsumed by the PID-3 one.
        Repeats are no-ops; a merge that would make a cycle (inverted A40) is refused."""
        event_at = _as_utc(event_at)
        if not survivor.identifiers or not prior:
            return IndexOutcome("AE", "merge needs PID-3 and MRG-1 identifiers in a configured "
                                "domain", False)
        surv_keys = {self._survivor(s, k) for k in self._keys_for(s, survivor.identifiers)}
        if len(surv_keys) > 1:
            return IndexOutcome("AE", "PID-3 identifiers belong to different patients", False)
        if surv_keys:
            surv_key = surv_keys.pop()
            p = s.get(IndexPatient, surv_key)
            assert p is not None
            if not _older(event_at, p.last_event_at):
                self._apply(s, surv_key, survivor, event_at)
        else:
            surv_key = uuid.uuid4().hex
            s.add(IndexPatient(key=surv_key, active=True))
            s.flush()
            self._apply(s, surv_key, survivor, event_at)
        self._attach(s, surv_key, tuple(i for i in survivor.identifiers
                                        if i not in prior))
        prior_keys = set(self._keys_for(s, prior))
        prior_keys.discard(surv_key)  # MRG-1 naming the survivor itself changes nothing
        for k in prior_keys:
            if self._chain_contains(s, surv_key, k):
                return IndexOutcome("AE", "merge would make a cycle: the surviving patient was "
                                    "already merged into the prior one", False)
        if not prior_keys:
            # Unknown prior patient (merge before its A04, or out of order): keep a retired
            # stub so later look-ups by the old identifier lead to the survivor.
            stub = uuid.uuid4().hex
            s.add(IndexPatient(key=stub, active=False, merged_into=surv_key,
                               last_event_at=event_at))
            s.flush()
            self._attach(s, stub, prior)
            prior_keys = {stub}
        changed = False
        for k in prior_keys:
            p = s.get(IndexPatient, k)
            assert p is not None
            if p.merged_into != surv_key:
                p.merged_into, p.active = surv_key, False
                changed = True
                self._history(s, k, event_type, control_id, event_at, True, survivor)
            # anything merged into the prior now points straight at the survivor
            for child in s.scalars(select(IndexPatient).where(IndexPatient.merged_into == k)):
                child.merged_into = surv_key
        self._history(s, surv_key, event_type, control_id, event_at, True, survivor)
        out = IndexOutcome()
        out.corrections.append((prior, survivor.identifiers[0], event_type))
        if not changed:
            out.text = "merge already applied"
        return out

    def change_identifier(self, s: Session, old: Identifier, new: Identifier,
                          facts: PatientFacts, *, event_at: datetime | None, event_type: str,
                          control_id: str) -> IndexOutcome:
        """A47: the identifier MRG-1 becomes PID-3 on the same patient (same domain)."""
        event_at = _as_utc(event_at)
        row = s.scalar(select(IndexIdentifier).where(IndexIdentifier.system == old.system,
                                                     IndexIdentifier.value == old.value))
        taken = s.scalar(select(IndexIdentifier).where(IndexIdentifier.system == new.system,
                                                       IndexIdentifier.value == new.value))
        if row is None and taken is not None:
            return IndexOutcome(text="identifier change already applied",
                                corrections=[((old,), new, event_type)])
        if row is None:
            return IndexOutcome("AE", "MRG-1 identifier is not known to the index", False)
        if taken is not None and taken.patient_key != row.patient_key:
            return IndexOutcome("AE", "the new identifier already belongs to another patient",
                                False)
        if taken is not None:
            s.delete(row)
        else:
            row.system, row.value = new.system, new.value
        self._history(s, row.patient_key, event_type, control_id, event_at, True, facts)
        return IndexOutcome(corrections=[((old,), new, event_type)])

    # -- helpers ---------------------------------------------------------------------------
    def _keys_for(self, s: Session, idents: tuple[Identifier, ...]) -> list[str]:
        keys: list[str] = []
        for i in idents:
            k = s.scalar(select(IndexIdentifier.patient_key).where(
                IndexIdentifier.system == i.system, IndexIdentifier.value == i.value))
            if k is not None and k not in keys:
                keys.append(k)
        return keys

    def _identifiers(self, s: Session, key: str) -> tuple[Identifier, ...]:
        return tuple(Identifier(i.system, i.value) for i in s.scalars(
            select(IndexIdentifier).where(IndexIdentifier.patient_key == key)
            .order_by(IndexIdentifier.id)))

    def _survivor(self, s: Session, key: str) -> str:
        seen = {key}
        p = s.get(IndexPatient, key)
        while p is not None and p.merged_into and p.merged_into not in seen:
            seen.add(p.merged_into)
            key = p.merged_into
            p = s.get(IndexPatient, key)
        return key

    def _chain_contains(self, s: Session, start: str, target: str) -> bool:
        seen: set[str] = set()
        key: str | None = start
        while key is not None and key not in seen:
            if key == target:
                return True
            seen.add(key)
            p = s.get(IndexPatient, key)
            key = p.merged_into if p is not None else None
        return False

    def _attach(self, s: Session, key: str, idents: tuple[Identifier, ...]) -> None:
        for i in idents:
            row = s.scalar(select(IndexIdentifier).where(IndexIdentifier.system == i.system,
                                                         IndexIdentifier.value == i.value))
            if row is None:
                s.add(IndexIdentifier(system=i.system, value=i.value, patient_key=key))
        s.flush()

    def _apply(self, s: Session, key: str, facts: PatientFacts,
               event_at: datetime | None) -> None:
        p = s.get(IndexPatient, key)
        assert p is not None
        if facts.names:
            p.names_json = _names_json(facts.names)
        if facts.birth_date is not None:
            p.birth_date = facts.birth_date
        if facts.sex is not None:
            p.sex = facts.sex
        if event_at is not None and (p.last_event_at is None
                                     or not _older(event_at, p.last_event_at)):
            p.last_event_at = event_at

    def _history(self, s: Session, key: str, event_type: str, control_id: str,
                 event_at: datetime | None, applied: bool, facts: PatientFacts) -> None:
        s.add(IndexHistory(
            patient_key=key, event_type=event_type, control_id=control_id, event_at=event_at,
            applied=applied, snapshot_json=_snapshot(facts)))

    # -- Core helpers (the upsert path) ----------------------------------------------------
    @staticmethod
    def _patient_row(conn: Connection, key: str) -> _Row | None:
        r = conn.execute(_PATIENT_STMT, {"key": key}).first()
        return None if r is None else _Row(r.key, r.merged_into, r.names_json, r.birth_date,
                                           r.sex, r.last_event_at)

    def _survivor_core(self, conn: Connection, key: str, known: dict[str, _Row]) -> str:
        """`_survivor` over rows already fetched; a merge chain costs one query per hop."""
        seen = {key}
        p = known.get(key) or self._patient_row(conn, key)
        while p is not None and p.merged_into and p.merged_into not in seen:
            seen.add(p.merged_into)
            key = p.merged_into
            p = known.get(key) or self._patient_row(conn, key)
            if p is not None:
                known[key] = p
        return key

    @staticmethod
    def _insert_identifiers(conn: Connection, key: str, idents: list[Identifier]) -> None:
        for i in idents:  # one at a time: ids follow PID-3 order (records list them by id)
            conn.execute(_IDENT_INSERT, {"system": i.system, "value": i.value,
                                         "patient_key": key})

    @staticmethod
    def _identifiers_core(conn: Connection, key: str) -> tuple[Identifier, ...]:
        return tuple(Identifier(r.system, r.value) for r in conn.execute(
            _IDENTS_OF_STMT, {"key": key}))

    @staticmethod
    def _history_core(conn: Connection, key: str, event_type: str, control_id: str,
                      event_at: datetime | None, applied: bool, facts: PatientFacts) -> None:
        conn.execute(_HISTORY_INSERT, {
            "patient_key": key, "event_type": event_type, "control_id": control_id,
            "event_at": event_at, "applied": applied, "snapshot_json": _snapshot(facts),
            "recorded_at": utcnow()})


def _utc(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


def _older(event_at: datetime | None, applied_at: datetime | None) -> bool:
    """True when an event is strictly older than what was already applied."""
    if event_at is None or applied_at is None:
        return False
    return _utc(event_at) < _utc(applied_at)


def _as_utc(dt: datetime | None) -> datetime | None:
    """Event times are stored in UTC: SQLite keeps a DateTime's wall-clock time without its
    offset (read back as UTC), so a +0100 time stored as is would read an hour late."""
    return None if dt is None else _utc(dt).astimezone(timezone.utc)


def _names_json(names: tuple[Name, ...]) -> str:
    return json.dumps([{"family": n.family, "given": list(n.given), "prefix": n.prefix,
                        "suffix": n.suffix} for n in names], ensure_ascii=False)


def _snapshot(facts: PatientFacts) -> str:
    return json.dumps({
        "identifiers": [[i.system, i.value] for i in facts.identifiers],
        "names": [[n.family, list(n.given)] for n in facts.names],
        "birth_date": facts.birth_date, "sex": facts.sex}, ensure_ascii=False)


@dataclass(slots=True)
class _Row:
    key: str
    merged_into: str | None
    names_json: str
    birth_date: str
    sex: str
    last_event_at: datetime | None


_PATIENT = IndexPatient.__table__
_IDENT = IndexIdentifier.__table__
_HISTORY = IndexHistory.__table__
_PATIENT_COLS = (_PATIENT.c.key, _PATIENT.c.merged_into, _PATIENT.c.names_json,
                 _PATIENT.c.birth_date, _PATIENT.c.sex, _PATIENT.c.last_event_at)
_PATIENT_STMT = select(*_PATIENT_COLS).where(_PATIENT.c.key == bindparam("key"))
_IDENT_INSERT = insert(_IDENT)
_HISTORY_INSERT = insert(_HISTORY)
_IDENTS_OF_STMT = (select(_IDENT.c.system, _IDENT.c.value)
                   .where(_IDENT.c.patient_key == bindparam("key")).order_by(_IDENT.c.id))
_KEY_OF_IDENTIFIER = select(_IDENT.c.patient_key).where(_IDENT.c.system == bindparam("system"),
                                                        _IDENT.c.value == bindparam("value"))
_RECORD_STMT = select(_PATIENT.c.names_json, _PATIENT.c.birth_date, _PATIENT.c.sex,
                      _PATIENT.c.active, _PATIENT.c.merged_into).where(
                          _PATIENT.c.key == bindparam("key"))


@lru_cache(maxsize=16)
def _lookup_stmt(n: int) -> Select:  # type: ignore[type-arg]
    """Identifiers (system, value) 0…n-1 with their patients, in one statement (each term
    uses the (system, value) unique index)."""
    return (select(_IDENT.c.system, _IDENT.c.value, *_PATIENT_COLS)
            .join(_PATIENT, _PATIENT.c.key == _IDENT.c.patient_key)
            .where(or_(*[and_(_IDENT.c.system == bindparam(f"s{k}"),
                              _IDENT.c.value == bindparam(f"v{k}")) for k in range(n)])))


def _lookup_params(idents: tuple[Identifier, ...]) -> dict[str, str]:
    params: dict[str, str] = {}
    for k, i in enumerate(idents):
        params[f"s{k}"], params[f"v{k}"] = i.system, i.value
    return params
