"""`fhirbridge dicomize` as a user runs it: one file in, one valid DICOM object out."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fhirbridge.cli", "dicomize", *args],
                          capture_output=True, text=True, timeout=120)


def test_photo(tmp_path, dciodvfy_check):
    out = tmp_path / "photo.dcm"
    r = run(str(SAMPLES / "photo.jpg"), "-o", str(out), "--patient-id", "MRN1", "--issuer",
            "HOSP", "--patient-name", "Müller^José", "--birth-date", "19840307", "--sex", "M",
            "--body-site", "40983000", "--laterality", "L")
    assert r.returncode == 0, r.stderr
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.77.1.4"
    assert str(ds.PatientName) == "Müller^José" and ds.ImageLaterality == "L"
    dciodvfy_check(out)


def test_pdf(tmp_path, dciodvfy_check):
    from pypdf import PdfWriter

    pdf = tmp_path / "letter.pdf"
    w = PdfWriter()
    w.add_blank_page(width=595, height=842)
    buf = io.BytesIO()
    w.write(buf)
    pdf.write_bytes(buf.getvalue())
    out = tmp_path / "letter.dcm"
    r = run(str(pdf), "-o", str(out), "--patient-id", "MRN1", "--issuer", "HOSP")
    assert r.returncode == 0, r.stderr
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1"
    assert bytes(ds.EncapsulatedDocument).rstrip(b"\0") == buf.getvalue().rstrip(b"\0")
    assert "letter" not in str(ds)  # the file name is not copied
    dciodvfy_check(out)


@pytest.mark.parametrize("data", [b"GIF89a" + b"\0" * 40, b"plain text, not media"])
def test_unsupported_input_is_refused(tmp_path, data):
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    r = run(str(src), "-o", str(tmp_path / "out.dcm"))
    assert r.returncode == 1 and "accepted:" in r.stderr
    assert not (tmp_path / "out.dcm").exists()
