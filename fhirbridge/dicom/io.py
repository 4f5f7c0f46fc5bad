"""Datasets to Part 10 bytes and back."""

from __future__ import annotations

import io

import pydicom
from pydicom.dataset import Dataset

__all__ = ["write_dataset", "read_dataset"]


def write_dataset(ds: Dataset) -> bytes:
    """A DICOM Part 10 file (preamble, DICM, file meta) of `ds`, encoded in the transfer
    syntax given by ds.file_meta.TransferSyntaxUID."""
    if getattr(ds, "file_meta", None) is None or "TransferSyntaxUID" not in ds.file_meta:
        raise ValueError("dataset has no file meta TransferSyntaxUID")
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def read_dataset(data: bytes) -> Dataset:
    """Parse Part 10 bytes (for checks and tests)."""
    return pydicom.dcmread(io.BytesIO(data))
