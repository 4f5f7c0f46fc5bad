"""Audit records forwarded to a collector as RFC 5424 syslog (IHE ATNA ITI-20): over TLS with
RFC 5425 octet-counting framing, plain TCP (RFC 6587 octet counting) or UDP (RFC 5426).

Sent from one background thread through a bounded queue: a request never waits for, nor fails
because of, the collector. The database row is the record of truth; a message that cannot be
queued (queue full) is counted and dropped, one that cannot be sent is retried with back-off.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import ssl
import threading
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("fhirbridge.audit")

FACILITY_AUTHPRIV = 10  # RFC 5424 6.2.1: security/authorization messages
# AuditEvent.outcome → RFC 5424 severity: 0 → notice, 4 → warning, 8 → error, 12 → critical
_SEVERITY = {"0": 5, "4": 4, "8": 3, "12": 2}
_BOM = b"\xef\xbb\xbf"  # RFC 5424 6.4: MSG-UTF8 starts with the BOM
# The message body is the FHIR AuditEvent as JSON rather than the DICOM PS3.15 A.5 XML: the
# same record as GET /fhir/AuditEvent returns, which FHIR-era collectors (IHE ITI-20 "FHIR
# Feed" option) read directly; MSGID says so.
MSGID = "IHE+FHIR"


def _printable(value: str, limit: int) -> str:
    """RFC 5424 6.2.x header fields: PRINTUSASCII (33-126), else NILVALUE."""
    out = "".join(ch for ch in value if 33 <= ord(ch) <= 126)[:limit]
    return out or "-"


def format_message(resource: dict[str, Any], *, app_name: str, hostname: str | None = None,
                   procid: int | None = None, at: datetime | None = None) -> bytes:
    """One RFC 5424 SYSLOG-MSG: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM MSG`."""
    severity = _SEVERITY.get(str(resource.get("outcome", "0")), 5)
    pri = FACILITY_AUTHPRIV * 8 + severity
    stamp = (at or datetime.now(timezone.utc)).astimezone(timezone.utc).isoformat(
        timespec="microseconds").replace("+00:00", "Z")  # RFC 5424 6.2.3 (RFC 3339)
    header = (f"<{pri}>1 {stamp} {_printable(hostname or socket.gethostname(), 255)} "
              f"{_printable(app_name, 48)} {_printable(str(procid or os.getpid()), 128)} "
              f"{MSGID} -")
    body = json.dumps(resource, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return header.encode("ascii") + b" " + _BOM + body


def frame(message: bytes) -> bytes:
    """RFC 5425 4.3 / RFC 6587 3.4.1 octet counting: `MSG-LEN SP SYSLOG-MSG`."""
    return str(len(message)).encode("ascii") + b" " + message


class SyslogForwarder:
    """`tls://host:port`, `tcp://host:port` or `udp://host:port`."""

    def __init__(self, url: str, *, app_name: str, ca_file: str = "", cert_file: str = "",
                 key_file: str = "", max_queue: int = 10000, timeout: float = 5.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("tls", "tcp", "udp") or not parts.hostname:
            raise ValueError("audit.syslog_url must be tls://host:port, tcp://host:port or "
                             "udp://host:port")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (6514 if parts.scheme == "tls" else 514)
        self.app_name = app_name
        self.timeout = timeout
        self._ssl: ssl.SSLContext | None = None
        if self.scheme == "tls":
            ctx = ssl.create_default_context(cafile=ca_file or None)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 5425 / BCP 195
            if cert_file:
                ctx.load_cert_chain(cert_file, key_file or None)
            self._ssl = ctx
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=max_queue)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.sent = 0
        self.dropped = 0

    def send(self, resource: dict[str, Any]) -> None:
        """Queue one AuditEvent; never blocks, never raises."""
        try:
            message = format_message(resource, app_name=self.app_name)
        except Exception:  # noqa: BLE001 - an audit copy must not fail the request
            self.dropped += 1
            return
        self._start()
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("syslog audit queue full: %d audit copies not forwarded (the "
                            "database keeps every record)", self.dropped)

    def _start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fhirbridge-syslog",
                                                daemon=True)
                self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for up to `timeout` seconds), then stop."""
        thread = self._thread
        if thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        thread.join(timeout)
        self._stop.set()
        self._disconnect()

    def _connect(self) -> socket.socket:
        if self.scheme == "udp":
            sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET,
                                 socket.SOCK_DGRAM)
            sock.connect((self.host, self.port))
            return sock
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        if self._ssl is None:
            return raw
        try:
            return self._ssl.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _deliver(self, message: bytes) -> None:
        if self._sock is None:
            self._sock = self._connect()
        if self.scheme == "udp":
            self._sock.send(message)  # RFC 5426: one message per datagram, no framing
        else:
            self._sock.sendall(frame(message))

    def _run(self) -> None:
        failures = 0
        while True:
            message = self._queue.get()
            if message is None:
                return
            while not self._stop.is_set():
                try:
                    self._deliver(message)
                    self.sent += 1
                    failures = 0
                    break
                except (OSError, ssl.SSLError) as exc:
                    self._disconnect()
                    failures += 1
                    if failures == 1 or failures % 100 == 0:
                        log.warning("syslog collector %s:%d unreachable (%s); retrying",
                                    self.host, self.port, type(exc).__name__)
                    if self._stop.wait(min(30.0, 0.2 * 2 ** min(failures, 8))):
                        return
