"""The MLLP listener (asyncio): frames in, one original-mode ACK out per frame, in order.

Follows HL7 v2.5.1 Appendix C (lower layer protocols), §C.4 MLLP: a message is framed as
<VT> message <FS><CR>; bytes outside a frame are discarded. Acknowledgment follows Chapter 2
§2.9.2 (original mode): AR for what cannot be parsed or is not accepted, without calling the
application; AA only after the application's handler has returned (it has committed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from fhirbridge.hl7.ack import (
    ACCEPT,
    ERROR,
    REJECT,
    AckDecision,
    ack_bytes,
    rejection_ack,
)
from fhirbridge.hl7.adt import ParsedMessage, parse_adt
from fhirbridge.hl7.message import (
    APPLICATION_INTERNAL_ERROR,
    MessageHeader,
    MessageRejected,
    decode_message,
)

log = logging.getLogger("fhirbridge.hl7.mllp")

VT, FS, CR = b"\x0b", b"\x1c", b"\x0d"
Handler = Callable[[ParsedMessage], Awaitable[AckDecision]]
Parser = Callable[[bytes], ParsedMessage]
READ_CHUNK = 64 * 1024
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
    """

    def __init__(self, handler: Handler, *, max_message_bytes: int = 1024 * 1024,
                 idle_timeout: float | None = 600.0, application: str = "FHIRBRIDGE",
                 facility: str = "", parser: Parser = parse_adt,
                 on_ack: Callable[[str], None] | None = None,
                 on_stop: Callable[[], None] | None = None) -> None:
        self.handler = handler
        self.max_message_bytes = max_message_bytes
        self.idle_timeout = idle_timeout
        self.application = application
        self.facility = facility
        self.parser = parser
        self.on_ack = on_ack
        self.on_stop = on_stop
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._port = 0

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 2575) -> None:
        """Listen on host:port (port 0 picks a free port; see `port`)."""
        if self._server is not None:
            raise RuntimeError("MLLPServer already started")
        self._server = await asyncio.start_server(self._serve, host, port, limit=READ_CHUNK)
        sockets = self._server.sockets or ()
        self._port = int(sockets[0].getsockname()[1]) if sockets else port
        log.info("MLLP listening on %s:%d", host, self._port)

    @property
    def port(self) -> int:
        return self._port

    async def stop(self) -> None:
        """Stop accepting, close every connection (a message being handled gets no ACK: the
        sender will resend it) and wait for the connection tasks to end."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for _ in range(3):  # let connections accepted just before close() reach _serve
            await asyncio.sleep(0)
        tasks = list(self._connections)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)
        if self.on_stop is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.on_stop)
            except Exception as exc:
                log.warning("MLLP on_stop hook failed: %s", type(exc).__name__)

    async def __aenter__(self) -> MLLPServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- one connection -------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        peer = writer.get_extra_info("peername")
        try:
            await self._connection(reader, writer)
        except asyncio.CancelledError:
            pass
        except (ConnectionError, OSError) as exc:
            log.info("MLLP connection from %s ended: %s", peer, type(exc).__name__)
        except Exception as exc:  # the listener must never crash on one connection
            log.error("MLLP connection from %s failed: %s", peer, type(exc).__name__)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)
            if task is not None:
                self._connections.discard(task)

    async def _read(self, reader: asyncio.StreamReader) -> bytes | None:
        """Next chunk; b"" at EOF; None after the idle timeout."""
        if self.idle_timeout is None:
            return await reader.read(READ_CHUNK)
        try:
            return await asyncio.wait_for(reader.read(READ_CHUNK), self.idle_timeout)
        except TimeoutError:
            return None

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
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
                    await self._answer(frame, writer)
                    continue
                if len(buf) > self.max_message_bytes:
                    await self._oversized(bytes(buf[:4096]), reader, writer, found_end=False)
                    return
            chunk = await self._read(reader)
            if chunk is None:
                log.info("MLLP connection idle for %.0f s: closing", self.idle_timeout or 0)
                return
            if not chunk:
                if in_frame and buf.strip():
                    log.warning("MLLP connection closed inside a frame (%d bytes): dropped",
                                len(buf))
                return
            buf += chunk

    async def _answer(self, frame: bytes, writer: asyncio.StreamWriter) -> None:
        try:
            parsed = self.parser(frame)
        except MessageRejected as exc:
            log.info("MLLP message %s rejected: %s %s", _cid(exc.header), exc.reason_code,
                     exc.text)
            await self._send(writer, rejection_ack(exc, application=self.application,
                                                   facility=self.facility), exc.ack_code)
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
        data = ack_bytes(parsed.header, decision, application=self.application,
                         facility=self.facility)
        await self._send(writer, data, decision.code)

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


def _cid(header: MessageHeader | None) -> str:
    return header.control_id[:32] if header is not None else "-"
