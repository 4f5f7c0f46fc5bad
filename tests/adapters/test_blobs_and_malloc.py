"""Durable writes (adapters.blobs), staged blobs read and written past the page cache, and
the glibc malloc settings."""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from fhirbridge.adapters import blobs
from fhirbridge.adapters.blobs import BlobStore, write_durably
from fhirbridge.dicom.io import read_dataset, write_dataset, write_dataset_to
from fhirbridge.dicom.photo import build_vl_photographic
from fhirbridge.media.photo import prepare_photo
from tests.dicom.test_photo import context, patient
from tests.media.test_photo_formats import jpeg, pattern


def test_write_durably_takes_bytes_or_a_writer(tmp_path: Path) -> None:
    write_durably(tmp_path / "a" / "x.bin", b"abc")
    write_durably(tmp_path / "a" / "y.bin", lambda fh: fh.write(b"def"))
    assert (tmp_path / "a" / "x.bin").read_bytes() == b"abc"
    assert (tmp_path / "a" / "y.bin").read_bytes() == b"def"


def test_write_durably_leaves_nothing_when_the_writer_fails(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"old")

    def half(fh):  # type: ignore[no-untyped-def]
        fh.write(b"new, but")
        raise ValueError("encoder failed")

    with pytest.raises(ValueError):
        write_durably(tmp_path / "x.bin", half)
    assert (tmp_path / "x.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


SIZES = [0, 1, 4095, 4096, 4097, 2_220_586, 4 * 1024 * 1024, 4 * 1024 * 1024 + 7, 9_000_001]


def _round_trip(store: BlobStore) -> None:
    for size in SIZES:
        data = bytes(range(256)) * (size // 256) + b"\xff" * (size % 256)
        rel, digest = store.put(data)
        assert digest == hashlib.sha256(data).hexdigest()
        assert store.get(rel) == data, size
        assert store.path(rel).read_bytes() == data, size  # as any other reader sees it
        assert store.path(rel).stat().st_size == size  # the padded last block is cut off
    assert not [p for p in store.root.rglob("*") if p.name.endswith(".tmp")]


def test_staged_blobs_round_trip_whatever_their_size(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    opened = []

    def spy(path: Path, flags: int) -> int | None:
        fd = open_direct(path, flags)
        opened.append(fd is not None)
        return fd

    open_direct = blobs._open_direct
    monkeypatch.setattr(blobs, "_open_direct", spy)
    _round_trip(BlobStore(tmp_path / "blobs"))
    # Linux file systems for a data dir (ext4, xfs, btrfs, tmpfs ≥ 6.6) take O_DIRECT: the
    # uncached path is what ran, for writes and for reads
    assert opened and all(opened), "O_DIRECT was refused: only the buffered fallback ran"


def test_staged_blobs_round_trip_without_o_direct(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blobs, "_open_direct", lambda path, flags: None)  # e.g. macOS
    _round_trip(BlobStore(tmp_path / "blobs"))


def test_uncached_write_leaves_nothing_when_the_disk_fails(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlobStore(tmp_path / "blobs")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(blobs.os, "fsync", no_space)
    with pytest.raises(OSError):
        store.put(b"x" * 10_000)
    assert [p for p in store.root.rglob("*") if p.is_file()] == []


def test_dataset_written_to_a_file_equals_the_bytes(tmp_path: Path) -> None:
    photo = prepare_photo(jpeg(pattern((640, 480))), "image/jpeg")
    built_photo = build_vl_photographic(photo, patient(), context())
    write_durably(tmp_path / "o.dcm", lambda fh: write_dataset_to(fh, built_photo))
    data = (tmp_path / "o.dcm").read_bytes()
    assert data == write_dataset(built_photo)
    assert read_dataset(data).SOPInstanceUID == built_photo.SOPInstanceUID


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_malloc_is_tuned_unless_the_operator_set_it() -> None:
    code = "from fhirbridge._malloc import tune_malloc; print(tune_malloc())"
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True).stdout.strip()
    assert out == "True"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "MALLOC_MMAP_THRESHOLD_": "1048576"},
                         check=True).stdout.strip()
    assert out == "False"
