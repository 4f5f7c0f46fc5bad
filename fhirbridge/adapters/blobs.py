"""Staged upload bytes on local disk, content-addressed (SHA-256), written durably.

A file is fsynced (and its directory) before the database row that names it commits.
Large bodies are streamed (`put_stream`, `put_iter`): hashed while written to a temporary file
in the store, never held whole in memory.

A staged upload is written once (intake) and read once (the worker), so `put` and `get` bypass
the page cache (O_DIRECT, through a reused page-aligned buffer per thread) where the file
system allows it: copying every photo into fresh page-cache pages cost the HTTP process about
a fifth of its CPU (docs/decisions.md, "Photo pipeline speed").

PHI at rest: directories are created 0700 and files 0600 (the bytes are patients' photos);
`remove` deletes a blob once nobody needs it, safely against a concurrent upload of the same
bytes (content-addressed blobs are shared).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import mmap
import os
import threading
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

_TMP_PREFIX = ".upload-"
_BATCH_BYTES = 1024 * 1024  # put_stream hands writes to a thread in batches of about this size
PRIVATE_DIR = 0o700  # PHI at rest: only the service's own user
PRIVATE_FILE = 0o600
_TOMB_SUFFIX = ".gone"
T = TypeVar("T")


class BlobTooLarge(Exception):
    """A streamed body went over `max_bytes`; nothing was kept."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"body exceeds {max_bytes} bytes")
        self.max_bytes = max_bytes


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        make_private_dir(self.root)

    def put(self, data: bytes) -> tuple[str, str]:
        """Store bytes; returns (relative path, sha256 hex). Idempotent for equal bytes."""
        digest = hashlib.sha256(data).hexdigest()
        rel = _rel(digest)
        path = self.root / rel
        if _touch_if_same_size(path, len(data)):
            return rel, digest
        write_durably(path, data, uncached=True)
        return rel, digest

    async def put_stream(self, chunks: AsyncIterable[bytes] | Iterable[bytes], *,
                         max_bytes: int) -> tuple[str, str, int]:
        """Store a stream of chunks; returns (relative path, sha256 hex, size).

        The bytes go to a temporary file in the store while hashed; file writes and fsyncs run
        in a worker thread (batched, about 1 MiB at a time), so the event loop is not blocked
        and at most one batch is in memory. Over `max_bytes` → `BlobTooLarge`; on that or any
        other error (the client went away, the disk is full) the temporary file is removed.
        """
        writer = _Writer(self.root, max_bytes)
        batch: list[bytes] = []
        pending = 0
        in_thread = False  # a write or the commit is running in a worker thread

        async def flush(fn: Callable[..., T], *args: Any) -> T:
            nonlocal in_thread
            in_thread = True
            result = await asyncio.to_thread(fn, *args)
            in_thread = False
            return result

        try:
            async for chunk in _aiter(chunks):
                writer.count(len(chunk))
                if chunk:
                    batch.append(chunk)
                    pending += len(chunk)
                if pending >= _BATCH_BYTES:
                    await flush(writer.write_all, batch)
                    batch, pending = [], 0
            if batch:
                await flush(writer.write_all, batch)
            batch = []
            return await flush(writer.commit)
        finally:
            # also on cancellation (client disconnect) and on errors raised by the iterator
            if in_thread:  # cancelled while a thread works on the file: discard after it
                asyncio.get_running_loop().run_in_executor(None, writer.discard)
            else:
                writer.discard()

    def put_iter(self, chunks: Iterable[bytes], *, max_bytes: int) -> tuple[str, str, int]:
        """`put_stream` for blocking code (worker threads): same result, same guarantees."""
        writer = _Writer(self.root, max_bytes)
        try:
            for chunk in chunks:
                writer.count(len(chunk))
                writer.write_all((chunk,))
            return writer.commit()
        finally:
            writer.discard()

    def get(self, rel: str) -> bytes:
        path = self.root / rel
        data = read_uncached(path)
        return path.read_bytes() if data is None else data

    def path(self, rel: str) -> Path:
        return self.root / rel

    def remove(self, rel: str, in_use: Callable[[], bool], *, used_after: float) -> bool:
        """Delete the blob `rel` unless `in_use()` (asked after the blob is set aside) says
        someone still needs it, or it was written or re-used (mtime) after `used_after` (a
        POSIX time): an upload of the same bytes may be on its way to its database commit.
        The blob is renamed aside first, so an upload arriving meanwhile writes a fresh copy;
        a kept blob is put back. True when it was deleted."""
        path = self.root / rel
        tomb = path.with_name(f".{path.name}.{uuid.uuid4().hex}{_TOMB_SUFFIX}")
        try:
            os.rename(path, tomb)
        except FileNotFoundError:
            return False
        try:
            keep = tomb.stat().st_mtime > used_after or in_use()
        except BaseException:
            os.replace(tomb, path)
            raise
        if keep:
            os.replace(tomb, path)  # a fresh copy written meanwhile has the same bytes
            return False
        tomb.unlink()
        return True

    def restore_set_aside(self, older_than: float) -> int:
        """Put back blobs `remove` set aside and never finished with (the process died between
        its rename and its decision); their users decide again. Returns how many."""
        restored = 0
        for tomb in self.root.glob(f"*/.*{_TOMB_SUFFIX}"):
            try:
                if tomb.stat().st_mtime > older_than:
                    continue
                name = tomb.name[1:].rsplit(".", 2)[0]  # .<digest>.<uuid>.gone
                os.replace(tomb, tomb.with_name(name))
                restored += 1
            except FileNotFoundError:
                continue
        return restored


class _Writer:
    """One temporary file in the store root, hashed as written, renamed into place on commit."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.size = 0  # counted as chunks arrive (before the thread writes them)
        self.hash = hashlib.sha256()
        self.tmp: Path | None = root / f"{_TMP_PREFIX}{uuid.uuid4().hex}.tmp"
        self.fh = os.fdopen(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                    PRIVATE_FILE), "wb")  # closed in commit/discard
        self.lock = threading.Lock()  # discard waits for a write or commit in progress

    def count(self, n: int) -> None:
        self.size += n
        if self.size > self.max_bytes:
            raise BlobTooLarge(self.max_bytes)

    def write_all(self, chunks: Iterable[bytes]) -> None:
        with self.lock:
            self._write_all(chunks)

    def _write_all(self, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            self.hash.update(chunk)
            self.fh.write(chunk)

    def commit(self) -> tuple[str, str, int]:
        with self.lock:
            return self._commit()

    def _commit(self) -> tuple[str, str, int]:
        assert self.tmp is not None
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        digest = self.hash.hexdigest()
        rel = _rel(digest)
        path = self.root / rel
        new_dir = not path.parent.exists()
        path.parent.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        os.replace(self.tmp, path)  # equal bytes already there: same content, same name
        self.tmp = None
        _fsync_dir(path.parent)
        if new_dir:
            _fsync_dir(self.root)  # the new fan-out directory's entry
        return rel, digest, self.size

    def discard(self) -> None:
        with self.lock:
            self._discard()

    def _discard(self) -> None:
        if not self.fh.closed:
            self.fh.close()
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None


def _rel(digest: str) -> str:
    return f"{digest[:2]}/{digest}"


def _touch_if_same_size(path: Path, size: int) -> bool:
    """Equal bytes already stored: mark them used now (mtime) so a concurrent `remove` keeps
    them, and say so. False when absent (or removed meanwhile): the caller writes."""
    try:
        if path.stat().st_size != size:
            return False
        os.utime(path)
        return True
    except FileNotFoundError:
        return False


def make_private_dir(path: Path) -> bool:
    """Create `path` (and parents) as 0700, or make an existing one 0700. True when an
    existing directory was more open than that and was closed."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777
    if mode != PRIVATE_DIR:
        os.chmod(path, PRIVATE_DIR)
        return bool(mode & 0o077)
    return False


async def _aiter(chunks: AsyncIterable[bytes] | Iterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(chunks, AsyncIterable):
        async for chunk in chunks:
            yield chunk
    else:
        for chunk in chunks:
            yield chunk


def write_durably(path: Path, data: bytes | Callable[[BinaryIO], object], *,
                  uncached: bool = False) -> None:
    """Write to a temporary name, fsync, rename over `path`, fsync the directory: readers see
    the old file or the whole new one, and the new one survives a crash. `data` is the bytes,
    or a function that writes them into the open file. `uncached`: bytes written once and
    read once go past the page cache (O_DIRECT) where the file system allows it."""
    path.parent.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = _open_direct(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL) \
        if uncached and not callable(data) else None
    try:
        if fd is not None:
            _write_direct(fd, data)  # type: ignore[arg-type]
            os.fsync(fd)
            os.close(fd)
            fd = None
        else:
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE),
                           "wb") as fh:
                if callable(data):
                    data(fh)
                else:
                    fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- uncached (O_DIRECT) whole-file I/O ----------------------------------------------------------
_ALIGN = 4096  # O_DIRECT offsets, lengths and buffers: multiples of the logical block size
_DIRECT_CHUNK = 4 * 1024 * 1024
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_thread_buffers = threading.local()


def _aligned_buffer() -> mmap.mmap:
    """This thread's page-aligned buffer (anonymous mmap), kept for reuse."""
    buf: mmap.mmap | None = getattr(_thread_buffers, "buf", None)
    if buf is None:
        buf = _thread_buffers.buf = mmap.mmap(-1, _DIRECT_CHUNK)
    return buf


def _open_direct(path: Path, flags: int) -> int | None:
    """An O_DIRECT descriptor, or None where the platform or file system has no O_DIRECT."""
    if not _O_DIRECT:
        return None
    try:
        return os.open(path, flags | _O_DIRECT, PRIVATE_FILE)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise


def _write_direct(fd: int, data: bytes) -> None:
    """All of `data` into an O_DIRECT descriptor: whole blocks through the aligned buffer
    (the last one padded), then the file cut to its size."""
    buf, src = _aligned_buffer(), memoryview(data)
    with memoryview(buf) as window:
        for offset in range(0, len(data), _DIRECT_CHUNK):
            n = min(_DIRECT_CHUNK, len(data) - offset)
            padded = -(-n // _ALIGN) * _ALIGN
            window[:n] = src[offset:offset + n]
            written = 0
            while written < padded:
                written += os.write(fd, window[written:padded])
    os.ftruncate(fd, len(data))


def read_uncached(path: Path) -> bytes | None:
    """The whole file, read without the page cache; None where O_DIRECT is not available.
    (Data still in the page cache, say from `put_iter`, is written back first by the kernel:
    the read is coherent.)"""
    fd = _open_direct(path, os.O_RDONLY)
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        parts: list[bytes] = []
        with memoryview(_aligned_buffer()) as window:
            offset = 0
            while offset < size:
                n = os.preadv(fd, [window], offset)
                if n <= 0:
                    break
                parts.append(bytes(window[:min(n, size - offset)]))
                offset += n
        return parts[0] if len(parts) == 1 else b"".join(parts)
    finally:
        os.close(fd)
