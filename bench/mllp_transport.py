"""Benchmark: sustained ADT^A08 throughput over MLLP (HL7 v2.5.1 Appendix C), one message in
flight per connection, over 1 and 4 connections.

Servers, each in its own process so client and server do not share a GIL:
  (a) fhirbridge's MLLPServer with a no-op handler (full decode + ADT parse + ACK);
  (b) python-hl7's own asyncio listener (`hl7.mllp.start_hl7_server`) that ACKs without storing
      anything — the transport's limit.
Client: python-hl7's asyncio `open_hl7_connection`, encoding utf-8 on both ends.

    .venv/bin/python bench/mllp_transport.py [--seconds 5] [--connections 1,4]
    .venv/bin/python bench/mllp_transport.py --target 127.0.0.1:2575   # a running service

`run_mllp_load(host, port, connections, seconds=…|count=…)` is reusable against the full
service (handler committing to the database): every message has a unique MSH-10.
This prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hl7  # noqa: E402
from hl7.mllp import open_hl7_connection, start_hl7_server  # noqa: E402

_run_id = f"{os.getpid()}{int(time.time()) % 100000}"
_seq = itertools.count(1)


def a08_message(n: int) -> str:
    """A realistic ADT^A08 (~1.3 KB: PID, PD1, NK1, PV1, PV2, OBX, AL1, DG1, IN1) with a unique
    control id; patients cycle over 1,000 MRNs."""
    cid = f"B{_run_id}-{n}"
    k = n % 1000
    return (
        "MSH|^~\\&|ADT|HOSP|FHIRBRIDGE|HOSP|20261120100000+0100||ADT^A08^ADT_A01|"
        f"{cid}|P|2.5.1|||AL|NE||UNICODE UTF-8\r"
        "EVN|A08|20261120095900+0100|||USR123^Schmidt^Anna^^^^^^HOSP\r"
        f"PID|1||BENCH{k:04d}^^^HOSP^MR~N{k:06d}^^^REGION&2.16.840.1.113883.3.999&ISO^PI||"
        "Müller^José^Antonio^^Dr^^L~Mueller^Jose^^^^^A||19840307|M||2106-3^White^HL70005|"
        "Hauptstraße 1^Apt 4^Köln^NW^50667^DE^H||^PRN^PH^^49^221^5551234~^NET^Internet^"
        "jose@example.org|^WPN^PH^^49^221^5559876|de^German^ISO639|M^Married^HL70002|"
        "CAT^Catholic^HL70006|ACC{k:06d}^^^HOSP^AN||||N^Not Hispanic^HL70189||||||||N\r"
        "PD1|||Praxis Dr. Weber^^12345|98765^Weber^Klaus^^^Dr^^^HOSP\r"
        "NK1|1|Müller^Maria^^^^^L|SPO^Spouse^HL70063|Hauptstraße 1^^Köln^^50667^DE|"
        "^PRN^PH^^49^221^5551235\r"
        "PV1|1|I|WARD1^101^1^HOSP^^^^N||||12345^Becker^Lena^^^Dr^^^HOSP|||MED||||7|||"
        f"12345^Becker^Lena^^^Dr^^^HOSP|IP|V{k:08d}^^^HOSP^VN|K||||||||||||||||||HOSP|||||"
        "20261119080000+0100\r"
        "PV2|||R51^Headache^I10||||||20261125\r"
        "OBX|1|NM|8302-2^Body height^LN||180|cm^cm^UCUM|||||F\r"
        "OBX|2|NM|29463-7^Body weight^LN||82|kg^kg^UCUM|||||F\r"
        "AL1|1|DA|70618^Penicillin^RXNORM|SV|Hives\r"
        "DG1|1||R51^Headache^I10||20261119|A\r"
        "IN1|1|AOK^AOK Rheinland^HL70072|108310400|AOK Rheinland|Postfach 1^^Köln^^50000^DE"
        "||||||||||Müller^José|SEL^Self^HL70063|19840307|Hauptstraße 1^^Köln^^50667^DE\r"
    )


def small_a08_message(n: int) -> str:
    """A minimal ADT^A08 (~230 bytes: MSH, EVN, PID, PV1) with a unique control id."""
    return ("MSH|^~\\&|ADT|HOSP|FHIRBRIDGE|HOSP|20261120080000||ADT^A08^ADT_A01|"
            f"S{_run_id}-{n}|P|2.5.1||||||UNICODE UTF-8\rEVN|A08|20261120080000\r"
            f"PID|1||MRN{n % 1000:05d}^^^HOSP^MR||Müller^José||19840307|M\rPV1|1|O\r")


MESSAGES = {"realistic": a08_message, "small": small_a08_message}


@dataclass
class LoadResult:
    messages: int
    seconds: float
    not_aa: int

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0


async def mllp_load(host: str, port: int, connections: int = 1, *,
                    seconds: float | None = None, count: int | None = None,
                    make_message: Callable[[int], str] = a08_message,
                    encoding: str = "utf-8") -> LoadResult:
    """Send ADT over `connections` MLLP connections, one in flight on each, for `seconds` or
    until `count` messages in total were acknowledged."""
    if (seconds is None) == (count is None):
        raise ValueError("give seconds or count")
    budget = itertools.count() if count is not None else None
    stop_at = time.perf_counter() + seconds if seconds is not None else None
    done = 0
    not_aa = 0

    async def one() -> None:
        nonlocal done, not_aa
        reader, writer = await open_hl7_connection(host, port, encoding=encoding)
        try:
            while True:
                if budget is not None and next(budget) >= count:  # type: ignore[operator]
                    break
                if stop_at is not None and time.perf_counter() >= stop_at:
                    break
                # writeblock: the message text is already HL7; parsing it on the client
                # (writemessage needs an hl7.Message) would make the client the bottleneck
                writer.writeblock(make_message(next(_seq)).encode(encoding))
                await writer.drain()
                ack = await reader.readmessage()
                # the realistic A08 asks for enhanced mode (MSH-15 AL): its accept ACK is CA
                if ack.segment("MSA")(1)[0] not in ("AA", "CA"):
                    not_aa += 1
                done += 1
        finally:
            writer.close()
            await writer.wait_closed()

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(connections)))
    return LoadResult(done, time.perf_counter() - t0, not_aa)


def run_mllp_load(host: str, port: int, connections: int = 1, *, seconds: float | None = None,
                  count: int | None = None, make_message: Callable[[int], str] = a08_message
                  ) -> float:
    """Messages per second (acknowledged) — see `mllp_load`. Raises if any ACK was not AA."""
    result = asyncio.run(mllp_load(host, port, connections, seconds=seconds, count=count,
                                   make_message=make_message))
    if result.not_aa:
        raise RuntimeError(f"{result.not_aa} of {result.messages} messages not acknowledged AA")
    return result.rate


# -- servers (each in a child process) -------------------------------------------------------
def _serve_fhirbridge(port_q: mp.Queue) -> None:  # type: ignore[type-arg]
    from fhirbridge.hl7 import AckDecision, MLLPServer, ParsedMessage

    async def noop(parsed: ParsedMessage) -> AckDecision:
        return AckDecision.accept()

    async def main() -> None:
        server = MLLPServer(noop)
        await server.start("127.0.0.1", 0)
        port_q.put(server.port)
        await asyncio.Event().wait()

    asyncio.run(main())


def _serve_python_hl7(port_q: mp.Queue) -> None:  # type: ignore[type-arg]
    import warnings

    warnings.simplefilter("ignore", DeprecationWarning)  # create_ack's utcnow() on 3.12+

    async def on_connection(reader, writer) -> None:  # type: ignore[no-untyped-def]
        try:
            while True:
                message = await reader.readmessage()
                writer.writemessage(message.create_ack())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await start_hl7_server(on_connection, "127.0.0.1", 0, encoding="utf-8")
        port_q.put(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


SERVERS = {
    "fhirbridge MLLPServer, no-op handler": _serve_fhirbridge,
    "python-hl7 start_hl7_server, ACK only": _serve_python_hl7,
}


def parse_rate(make_message: Callable[[int], str], seconds: float = 2.0) -> float:
    """In-process parse_adt + ACK build rate (one core), for context."""
    from fhirbridge.hl7 import AckDecision, parse_adt
    from fhirbridge.hl7.ack import ack_bytes

    raws = [make_message(i).encode() for i in range(1000)]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        parsed = parse_adt(raws[n % 1000])
        ack_bytes(parsed.header, AckDecision.accept())
        n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    ap.add_argument("--connections", default="1,4")
    ap.add_argument("--messages", default="realistic,small", help="realistic and/or small")
    ap.add_argument("--target", help="host:port of a running listener (skips the servers)")
    args = ap.parse_args()
    conns = [int(c) for c in args.connections.split(",")]
    kinds = args.messages.split(",")
    print(f"python {sys.version.split()[0]}, python-hl7 {hl7.__version__}, "
          f"{os.cpu_count()} CPUs; {args.seconds:g} s per figure, one message in flight per "
          "connection; each server in its own process")
    if args.target:
        host, port = args.target.rsplit(":", 1)
        for kind in kinds:
            for c in conns:
                rate = run_mllp_load(host, int(port), c, seconds=args.seconds,
                                     make_message=MESSAGES[kind])
                print(f"{args.target} {kind:9s} {c} conn: {rate:8.0f} msg/s")
        return
    for kind in kinds:
        size = len(MESSAGES[kind](0).encode())
        print(f"\n{kind} ADT^A08 ({size} bytes); parse_adt + ACK in-process: "
              f"{parse_rate(MESSAGES[kind]):.0f} msg/s")
        ctx = mp.get_context("spawn")
        for name, target in SERVERS.items():
            q: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
            proc = ctx.Process(target=target, args=(q,), daemon=True)
            proc.start()
            try:
                port = q.get(timeout=30)
                run_mllp_load("127.0.0.1", port, 1, count=200, make_message=MESSAGES[kind])
                for c in conns:
                    rate = run_mllp_load("127.0.0.1", port, c, seconds=args.seconds,
                                         make_message=MESSAGES[kind])
                    print(f"  {name:40s} {c} conn: {rate:8.0f} msg/s")
            finally:
                proc.kill()
                proc.join(5)


if __name__ == "__main__":
    main()
