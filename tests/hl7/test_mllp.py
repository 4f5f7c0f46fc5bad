"""The MLLP listener against real clients: python-hl7's `mllp_send` command, its asyncio
client, and raw sockets for what well-behaved clients never send."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import hl7
import pytest
from hl7.mllp import open_hl7_connection

from fhirbridge.hl7 import AckDecision, Event, MLLPServer, ParsedMessage, PatientUpsert

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "adt"
MLLP_SEND = Path(sys.executable).parent / "mllp_send"
VT, FS, CR = b"\x0b", b"\x1c", b"\r"
PHI = (b"M\xc3\xbcller", b"Jos\xc3\xa9", b"MRN", b"19840307", b"Dupont")


def frame(raw: bytes) -> bytes:
    return VT + raw + FS + CR


def adt(control_id: str, mrn: str = "MRN1", trigger: str = "A08", version: str = "2.5.1",
        msg_type: str = "ADT") -> bytes:
    return (f"MSH|^~\\&|ADT|HOSP|FHIRBRIDGE|HOSP|20261120100000||{msg_type}^{trigger}|"
            f"{control_id}|P|{version}\rEVN|{trigger}|20261120095900\r"
            f"PID|1||{mrn}^^^HOSP^MR||Müller^José||19840307|M\r").encode()


class Loop:
    """An asyncio loop in a background thread (the service runs the listener the same way)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[object], timeout: float = 10) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Recorder:
    """The handler: records events in memory; `behaviour` decides the answer."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.behaviour: Callable[[ParsedMessage], Awaitable[AckDecision]] | None = None

    async def __call__(self, parsed: ParsedMessage) -> AckDecision:
        if self.behaviour is not None:
            decision = await self.behaviour(parsed)
        else:
            decision = AckDecision.accept()
        self.events.append(parsed.event)
        return decision


@pytest.fixture(scope="module")
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.close()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def server(loop: Loop, recorder: Recorder) -> Iterator[MLLPServer]:
    srv = MLLPServer(recorder, idle_timeout=30)
    loop.run(srv.start("127.0.0.1", 0))
    yield srv
    loop.run(srv.stop())


def read_acks(sock: socket.socket, n: int) -> list[bytes]:
    """Read n framed answers (fewer if the server closes first)."""
    buf, acks = b"", list[bytes]()
    while len(acks) < n:
        while FS in buf and len(acks) < n:
            start = buf.index(VT)
            end = buf.index(FS)
            acks.append(buf[start + 1:end])
            buf = buf[end + 2:]
        if len(acks) >= n:
            break
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return acks


def exchange(port: int, payload: bytes, n: int) -> list[bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        return read_acks(s, n)


def msa(ack: bytes, encoding: str = "utf-8") -> tuple[str, str, str]:
    m = hl7.parse(ack.decode(encoding))
    seg = m.segment("MSA")
    return str(seg(1)), str(seg(2)), str(seg(3)) if len(seg) > 3 else ""


def err_code(ack: bytes) -> str:
    return str(hl7.parse(ack.decode())["ERR.3.1.1"])


# -- the independent client ------------------------------------------------------------------
def test_mllp_send_all_samples(server: MLLPServer, recorder: Recorder, tmp_path: Path) -> None:
    names = ["a01.hl7", "a08.hl7", "a28.hl7", "a31.hl7", "a40.hl7", "a47.hl7"]
    batch = tmp_path / "batch.hl7"
    batch.write_bytes(b"\n".join((SAMPLES / n).read_bytes() for n in names))
    out = subprocess.run([str(MLLP_SEND), "--loose", "-f", str(batch), "-p", str(server.port),
                          "127.0.0.1"], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    # a01.hl7 asks for enhanced mode (MSH-15 AL): its accept ACK is CA (v2.5.1 §2.9.3)
    assert out.stdout.count(b"MSA|AA|") == len(names) - 1, out.stdout  # exit 0 even on AE
    assert out.stdout.count(b"MSA|CA|ADT-A01-0001") == 1, out.stdout
    assert [e.event_type for e in recorder.events] == [
        "A01", "A08", "A28", "A31", "A40", "A47"]
    a28 = recorder.events[2]
    assert isinstance(a28, PatientUpsert) and a28.patient.names[1].family == "山田"


def test_mllp_send_latin1_answered_in_latin1(server: MLLPServer, recorder: Recorder) -> None:
    out = subprocess.run([str(MLLP_SEND), "--loose", "-f", str(SAMPLES / "a08-latin1.hl7"),
                          "-p", str(server.port), "127.0.0.1"], capture_output=True, timeout=30)
    assert b"MSA|AA|ADT-A08-L1-0003" in out.stdout and b"|8859/1\r" in out.stdout
    ev = recorder.events[0]
    assert isinstance(ev, PatientUpsert) and ev.patient.names[0].family == "Brontë"


# -- python-hl7's asyncio client --------------------------------------------------------------
def test_python_hl7_asyncio_client_pipelined_in_order(server: MLLPServer,
                                                     recorder: Recorder) -> None:
    async def client() -> list[str]:
        reader, writer = await open_hl7_connection("127.0.0.1", server.port, encoding="utf-8")
        for i in range(20):
            writer.writemessage(hl7.parse(adt(f"P{i}", mrn=f"MRN{i}").decode()))
        await writer.drain()
        acks = [await reader.readmessage() for _ in range(20)]
        writer.close()
        await writer.wait_closed()
        return [f"{a['MSA.1']}:{a['MSA.2']}" for a in acks]

    acks = asyncio.run(client())
    assert acks == [f"AA:P{i}" for i in range(20)]
    assert [e.message_control_id for e in recorder.events] == [
        f"P{i}" for i in range(20)]


# -- behaviour --------------------------------------------------------------------------------
def test_aa_only_after_the_handler_returns(server: MLLPServer, recorder: Recorder,
                                           loop: Loop) -> None:
    release = threading.Event()

    async def slow(parsed: ParsedMessage) -> AckDecision:
        while not release.is_set():
            await asyncio.sleep(0.01)
        return AckDecision.accept()

    recorder.behaviour = slow
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(frame(adt("SLOW1")))
        s.settimeout(0.3)
        with pytest.raises(socket.timeout):
            s.recv(1024)  # nothing while the handler has not returned
        assert recorder.events == []
        release.set()
        s.settimeout(5)
        (ack,) = read_acks(s, 1)
    assert msa(ack)[:2] == ("AA", "SLOW1") and len(recorder.events) == 1


def test_handler_error_is_ae_207_without_phi(server: MLLPServer, recorder: Recorder,
                                             caplog: pytest.LogCaptureFixture) -> None:
    async def boom(parsed: ParsedMessage) -> AckDecision:
        if parsed.header.control_id == "BOOM":
            raise RuntimeError("database said no for Müller MRN1 19840307")
        return AckDecision.accept()

    recorder.behaviour = boom
    with caplog.at_level("DEBUG", logger="fhirbridge"):
        acks = exchange(server.port, frame(adt("BOOM")) + frame(adt("NEXT")), 2)
    assert msa(acks[0])[:2] == ("AE", "BOOM") and err_code(acks[0]) == "207"
    assert msa(acks[1])[:2] == ("AA", "NEXT")  # the connection keeps serving
    for phi in PHI:
        assert phi not in acks[0]
    assert "RuntimeError" in caplog.text and "Müller" not in caplog.text
    assert "MRN1" not in caplog.text


def test_handler_ae_with_text(server: MLLPServer, recorder: Recorder) -> None:
    async def ae(parsed: ParsedMessage) -> AckDecision:
        return AckDecision.error("PID-3 has no identifier in a configured domain", "204")

    recorder.behaviour = ae
    (ack,) = exchange(server.port, frame(adt("AE1")), 1)
    assert msa(ack) == ("AE", "AE1", "PID-3 has no identifier in a configured domain")
    assert err_code(ack) == "204"


def test_repeated_control_id_is_handed_over_twice(server: MLLPServer,
                                                  recorder: Recorder) -> None:
    acks = exchange(server.port, frame(adt("DUP")) * 2, 2)  # dedup is the store's job
    assert [msa(a)[:2] for a in acks] == [("AA", "DUP")] * 2
    assert recorder.events[0] == recorder.events[1]


@pytest.mark.parametrize("raw,code", [
    (adt("ORU1", msg_type="ORU", trigger="R01"), "200"),
    (adt("V99", version="9.9"), "203"),
    (adt("ENC").replace(b"^~\\&", b"^~", 1), "102"),
    (b"PID|1||MRN1^^^HOSP^MR||M\xc3\xbcller\r", "100"),
    (bytes(range(256)).replace(VT, b"").replace(FS, b"") * 4, "100"),
])
def test_parse_errors_are_ar_without_calling_the_handler(server: MLLPServer,
                                                         recorder: Recorder, raw: bytes,
                                                         code: str) -> None:
    acks = exchange(server.port, frame(raw) + frame(adt("AFTER")), 2)
    assert msa(acks[0])[0] == "AR" and err_code(acks[0]) == code
    for phi in PHI:
        assert phi not in acks[0]
    assert msa(acks[1])[:2] == ("AA", "AFTER")
    assert [e.message_control_id for e in recorder.events] == ["AFTER"]


def test_bytes_outside_frames_are_discarded(server: MLLPServer, recorder: Recorder) -> None:
    payload = (b"noise\r\n" + frame(adt("G1")) + b"\x00\x01junk" + frame(adt("G2"))
               + VT + adt("ABANDONED")[:50]  # restarted by the next <VT>
               + VT + adt("G3") + FS)  # last one without the trailing <CR>
    acks = exchange(server.port, payload, 3)
    assert [msa(a)[:2] for a in acks] == [("AA", "G1"), ("AA", "G2"), ("AA", "G3")]
    assert [e.message_control_id for e in recorder.events] == [
        "G1", "G2", "G3"]


def test_truncated_frame_at_eof_is_dropped(server: MLLPServer, recorder: Recorder) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(VT + adt("CUT")[:60])
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1024) == b""  # closed cleanly, no answer to a frame never completed
    (ack,) = exchange(server.port, frame(adt("NEW")), 1)  # a new connection is served
    assert msa(ack)[:2] == ("AA", "NEW")
    assert [e.message_control_id for e in recorder.events] == ["NEW"]


def test_ten_megabyte_message_is_ar_then_closed(server: MLLPServer,
                                               recorder: Recorder) -> None:
    big = adt("BIG") + b"NTE|1||" + b"x" * (10 * 1024 * 1024) + b"\r"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as other:
        other.sendall(frame(adt("OTHER1")))
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            sender = threading.Thread(target=lambda: _sendall_quietly(s, frame(big)))
            sender.start()
            acks = read_acks(s, 2)
            sender.join(10)
        assert len(acks) == 1  # one AR, then the server closed that connection
        code, control_id, text = msa(acks[0])
        assert (code, control_id) == ("AR", "BIG") and "larger than" in text
        # the other connection is unaffected
        other.sendall(frame(adt("OTHER2")))
        assert [msa(a)[:2] for a in read_acks(other, 2)] == [("AA", "OTHER1"), ("AA", "OTHER2")]
    (ack,) = exchange(server.port, frame(adt("AFTERBIG")), 1)
    assert msa(ack)[:2] == ("AA", "AFTERBIG")
    assert "BIG" not in [e.message_control_id for e in recorder.events]


def _sendall_quietly(s: socket.socket, data: bytes) -> None:
    try:
        s.sendall(data)
    except OSError:
        pass


def test_many_connections_concurrently(server: MLLPServer, recorder: Recorder) -> None:
    results: dict[int, list[tuple[str, str]]] = {}

    def client(n: int) -> None:
        payload = b"".join(frame(adt(f"C{n}-{i}", mrn=f"MRN{n}")) for i in range(10))
        results[n] = [msa(a)[:2] for a in exchange(server.port, payload, 10)]

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    for n in range(8):
        assert results[n] == [("AA", f"C{n}-{i}") for i in range(10)]
    assert len(recorder.events) == 80
    per_conn = [[e.message_control_id for e in recorder.events
                 if e.message_control_id.startswith(f"C{n}-")] for n in range(8)]
    assert per_conn == [[f"C{n}-{i}" for i in range(10)] for n in range(8)]  # in order


def test_idle_timeout_and_stop(loop: Loop, recorder: Recorder) -> None:
    srv = MLLPServer(recorder, idle_timeout=0.3, max_message_bytes=1000)
    loop.run(srv.start("127.0.0.1", 0))
    assert srv.port > 0
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            t0 = time.monotonic()
            assert s.recv(1024) == b""  # closed by the server when idle
            assert time.monotonic() - t0 < 3
        # a configurable limit: 1000 bytes
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(frame(adt("L1") + b"NTE|1||" + b"y" * 2000 + b"\r"))
            acks = read_acks(s, 2)
        assert len(acks) == 1 and msa(acks[0])[:2] == ("AR", "L1")
        held = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        held.sendall(frame(adt("HELD")))
        assert msa(read_acks(held, 1)[0])[:2] == ("AA", "HELD")
    finally:
        loop.run(srv.stop())
    assert held.recv(1024) == b""  # stop() closes open connections
    held.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=1).close()
