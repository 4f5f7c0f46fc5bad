"""Database engine and sessions: SQLite in WAL mode (embedded) or PostgreSQL.

SQLite writes take the lock up front (`BEGIN IMMEDIATE`) so concurrent writers queue instead
of failing on upgrade; PostgreSQL uses `FOR UPDATE SKIP LOCKED` in the job queue.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from fhirbridge.store.models import Base


class Database:
    # Every engine has hide_parameters=True: a statement error's message (logged, or raised
    # into a handler) names the statement but never the bound values (names, identifiers).

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                _private_sqlite_files(Path(path))
            self.engine: Engine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": 30},
                hide_parameters=True,
            )
            event.listen(self.engine, "connect", _sqlite_on_connect)
            event.listen(self.engine, "begin", _sqlite_on_begin)
            # A second pool for steps that may be redone (below): commits without fsync.
            self._relaxed_engine: Engine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": 30},
                hide_parameters=True,
            )
            event.listen(self._relaxed_engine, "connect", _sqlite_on_connect_relaxed)
            event.listen(self._relaxed_engine, "begin", _sqlite_on_begin)
            # Reads: a deferred BEGIN (a WAL snapshot) never takes or waits for the write lock.
            self._read_engine: Engine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": 30},
                hide_parameters=True,
            )
            event.listen(self._read_engine, "connect", _sqlite_on_connect)
            event.listen(self._read_engine, "begin", _sqlite_on_begin_read)
        else:
            self.engine = create_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True,
                                        hide_parameters=True)
            self._relaxed_engine = self.engine
            self._read_engine = self.engine
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(self._read_engine, expire_on_commit=False)
        self._relaxed_sessions = sessionmaker(self._relaxed_engine, expire_on_commit=False)

    def create_schema(self) -> None:
        Base.metadata.create_all(self.engine)

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[Session]:
        """One unit of work: committed on success, rolled back on any exception.

        durable=True (the default): the commit survives power loss before it returns — for
        anything acknowledged to someone else (a 201, an HL7 AA, a review decision).
        durable=False: the pipeline's own progress (claims, step results, Task states),
        which an idempotent re-run recreates; the commit is atomic and survives a crash of
        the process, but the last ones may be lost with the machine's power (SQLite WAL
        `synchronous=NORMAL`; PostgreSQL `synchronous_commit=off`). It saves an fsync per
        step and the write lock is held for microseconds instead of milliseconds."""
        factory = self._sessions if durable else self._relaxed_sessions
        with factory() as session:
            with session.begin():
                if not durable and not self.is_sqlite:
                    session.execute(text("SET LOCAL synchronous_commit TO OFF"))
                yield session

    def session(self) -> Session:
        """A session for reading (one consistent snapshot; on SQLite it never takes the write
        lock, so readers never queue behind the ADT writer or the workers). Write only in
        `transaction()`."""
        return self._read_sessions()

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return True
        except Exception:
            return False

    def dispose(self) -> None:
        self.engine.dispose()
        self._relaxed_engine.dispose()
        self._read_engine.dispose()


def _private_sqlite_files(path: Path) -> None:
    """PHI at rest: the database file 0600 (created so when new); SQLite gives its -wal and
    -shm files the database file's mode. Existing files more open than that are closed."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            if f.stat().st_mode & 0o077:
                os.chmod(f, 0o600)
        except FileNotFoundError:
            pass


def _sqlite_on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # an AA or a 201 survives power loss
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_on_connect_relaxed(dbapi_connection, record) -> None:  # type: ignore[no-untyped-def]
    _sqlite_on_connect(dbapi_connection, record)
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA synchronous=NORMAL")  # WAL: atomic and crash-safe, no fsync per commit
    cur.close()


def _sqlite_on_begin(conn) -> None:  # type: ignore[no-untyped-def]
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_on_begin_read(conn) -> None:  # type: ignore[no-untyped-def]
    conn.exec_driver_sql("BEGIN")
