"""Durable writes (adapters.blobs.write_durably) and the glibc malloc settings."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from fhirbridge.adapters.blobs import write_durably
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
