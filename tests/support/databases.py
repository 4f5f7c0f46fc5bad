"""A fresh database for a test: SQLite in the test's directory, or PostgreSQL in a schema of
its own (dropped afterwards) when FHIRBRIDGE_TEST_POSTGRES_URL is set, else a skip that says so.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from fhirbridge.store.db import Database

PG_ENV = "FHIRBRIDGE_TEST_POSTGRES_URL"
PG_SKIP_REASON = f"{PG_ENV} not set: PostgreSQL backend not tested"


def fresh_database(kind: str, tmp_path: Path) -> Iterator[Database]:
    """Yield an empty fhirbridge schema on `kind` ("sqlite" or "postgresql")."""
    if kind == "sqlite":
        database = Database(f"sqlite:///{tmp_path / 'fhirbridge.db'}")
        database.create_schema()
        yield database
        database.dispose()
        return
    base_url = os.environ.get(PG_ENV)
    if not base_url:
        pytest.skip(PG_SKIP_REASON)
    schema = f"t_{uuid.uuid4().hex}"
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base_url else "?"
    database = Database(f"{base_url}{sep}options=-csearch_path%3D{schema}")
    try:
        database.create_schema()
        yield database
    finally:
        database.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
