"""The MLLP listener (asyncio): frames in, one ACK out per frame (when one is due), in order.

Follows HL7 v2.5.1 Appendix C (lower layer protocols), §C.4 MLLP: a message is framed as
<VT> message <FS><CR>; bytes outside a frame are discarded. Acknowledgment follows Chapter 2
§2.9.2 (original mode): AR for what cannot be parsed or is not accepted, AE for content errors,
without calling the application; AA only after the application's handler has returned (it has
committed). Enhanced mode (§2.9.3, MSH-15/16 present): CA/CE/CR as MSH-15 asks (`reply_code`).

Connection security (the lower layer is TCP, or TLS 1.2+ when a server context is given): a
peer outside `allowed_peers`, or beyond `max_connections`, is closed right after accept,
before a byte is read and before any TLS handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable

from fhirbridge.hl7.ack import (
    ACCEPT,
    ERROR,
    REJECT,
    AckDecision,
    ack_bytes,
    rejection_ack,
    reply_code,
)
from fhirbridge.hl7.adt import ParsedMessage, parse_adt
from fhirbridge.hl7.message import (
    APPLICATION_INTERNAL_ERROR,
    MessageHeader,
    MessageRejected,
    decode_message,
)
from fhirbridge.tls import peer_subject_cn

log = logging.getLogger("fhirbridge.hl7.mllp")

VT, FS, CR = b"\x0b", b"\x1c", b"\x0d"
Handler = Callable[[ParsedMessage], Awaitable[AckDecision]]
Parser = Callable[[bytes], ParsedMessage]
READ_CHUNK = 64 * 1024
HANDSHAKE_TIMEOUT = 60.0  # TLS handshake limit when there is no idle timeout (asyncio's default)
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
GENERIC_ERROR_TEXT = "the message could not be applied; the receiver logged the cause"


class MLLPServer:
    """An asyncio MLLP server. Many connections, many messages per connection; on each
    connection frames are handled strictly one after the other.

    `handler(parsed)` is awaited for every message that parses; it returns AA, or AE (AR) with
    a PHI-free text. An exception from it becomes AE with error code 207 and a generic text.
    A frame longer than `max_message_bytes` is answered AR (error code 207) and that
    connection is closed; other connections are not affected. A connection silent for
    `idle_timeout` seconds is closed; an incomplete frame at EOF is dropped.
    `on_ack(code)` is called after each ACK is written (for metrics); `on_stop()` is called
    (in a thread) by `stop()` once every connection has ended, e.g. to stop the handler's
    writer thread.

    Security: with `ssl_context` (see `fhirbridge.tls.server_context`) the port speaks TLS
    only; a client that has not completed the handshake within `idle_timeout` is dropped.
    `allowed_peers` (CIDRs, IPv4 and IPv6; empty = any) and `max_connections` are checked on
    the accepted socket before anything is read from it; refusals are counted in `refused`
    ("peer" / "limit") and reported to `on_refused(reason)`. Each parsed message reaches the
    handler with `peer` set ("ip:port", plus " CN=…" of a verified client certificate).
    """

    def __init__(self, handler: Handler, *, max_message_bytes: int = 1024 * 1024,
                 idle_timeout: float | None = 600.0, application: str = "FHIRBRIDGE",
                 facility: str = "", parser: Parser = parse_adt,
                 on_ack: Callable[[str], None] | None = None,
                 on_stop: Callable[[], None] | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 allowed_peers: Iterable[str] = (), max_connections: int | None = None,
                 on_refused: Callable[[str], None] | None = None) -> None:
        self.handler = handler
        self.max_message_bytes = max_message_bytes
        self.idle_timeout = idle_timeout
        self.application = application
        self.facility = facility
        self.parser = parser
        self.on_ack = on_ack
        self.on_stop = on_stop
        self.ssl_context = ssl_context
        # strict=False: "10.1.2.3/8" means 10.0.0.0/8; a bad entry raises ValueError at start-up
        self.allowed_peers: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(cidr.strip(), strict=False) for cidr in allowed_peers)
        if max_connections is not None and max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_connections = max_connections
        self.on_refused = on_refused
        self.refused: Counter[str] = Counter()
        self._sockets: list[socket.socket] = []
        self._acceptors: list[asyncio.Task[None]] = []
        self._started = False
        self._connections: set[asyncio.Task[None]] = set()
        self._port = 0

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 2575) -> None:
        """Listen on host:port (port 0 picks a free port; see `port`).

        Sockets are accepted here rather than by `asyncio.start_server(ssl=…)`, which runs
        the TLS handshake before any callback could look at the peer: an address outside
        `allowed_peers` must be closed before it can make us read or handshake anything.
        Admitted sockets are then wrapped with `loop.connect_accepted_socket(ssl=…)`."""
        if self._started:
            raise RuntimeError("MLLPServer already started")
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        seen: set[tuple[int, object]] = set()
        try:
            for family, type_, proto, _canon, address in infos:
                if (family, address) in seen:
                    continue
                seen.add((family, address))
                sock = socket.socket(family, type_, proto)
                self._sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and len(infos) > 1:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address if port or not self._port else (address[0], self._port,
                                                                   *address[2:]))
                sock.listen(128)
                sock.setblocking(False)
                self._port = self._port or int(sock.getsockname()[1])
        except BaseException:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()
            raise
        self._started = True
        self._acceptors = [asyncio.create_task(self._accept(sock), name="mllp-accept")
                           for sock in self._sockets]
        log.info("MLLP listening on %s:%d, TLS %s%s, %s", host, self._port,
                 "on" if self.ssl_context else "off",
                 " (client certificate required)"
                 if self.ssl_context and self.ssl_context.verify_mode == ssl.CERT_REQUIRED
                 else "",
                 f"{len(self.allowed_peers)} allowed peer range(s)" if self.allowed_peers
                 else "any peer")

    @property
    def port(self) -> int:
        return self._port

    async def stop(self) -> None:
        """Stop accepting, close every connection (a message being handled gets no ACK: the
        sender will resend it) and wait for the connection tasks to end."""
        if not self._started:
            return
        self._started = False
        acceptors, self._acceptors = self._acceptors, []
        for t in acceptors:
            t.cancel()
        await asyncio.gather(*acceptors, return_exceptions=True)
        sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()
        tasks = list(self._connections)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.on_stop is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.on_stop)
            except Exception as exc:
                log.warning("MLLP on_stop hook failed: %s", type(exc).__name__)

    async def __aenter__(self) -> MLLPServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- accepting ------------------------------------------------------------------------
    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, address = await loop.sock_accept(listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # e.g. EMFILE: out of file descriptors; try again shortly
                log.warning("MLLP accept failed: %s", type(exc).__name__)
                await asyncio.sleep(0.1)
                continue
            self._admit(sock, address)

    def _admit(self, sock: socket.socket, address: tuple[object, ...]) -> None:
        """Refuse (close at once, nothing read) or start serving one accepted socket. Runs
        synchronously, so the connection count cannot change between check and start."""
        peer = _address_text(address)
        reason = ""
        if self.allowed_peers and not _allowed(address, self.allowed_peers):
            reason = "peer"
            log.warning("MLLP connection from %s refused: address not in mllp.allowed_peers",
                        peer)
        elif self.max_connections is not None and \
                len(self._connections) >= self.max_connections:
            reason = "limit"
            log.warning("MLLP connection from %s refused: %d connections open "
                        "(mllp.max_connections)", peer, len(self._connections))
        if reason:
            self.refused[reason] += 1
            sock.close()
            if self.on_refused is not None:
                try:
                    self.on_refused(reason)
                except Exception as exc:
                    log.warning("on_refused hook failed: %s", type(exc).__name__)
            return
        task = asyncio.get_running_loop().create_task(self._serve(sock, peer))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    # -- one connection -------------------------------------------------------------------
    async def _serve(self, sock: socket.socket, peer: str) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_CHUNK, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            if self.ssl_context is None:
                transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock)
            else:
                # the handshake is bounded like silence: a client that connects and never
                # (or only slowly) handshakes is dropped after the idle timeout
                limit = self.idle_timeout or HANDSHAKE_TIMEOUT
                transport, _ = await asyncio.wait_for(loop.connect_accepted_socket(
                    lambda: protocol, sock, ssl=self.ssl_context,
                    ssl_handshake_timeout=limit), limit + 1)
        except asyncio.CancelledError:
            sock.close()
            return
        except (OSError, TimeoutError, ConnectionError) as exc:
            sock.close()
            log.info("MLLP TLS handshake with %s failed: %s", peer, _tls_reason(exc))
            return
        cn = peer_subject_cn(transport.get_extra_info("peercert"))
        if cn:
            peer = f"{peer} CN={cn}"
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        try:
            await self._connection(reader, writer, peer)
        except asyncio.CancelledError:
            pass
        except (ConnectionError, OSError) as exc:
            log.info("MLLP connection from %s ended: %s", peer, type(exc).__name__)
        except Exception as exc:  # the listener must never crash on one connection
            log.error("MLLP connection from %s failed: %s", peer, type(exc).__name__)
        finally:
            writer.close()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(writer.wait_closed(), 2)

    async def _read(self, reader: asyncio.StreamReader) -> bytes | None:
        """Next chunk; b"" at EOF; None after the idle timeout."""
        if self.idle_timeout is None:
            return await reader.read(READ_CHUNK)
        try:
            return await asyncio.wait_for(reader.read(READ_CHUNK), self.idle_timeout)
        except TimeoutError:
            return None

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter, peer: str = "") -> None:
        buf = bytearray()
        in_frame = False
        while True:
            if not in_frame:
                start = buf.find(VT)
                if start < 0:
                    buf.clear()  # bytes before a <VT> are not part of any message
                else:
                    del buf[:start + 1]
                    in_frame = True
            if in_frame:
                end = buf.find(FS)
                if end >= 0:
                    restart = buf.rfind(VT, 0, end)
                    if restart >= 0:  # a new <VT> inside a frame: the sender started over
                        log.info("MLLP frame restarted by <VT>: the unfinished part dropped")
                        del buf[:restart + 1]
                        end -= restart + 1
                    frame = bytes(buf[:end])
                    del buf[:end + 1]  # the <CR> after <FS>, if any, is skipped as garbage
                    in_frame = False
                    if len(frame) > self.max_message_bytes:
                        await self._oversized(frame, reader, writer, found_end=True)
                        return
                    await self._answer(frame, writer, peer)
                    continue
                if len(buf) > self.max_message_bytes:
                    await self._oversized(bytes(buf[:4096]), reader, writer, found_end=False)
                    return
            chunk = await self._read(reader)
            if chunk is None:
                log.info("MLLP connection from %s idle for %.0f s: closing", peer,
                         self.idle_timeout or 0)
                return
            if not chunk:
                if in_frame and buf.strip():
                    log.warning("MLLP connection closed inside a frame (%d bytes): dropped",
                                len(buf))
                return
            buf += chunk

    async def _answer(self, frame: bytes, writer: asyncio.StreamWriter, peer: str = "") -> None:
        try:
            parsed = self.parser(frame)
            if peer and isinstance(parsed, ParsedMessage):
                parsed = dataclasses.replace(parsed, peer=peer)
        except MessageRejected as exc:
            log.info("MLLP message %s rejected: %s %s", _cid(exc.header), exc.reason_code,
                     exc.text)
            code = reply_code(exc.header, exc.ack_code)
            if code is None:
                self._count(exc.ack_code)  # enhanced mode, MSH-15 asks for no accept ACK
                return
            await self._send(writer, rejection_ack(exc, application=self.application,
                                                   facility=self.facility, ack_code=code), code)
            return
        except Exception as exc:  # a parser bug must not take the connection down
            log.error("MLLP parser failed: %s", type(exc).__name__)
            rej = MessageRejected(APPLICATION_INTERNAL_ERROR, "the message could not be read",
                                  header=_header_or_none(frame))
            await self._send(writer, rejection_ack(rej, application=self.application,
                                                   facility=self.facility), REJECT)
            return
        try:
            decision = await self.handler(parsed)
            if not isinstance(decision, AckDecision) or decision.code not in (
                    ACCEPT, ERROR, REJECT):
                raise TypeError("handler did not return an AckDecision")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("MLLP handler failed on message %s (%s): %s", parsed.header.control_id,
                      parsed.event.event_type, type(exc).__name__)
            decision = AckDecision.error(GENERIC_ERROR_TEXT, APPLICATION_INTERNAL_ERROR)
        code = reply_code(parsed.header, decision.code)  # after the commit (§2.9.3: CA)
        if code is None:
            self._count(decision.code)  # enhanced mode, MSH-15 asks for no accept ACK
            return
        data = ack_bytes(parsed.header, decision, application=self.application,
                         facility=self.facility, ack_code=code)
        await self._send(writer, data, code)

    async def _oversized(self, head: bytes, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter, *, found_end: bool) -> None:
        """AR for a frame over the limit, addressed from its MSH when that can be read, then
        a lingering close: half-close, discard the rest of the frame, close."""
        log.warning("MLLP frame larger than %d bytes: AR and closing the connection",
                    self.max_message_bytes)
        rej = MessageRejected(APPLICATION_INTERNAL_ERROR, "the message is larger than "
                              f"{self.max_message_bytes} bytes", header=_header_or_none(head))
        await self._send(writer, rejection_ack(rej, application=self.application,
                                               facility=self.facility), REJECT)
        if writer.can_write_eof():
            with contextlib.suppress(Exception):
                writer.write_eof()
        # Discard what the peer still sends (the rest of the frame) so that closing does not
        # reset the connection before the AR is read; bounded in time.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (0.5 if found_end else 5.0)
        while (left := deadline - loop.time()) > 0:
            try:
                chunk = await asyncio.wait_for(reader.read(READ_CHUNK), left)
            except (TimeoutError, ConnectionError, OSError):
                return
            if not chunk or (not found_end and FS in chunk):
                return

    async def _send(self, writer: asyncio.StreamWriter, data: bytes, code: str) -> None:
        writer.write(VT + data + FS + CR)
        await writer.drain()
        self._count(code)

    def _count(self, code: str) -> None:
        if self.on_ack is not None:
            try:
                self.on_ack(code)
            except Exception as exc:
                log.warning("on_ack hook failed: %s", type(exc).__name__)


def _header_or_none(frame: bytes) -> MessageHeader | None:
    """Whatever MSH can be read from the start of a frame (for addressing an AR)."""
    eol = min((i for i in (frame.find(b"\r"), frame.find(b"\n")) if i >= 0),
              default=len(frame))
    try:
        return decode_message(frame[:eol]).header
    except MessageRejected as exc:
        return exc.header
    except Exception:
        return None


def _address_text(address: tuple[object, ...]) -> str:
    """"203.0.113.7:51234" / "[2001:db8::1]:51234" (an IPv4-mapped IPv6 address as IPv4)."""
    host = str(address[0]).split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"{host}:{address[1]}"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return f"[{ip}]:{address[1]}" if ip.version == 6 else f"{ip}:{address[1]}"


def _allowed(address: tuple[object, ...], networks: tuple[IPNetwork, ...]) -> bool:
    """Whether the peer's IP lies in one of `networks`; "::ffff:10.1.2.3" (a v4 client on a
    dual-stack socket, RFC 4291 2.5.5.2) is matched as 10.1.2.3. Unparseable = refused."""
    try:
        ip = ipaddress.ip_address(str(address[0]).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)  # a v4 address is never in a v6 net, and back


def _tls_reason(exc: BaseException) -> str:
    """What went wrong in a handshake, for the log: OpenSSL's reason code (e.g.
    PEER_DID_NOT_RETURN_A_CERTIFICATE, CERTIFICATE_VERIFY_FAILED) or the exception type."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, (TimeoutError, ConnectionAbortedError)):
        return "no handshake within the time limit"
    return type(exc).__name__


def _cid(header: MessageHeader | None) -> str:
    return header.control_id[:32] if header is not None else "-"
