"""Audit records forwarded as RFC 5424 syslog to a real collector socket on loopback: RFC 5425
TLS with octet-counting framing, plain TCP and UDP; a dead or slow collector never blocks."""

from __future__ import annotations

import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fhirbridge.adapters.syslog import SyslogForwarder, format_message
from fhirbridge.audit import Agent, Entity, rest_event
from tests.support.tls import TestCA

# RFC 5424 6: <PRI>VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP SD SP MSG
HEADER = re.compile(rb"^<(\d{1,3})>1 (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?Z) (\S{1,255}) "
                    rb"(\S{1,48}) (\S{1,128}) (\S{1,32}) (-) \xef\xbb\xbf(.*)$", re.S)


def event(status: int = 201) -> dict:
    return rest_event(interaction="create", status=status, agent=Agent("nurse-7"),
                      entities=[Entity("object", reference="Media/1")],
                      source_id="fb-test").resource


class Collector:
    """A syslog collector on loopback: TLS (RFC 5425) or TCP, octet-counting frames."""

    def __init__(self, context: ssl.SSLContext | None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.context = context
        self.frames: list[bytes] = []
        self.peers_cn: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.context is not None:
                try:
                    conn = self.context.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError):
                    conn.close()
                    continue
                cert = conn.getpeercert()
                if cert:
                    self.peers_cn.append(dict(x[0] for x in cert["subject"])["commonName"])
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        buf = b""
        while True:
            try:
                chunk = conn.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b" " in buf:  # MSG-LEN SP SYSLOG-MSG (RFC 5425 4.3)
                length, rest = buf.split(b" ", 1)
                assert length.isdigit(), buf[:40]
                if len(rest) < int(length):
                    break
                self.frames.append(rest[:int(length)])
                buf = rest[int(length):]

    def wait(self, n: int, timeout: float = 10.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.frames) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.frames

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("syslog-ca"))


@pytest.fixture
def tls_collector(ca: TestCA) -> Iterator[Collector]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca.ca_file))
    ctx.load_cert_chain(str(ca.server.cert), str(ca.server.key))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    c = Collector(ctx)
    yield c
    c.close()


def check(frame: bytes, outcome_pri: int) -> dict:
    m = HEADER.match(frame)
    assert m, frame[:120]
    assert int(m.group(1)) == outcome_pri
    assert m.group(4) == b"fb-test" and m.group(6) == b"IHE+FHIR"
    return json.loads(m.group(8))


def test_tls_collector_gets_one_framed_rfc5424_message_per_event(ca: TestCA,
                                                                 tls_collector: Collector
                                                                 ) -> None:
    fwd = SyslogForwarder(f"tls://127.0.0.1:{tls_collector.port}", app_name="fb-test",
                          ca_file=str(ca.ca_file), cert_file=str(ca.client.cert),
                          key_file=str(ca.client.key))
    sent = [event(201), event(403), event(500)]
    for r in sent:
        fwd.send(r)
    frames = tls_collector.wait(3)
    fwd.close()
    assert len(frames) == 3
    # facility 10 (authpriv): notice for success, warning for 4xx, error for 5xx
    got = [check(f, pri) for f, pri in zip(frames, (85, 84, 83))]
    assert [g["id"] for g in got] == [r["id"] for r in sent]
    assert got[0]["resourceType"] == "AuditEvent"
    assert tls_collector.peers_cn == ["engine-1"]  # our client certificate was presented


def test_tls_refuses_a_collector_the_ca_did_not_sign(ca: TestCA) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(ca.other_server.cert), str(ca.other_server.key))
    impostor = Collector(ctx)
    fwd = SyslogForwarder(f"tls://127.0.0.1:{impostor.port}", app_name="fb-test",
                          ca_file=str(ca.ca_file))
    try:
        fwd.send(event())
        time.sleep(0.5)
        assert impostor.frames == [] and fwd.sent == 0
    finally:
        fwd.close(timeout=0.5)
        impostor.close()


def test_tcp_and_udp() -> None:
    tcp = Collector(None)
    fwd = SyslogForwarder(f"tcp://127.0.0.1:{tcp.port}", app_name="fb-test")
    fwd.send(event())
    assert len(tcp.wait(1)) == 1
    check(tcp.frames[0], 85)
    fwd.close()
    tcp.close()

    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(5)
    fwd = SyslogForwarder(f"udp://127.0.0.1:{udp.getsockname()[1]}", app_name="fb-test")
    fwd.send(event(404))
    datagram = udp.recv(65536)  # RFC 5426: one message per datagram, no length prefix
    check(datagram, 84)
    fwd.close()
    udp.close()


def test_an_unreachable_collector_never_blocks_and_a_full_queue_drops(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fwd = SyslogForwarder(f"tcp://127.0.0.1:{port}", app_name="fb-test", max_queue=10)
    started = time.monotonic()
    for _ in range(100):
        fwd.send(event())
    assert time.monotonic() - started < 0.5
    assert fwd.dropped >= 89 and fwd.sent == 0
    fwd.close(timeout=0.2)


def test_header_fields_are_printable_ascii() -> None:
    msg = format_message(event(), app_name="fhir bridge ü", hostname="host name", procid=42)
    m = HEADER.match(msg)
    assert m and m.group(3) == b"hostname" and m.group(4) == b"fhirbridge"


def test_bad_url_is_refused() -> None:
    with pytest.raises(ValueError):
        SyslogForwarder("http://collector:514", app_name="x")
