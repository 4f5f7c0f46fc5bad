"""Benchmark: sustained ADT^A08 throughput into the running service (`fhirbridge serve`),
`AA` only after the patient index commit, on SQLite and on PostgreSQL, over 1 and 4 MLLP
connections; beside it, the transport's limit (python-hl7's listener, ACK only).

    .venv/bin/python bench/adt_throughput.py [--seconds 5] [--postgres URL]

PostgreSQL defaults to $FHIRBRIDGE_TEST_POSTGRES_URL. Prints figures; not a test.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from mllp_transport import (  # noqa: E402
    _serve_python_hl7,
    a08_message,
    run_mllp_load,
    small_a08_message,
)

from tests.support.service import FhirbridgeService  # noqa: E402


def fresh_pg_schema(url: str) -> str:
    import uuid

    from sqlalchemy import create_engine, text

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    eng = create_engine(url)
    with eng.begin() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    eng.dispose()
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--postgres", default=os.environ.get("FHIRBRIDGE_TEST_POSTGRES_URL", ""))
    args = ap.parse_args()
    kinds = {"small A08 (~230 B)": small_a08_message, "realistic A08 (~1.3 KB)": a08_message}

    q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    p = mp.Process(target=_serve_python_hl7, args=(q,), daemon=True)
    p.start()
    port = q.get(timeout=10)
    for label, make in kinds.items():
        for conns in (1, 4):
            rate = run_mllp_load("127.0.0.1", port, conns, seconds=args.seconds,
                                 make_message=make)
            print(f"python-hl7 listener, ACK only | {label} | {conns} conn | {rate:7.0f} msg/s")
    p.terminate()

    backends = {"SQLite": ""}
    if args.postgres:
        backends["PostgreSQL"] = fresh_pg_schema(args.postgres)
    else:
        print("PostgreSQL: not measured (no --postgres / FHIRBRIDGE_TEST_POSTGRES_URL)")
    for name, url in backends.items():
        with tempfile.TemporaryDirectory() as tmp:
            svc = FhirbridgeService(Path(tmp), database_url=url, workers=1).start()
            try:
                run_mllp_load("127.0.0.1", svc.mllp_port, 1, count=200,
                              make_message=small_a08_message)  # warm-up, creates patients
                for label, make in kinds.items():
                    for conns in (1, 4):
                        rate = run_mllp_load("127.0.0.1", svc.mllp_port, conns,
                                             seconds=args.seconds, make_message=make)
                        print(f"fhirbridge, {name:10s} AA after commit | {label} | {conns} conn "
                              f"| {rate:7.0f} msg/s")
            finally:
                svc.stop()


if __name__ == "__main__":
    main()
