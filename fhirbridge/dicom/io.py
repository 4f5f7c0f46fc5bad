"""Datasets to Part 10 bytes and back."""

from __future__ import annotations

import io
from typing import BinaryIO

import pydicom
from pydicom.dataset import Dataset

__all__ = ["write_dataset", "write_dataset_to", "read_dataset"]


def write_dataset(ds: Dataset) -> bytes:
    """A DICOM Part 10 file (preamble, DICM, file meta) of `ds`, encoded in the transfer
    syntax given by ds.file_meta.TransferSyntaxUID."""
    buf = io.BytesIO()
    write_dataset_to(buf, ds)
    return buf.getvalue()


def write_dataset_to(fp: BinaryIO, ds: Dataset) -> None:
    """`write_dataset` into an open file: a multi-megabyte object goes to disk without being
    assembled in memory first."""
    if getattr(ds, "file_meta", None) is None or "TransferSyntaxUID" not in ds.file_meta:
        raise ValueError("dataset has no file meta TransferSyntaxUID")
    pydicom.dcmwrite(fp, ds, enforce_file_format=True)


def read_dataset(data: bytes) -> Dataset:
    """Parse Part 10 bytes (for checks and tests)."""
    return pydicom.dcmread(io.BytesIO(data))
