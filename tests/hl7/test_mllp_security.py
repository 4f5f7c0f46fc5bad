"""MLLP connection security against real sockets: TLS with client certificates from a test CA,
`allowed_peers`, the connection cap and the idle/handshake timeout. Whatever is refused gets
no ACK and never reaches the handler."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fhirbridge.hl7 import AckDecision, MLLPServer, ParsedMessage
from fhirbridge.tls import server_context
from tests.hl7.test_mllp import FS, Loop, adt, frame, msa, read_acks
from tests.support.tls import CertFiles, TestCA


class Received:
    """The handler: keeps every ParsedMessage it is given (event and peer) and accepts it."""

    def __init__(self) -> None:
        self.messages: list[ParsedMessage] = []

    async def __call__(self, parsed: ParsedMessage) -> AckDecision:
        self.messages.append(parsed)
        return AckDecision.accept()


@pytest.fixture(scope="module")
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("mllp-ca"))


@pytest.fixture
def received() -> Received:
    return Received()


class Running:
    """Start MLLPServer on a free loopback port in the background loop; stop at the end."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.servers: list[MLLPServer] = []

    def __call__(self, handler: Received, host: str = "127.0.0.1", **options: object
                 ) -> MLLPServer:
        srv = MLLPServer(handler, **options)  # type: ignore[arg-type]
        self.loop.run(srv.start(host, 0))
        self.servers.append(srv)
        return srv


@pytest.fixture
def start(loop: Loop) -> Iterator[Running]:
    running = Running(loop)
    yield running
    for srv in running.servers:
        loop.run(srv.stop())


def mtls(ca: TestCA) -> ssl.SSLContext:
    """The listener's context: the test CA's server certificate, client certificates from
    the same CA required."""
    return server_context(str(ca.server.cert), str(ca.server.key),
                          client_ca_file=str(ca.ca_file))


def tls_connect(port: int, ctx: ssl.SSLContext, timeout: float = 10) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def client(ca: TestCA, cert: CertFiles | None) -> ssl.SSLContext:
    return ca.client_context(cert)


def nothing_answered(send: bytes, sock: socket.socket) -> bytes:
    """Send (when the connection still allows it) and read to the end: whatever the server
    said back. A reset, a TLS alert or EOF all end the read."""
    got = b""
    try:
        sock.sendall(send)
        while chunk := sock.recv(65536):
            got += chunk
    except (ssl.SSLError, ConnectionError, OSError):
        pass
    return got


# -- TLS with client certificates -------------------------------------------------------------
def test_client_certificate_from_the_ca_gets_aa_and_the_peer_is_named(
        start: Running, received: Received, ca: TestCA) -> None:
    srv = start(received, ssl_context=mtls(ca), idle_timeout=30)
    with tls_connect(srv.port, client(ca, ca.client)) as s:
        assert s.version() in ("TLSv1.2", "TLSv1.3")
        s.sendall(frame(adt("TLS-1", trigger="A04")))
        [ack] = read_acks(s, 1)
        local = s.getsockname()
    assert msa(ack)[:2] == ("AA", "TLS-1")
    [parsed] = received.messages
    assert parsed.event.event_type == "A04"
    # the audit trail can say who sent it: address, port and the certificate's subject CN
    assert parsed.peer == f"127.0.0.1:{local[1]} CN=engine-1"


def test_plain_tcp_to_the_tls_port_gets_no_ack(start: Running, received: Received,
                                                ca: TestCA) -> None:
    srv = start(received, ssl_context=mtls(ca), idle_timeout=30)
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        got = nothing_answered(frame(adt("CLEAR-1")), s)
    assert b"MSA" not in got and FS not in got
    assert time.monotonic() - t0 < 5  # refused at the handshake, not left to time out
    assert received.messages == []


def test_tls_without_a_client_certificate_is_refused(start: Running, received: Received,
                                                     ca: TestCA) -> None:
    srv = start(received, ssl_context=mtls(ca), idle_timeout=30)
    got = b""
    try:
        # TLS 1.3: the client may finish its side before the server checks the certificate;
        # the refusal then arrives as an alert on the first read
        with tls_connect(srv.port, client(ca, None)) as s:
            got = nothing_answered(frame(adt("NOCERT-1")), s)
    except (ssl.SSLError, ConnectionError):
        pass
    assert b"MSA" not in got
    assert received.messages == []


def test_client_certificate_from_another_ca_is_refused(start: Running, received: Received,
                                                       ca: TestCA) -> None:
    srv = start(received, ssl_context=mtls(ca), idle_timeout=30)
    got = b""
    try:
        with tls_connect(srv.port, client(ca, ca.other_client)) as s:
            got = nothing_answered(frame(adt("OTHER-1")), s)
    except (ssl.SSLError, ConnectionError):
        pass
    assert b"MSA" not in got
    assert received.messages == []


def test_without_a_client_ca_any_tls_client_is_served_and_no_cn_is_claimed(
        start: Running, received: Received, ca: TestCA) -> None:
    srv = start(received, idle_timeout=30,
                ssl_context=server_context(str(ca.server.cert), str(ca.server.key)))
    with tls_connect(srv.port, client(ca, None)) as s:
        s.sendall(frame(adt("SERVER-ONLY-1")))
        [ack] = read_acks(s, 1)
    assert msa(ack)[0] == "AA"
    assert "CN=" not in received.messages[0].peer


# -- allowed_peers ------------------------------------------------------------------------------
def test_peer_outside_allowed_peers_is_closed_before_a_byte_is_read(
        start: Running, received: Received, ca: TestCA) -> None:
    srv = start(received, ssl_context=mtls(ca), idle_timeout=30,
                allowed_peers=["10.0.0.0/8", "2001:db8::/32"])
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        assert s.recv(100) == b""  # closed at once: no TLS ServerHello, nothing at all
    assert time.monotonic() - t0 < 2
    # and a certificate from the right CA does not help: no handshake is even started
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with tls_connect(srv.port, client(ca, ca.client)) as s:
            s.sendall(frame(adt("OUTSIDE-1")))
            if not s.recv(100):
                raise ConnectionError("closed")
    assert received.messages == []
    assert srv.refused["peer"] == 2


def test_peer_inside_allowed_peers_is_served_also_through_a_dual_stack_socket(
        start: Running, received: Received) -> None:
    # on "::" a v4 client arrives as ::ffff:127.0.0.1 and must match 127.0.0.0/8
    srv = start(received, host="::", idle_timeout=30, allowed_peers=["127.0.0.0/8", "::1"])
    for address in ("127.0.0.1", "::1"):
        with socket.create_connection((address, srv.port), timeout=10) as s:
            s.sendall(frame(adt(f"INSIDE-{address}")))
            [ack] = read_acks(s, 1)
        assert msa(ack)[0] == "AA"
    assert received.messages[0].peer.startswith("127.0.0.1:")
    assert received.messages[1].peer.startswith("[::1]:")
    assert srv.refused["peer"] == 0


def test_a_bad_allowed_peers_entry_stops_start_up(received: Received) -> None:
    with pytest.raises(ValueError):
        MLLPServer(received, allowed_peers=["10.0.0.0/33"])


# -- connection cap ---------------------------------------------------------------------------
def test_a_connection_beyond_max_connections_is_closed_at_once(
        start: Running, received: Received, ca: TestCA) -> None:
    srv = start(received, ssl_context=mtls(ca), idle_timeout=30, max_connections=2)
    ctx = client(ca, ca.client)
    first, second = tls_connect(srv.port, ctx), tls_connect(srv.port, ctx)
    try:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as third:
            assert third.recv(100) == b""
        assert time.monotonic() - t0 < 2
        assert srv.refused["limit"] == 1
        for i, s in enumerate((first, second)):  # the two admitted ones still work
            s.sendall(frame(adt(f"CAP-{i}")))
            assert msa(read_acks(s, 1)[0])[0] == "AA"
    finally:
        first.close()
        second.close()
    # a closed connection frees its place
    deadline, acks = time.monotonic() + 5, []
    while time.monotonic() < deadline:
        try:
            with tls_connect(srv.port, ctx) as s:
                s.sendall(frame(adt("CAP-AFTER")))
                acks = read_acks(s, 1)
        except (ssl.SSLError, ConnectionError):  # the server has not yet seen the close
            pass
        if acks:
            break
        time.sleep(0.05)
    assert acks and msa(acks[0])[0] == "AA"
    assert [m.header.control_id for m in received.messages] == ["CAP-0", "CAP-1", "CAP-AFTER"]


# -- idle and handshake timeouts --------------------------------------------------------------
def test_idle_timeout_closes_a_silent_tls_connection(start: Running, received: Received,
                                                     ca: TestCA) -> None:
    srv = start(received, ssl_context=mtls(ca), idle_timeout=0.5)
    with tls_connect(srv.port, client(ca, ca.client)) as s:
        t0 = time.monotonic()
        assert nothing_answered(b"", s) == b""
        waited = time.monotonic() - t0
    assert 0.3 < waited < 5


def test_a_client_that_never_handshakes_is_closed_after_the_timeout(
        start: Running, received: Received, ca: TestCA) -> None:
    srv = start(received, ssl_context=mtls(ca), idle_timeout=0.5)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        t0 = time.monotonic()
        assert nothing_answered(b"", s) == b""  # no ClientHello sent: dropped, not kept
        waited = time.monotonic() - t0
    assert 0.3 < waited < 5
    assert received.messages == []


def test_start_up_log_says_whether_tls_is_on(start: Running, received: Received, ca: TestCA,
                                             caplog: pytest.LogCaptureFixture,
                                             tmp_path: Path) -> None:
    caplog.set_level("INFO", logger="fhirbridge.hl7.mllp")
    start(received, ssl_context=mtls(ca))
    start(received)
    lines = [r.getMessage() for r in caplog.records if "MLLP listening" in r.getMessage()]
    assert "TLS on (client certificate required)" in lines[0]
    assert "TLS off" in lines[1]
