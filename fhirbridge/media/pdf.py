"""PDF uploads: checked, never changed.

The bytes go into the Encapsulated PDF object exactly as received (a PDF is not re-written:
signatures, forms and incremental updates stay intact). What is checked:

- `%PDF-` at the very start (else TYPE_MISMATCH: the bytes are not a PDF),
- `%%EOF` within the last 1024 bytes (else TRUNCATED: an interrupted upload),
- the size (TOO_LARGE over `max_bytes`),
- in `prepare_pdf` only: pypdf (strict=False, as viewers are lenient) can open it and count
  its pages (else NOT_DECODABLE); an encrypted PDF that does not open with the empty user
  password gives NOT_DECODABLE "PDF is encrypted" — nobody downstream could read it.

The document-information title is read, but the DICOM builder does not use it by default: it
is free text written by whatever made the PDF and may hold the patient's name or other PHI.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from fhirbridge.media.errors import NOT_DECODABLE, TOO_LARGE, TRUNCATED, TYPE_MISMATCH, MediaError

__all__ = ["DEFAULT_MAX_PDF_BYTES", "PreparedPdf", "check_pdf", "prepare_pdf"]

DEFAULT_MAX_PDF_BYTES = 64 * 1024 * 1024
_EOF_WINDOW = 1024  # %%EOF may be followed by whitespace or a little garbage


@dataclass(frozen=True)
class PreparedPdf:
    """A checked PDF: the bytes unchanged, plus what was learnt from reading it."""

    data: bytes
    page_count: int
    title: str = ""  # document information /Title; may hold PHI, not used for DICOM
    version: str = ""  # from the header, e.g. "1.7"
    encrypted: bool = False  # encrypted, but opens with the empty user password


def check_pdf(data: bytes, *, max_bytes: int | None = DEFAULT_MAX_PDF_BYTES) -> None:
    """The cheap intake checks (no parsing): size, %PDF- magic, %%EOF near the end."""
    if max_bytes is not None and len(data) > max_bytes:
        raise MediaError(TOO_LARGE, f"PDF is larger than {max_bytes} bytes")
    if not bytes(data[:5]) == b"%PDF-":
        raise MediaError(TYPE_MISMATCH, "the bytes are not a PDF (no %PDF- header)")
    if b"%%EOF" not in bytes(data[-_EOF_WINDOW:]):
        raise MediaError(TRUNCATED, "PDF is truncated (no %%EOF marker at the end)")


def _version(data: bytes) -> str:
    head = bytes(data[5:16]).split(b"\n")[0].split(b"\r")[0].strip()
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return ""
    return text if len(text) <= 4 and text.replace(".", "").isdigit() else ""


def prepare_pdf(data: bytes, *, max_bytes: int = DEFAULT_MAX_PDF_BYTES) -> PreparedPdf:
    """Check a PDF and count its pages; the bytes are returned unchanged.

    Raises MediaError: TOO_LARGE, TYPE_MISMATCH, TRUNCATED, NOT_DECODABLE."""
    data = bytes(data)
    check_pdf(data, max_bytes=max_bytes)

    from pypdf import PdfReader
    from pypdf.errors import DependencyError

    # pypdf (strict=False) logs what it repairs at WARNING on the "pypdf" logger: object
    # numbers and offsets, never document text.
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
    except (DependencyError, NotImplementedError):
        raise MediaError(NOT_DECODABLE, "PDF is encrypted") from None
    except Exception:  # noqa: BLE001 - pypdf raises many kinds on damaged files
        raise MediaError(NOT_DECODABLE, "PDF could not be read") from None
    encrypted = bool(reader.is_encrypted)
    if encrypted:
        try:
            opened = reader.decrypt("")
        except Exception:  # noqa: BLE001 - DependencyError (no AES), bad handler, ...
            opened = 0
        if not opened:
            raise MediaError(NOT_DECODABLE, "PDF is encrypted")
    try:
        pages = len(reader.pages)
    except (DependencyError, NotImplementedError):
        raise MediaError(NOT_DECODABLE, "PDF is encrypted") from None
    except Exception:  # noqa: BLE001 - PdfReadError and pypdf's other failures
        raise MediaError(NOT_DECODABLE, "PDF could not be read (no page tree)") from None
    if pages < 1:
        raise MediaError(NOT_DECODABLE, "PDF has no pages")
    title = ""
    try:
        meta = reader.metadata
        if meta is not None and meta.title:
            title = " ".join(str(meta.title).split())[:256]
    except Exception:  # noqa: BLE001 - a broken Info dictionary is not a reason to refuse
        title = ""
    return PreparedPdf(data=data, page_count=pages, title=title, version=_version(data),
                       encrypted=encrypted)
