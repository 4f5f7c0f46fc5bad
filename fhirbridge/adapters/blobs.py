"""Staged upload bytes on local disk, content-addressed (SHA-256), written durably.

A file is fsynced (and its directory) before the database row that names it commits.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes) -> tuple[str, str]:
        """Store bytes; returns (relative path, sha256 hex). Idempotent for equal bytes."""
        digest = hashlib.sha256(data).hexdigest()
        rel = f"{digest[:2]}/{digest}"
        path = self.root / rel
        if path.exists() and path.stat().st_size == len(data):
            return rel, digest
        write_durably(path, data)
        return rel, digest

    def get(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def path(self, rel: str) -> Path:
        return self.root / rel


def write_durably(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename over `path`, fsync the directory: readers see
    the old file or the whole new one, and the new one survives a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
