"""Which media types we accept, and what each becomes in DICOM.

photo → VL Photographic Image (PS3.3 A.32.4), pdf → Encapsulated PDF (A.45.1),
video → Video Photographic Image (A.32.4 video). Everything else is refused with the list.
GIF and TIFF are not accepted: GIF is animation or a tiny palette image, TIFF from a phone
portal is rare and often multi-page; both are a 415 that names the accepted types.
"""

from __future__ import annotations

from dataclasses import dataclass

from fhirbridge.media.sniff import normalize_content_type

PHOTO = "photo"
PDF = "pdf"
VIDEO = "video"

_KINDS: dict[str, str] = {
    "image/jpeg": PHOTO,
    "image/png": PHOTO,
    "image/heic": PHOTO,
    "image/heif": PHOTO,
    "image/webp": PHOTO,
    "application/pdf": PDF,
    "video/mp4": VIDEO,
    "video/quicktime": VIDEO,
}
ACCEPTED_TYPES: tuple[str, ...] = tuple(_KINDS)

# Series per kind inside one study (one upload Bundle = one study, a series per kind).
SERIES_NUMBER = {PHOTO: 1, PDF: 2, VIDEO: 3}
SERIES_DESCRIPTION = {PHOTO: "Patient photos", PDF: "Patient documents",
                      VIDEO: "Patient videos"}


def kind_of(content_type: str | None) -> str | None:
    """photo, pdf, video, or None when we do not take the type."""
    return _KINDS.get(normalize_content_type(content_type))


@dataclass(frozen=True)
class MediaLimits:
    """Quality and size limits that intake and the worker apply, from [media] (and the
    request-shape limits of [http]) in the configuration."""

    max_pixels: int = 89_478_485
    min_side: int = 0
    uniform_stddev: float = 2.0
    max_video_bytes: int = 512 * 1024 * 1024
    max_video_seconds: float = 600.0
    max_pdf_bytes: int = 64 * 1024 * 1024
    # width x height x bands x bytes per sample, from the header, before any decode
    max_decoded_bytes: int = 512 * 1024 * 1024
    max_json_depth: int = 64  # http.max_json_depth: request JSON nested deeper is a 400
    max_bundle_entries: int = 100  # http.max_bundle_entries: a longer Bundle is a 413
