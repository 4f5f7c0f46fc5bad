"""Benchmark: sustained ADT^A08 throughput into the running service (`fhirbridge serve`),
`AA` only after the patient index commit, on SQLite and on PostgreSQL, over 1 and 4 MLLP
connections; beside it, the transport's limit (python-hl7's listener, ACK only).

    .venv/bin/python bench/adt_throughput.py [--seconds 5] [--postgres URL] [--repeat 3]

PostgreSQL defaults to $FHIRBRIDGE_TEST_POSTGRES_URL (a fresh schema, dropped afterwards).
Beside each rate: the service process's CPU time per message (user+system, from /proc), which
a busy machine disturbs much less than the rate. With --repeat N each figure is the median of
N runs (min–max after it). Prints figures; not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from mllp_transport import (  # noqa: E402
    _serve_python_hl7,
    a08_message,
    mllp_load,
    run_mllp_load,
    small_a08_message,
)

from tests.support.service import FhirbridgeService  # noqa: E402


def fresh_pg_schema(url: str) -> tuple[str, str]:
    """A new schema on `url`: (URL whose search_path is that schema, schema name)."""
    import uuid

    from sqlalchemy import create_engine, text

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    eng = create_engine(url)
    with eng.begin() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    eng.dispose()
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}", schema


def drop_pg_schema(url: str, schema: str) -> None:
    from sqlalchemy import create_engine, text

    eng = create_engine(url)
    with eng.begin() as c:
        c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    eng.dispose()


def cpu_seconds(pid: int) -> float | None:
    """user + system CPU time of a process (Linux /proc), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def measure(port: int, conns: int, seconds: float, make: Callable[[int], str],
            pid: int | None, repeat: int) -> str:
    rates: list[float] = []
    cpus: list[float] = []
    for _ in range(repeat):
        c0 = cpu_seconds(pid) if pid else None
        result = asyncio.run(mllp_load("127.0.0.1", port, conns, seconds=seconds,
                                       make_message=make))
        c1 = cpu_seconds(pid) if pid else None
        if result.not_aa:
            raise RuntimeError(f"{result.not_aa} of {result.messages} messages not AA")
        rates.append(result.rate)
        if c0 is not None and c1 is not None and result.messages:
            cpus.append((c1 - c0) / result.messages * 1e6)
    text = f"{statistics.median(rates):7.0f} msg/s"
    if repeat > 1:
        text += f" ({min(rates):.0f}–{max(rates):.0f})"
    if cpus:
        text += f" | service CPU {statistics.median(cpus):5.0f} µs/msg"
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--postgres", default=os.environ.get("FHIRBRIDGE_TEST_POSTGRES_URL", ""))
    ap.add_argument("--repeat", type=int, default=1, help="runs per figure (median shown)")
    args = ap.parse_args()
    kinds = {"small A08 (~230 B)": small_a08_message, "realistic A08 (~1.3 KB)": a08_message}
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; "
          f"{args.seconds:g} s per run, one message in flight per connection")

    q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    p = mp.Process(target=_serve_python_hl7, args=(q,), daemon=True)
    p.start()
    port = q.get(timeout=10)
    for label, make in kinds.items():
        for conns in (1, 4):
            figure = measure(port, conns, args.seconds, make, p.pid, args.repeat)
            print(f"python-hl7 listener, ACK only | {label} | {conns} conn | {figure}")
    p.terminate()

    backends = {"SQLite": ("", "")}
    if args.postgres:
        backends["PostgreSQL"] = fresh_pg_schema(args.postgres)
    else:
        print("PostgreSQL: not measured (no --postgres / FHIRBRIDGE_TEST_POSTGRES_URL)")
    try:
        for name, (url, _) in backends.items():
            with tempfile.TemporaryDirectory() as tmp:
                svc = FhirbridgeService(Path(tmp), database_url=url, workers=1).start()
                pid = svc.proc.pid if svc.proc is not None else None
                try:
                    run_mllp_load("127.0.0.1", svc.mllp_port, 1, count=200,
                                  make_message=small_a08_message)  # warm-up, creates patients
                    for label, make in kinds.items():
                        for conns in (1, 4):
                            figure = measure(svc.mllp_port, conns, args.seconds, make, pid,
                                             args.repeat)
                            print(f"fhirbridge, {name:10s} AA after commit | {label} | "
                                  f"{conns} conn | {figure}")
                finally:
                    svc.stop()
    finally:
        if "PostgreSQL" in backends:
            drop_pg_schema(args.postgres, backends["PostgreSQL"][1])


if __name__ == "__main__":
    main()
