"""One entry point from checked media to a DICOM object, by kind:
photo → VL Photographic Image (PS3.3 A.32.4), pdf → Encapsulated PDF (A.45.1),
video → Video Photographic Image (A.32.5). Used by the worker and `fhirbridge dicomize`.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from fhirbridge.dicom.context import PatientDemographics, StudyContext
from fhirbridge.media.errors import UNSUPPORTED_TYPE, MediaError
from fhirbridge.media.kinds import PDF, PHOTO, VIDEO, MediaLimits, kind_of

__all__ = ["PreparedMedia", "prepare_media", "build_object"]


class PreparedMedia:
    """Checked, prepared media of one kind, plus what it says about capture time."""

    def __init__(self, kind: str, prepared: Any) -> None:
        self.kind = kind
        self.prepared = prepared

    @property
    def captured(self) -> datetime | None:
        exif = getattr(self.prepared, "exif", None)
        return getattr(exif, "datetime_original", None) if exif is not None else None


def prepare_media(source: bytes | Path, content_type: str, limits: MediaLimits) -> PreparedMedia:
    """Decode/inspect and prepare; raises MediaError with a code and a PHI-free text."""
    kind = kind_of(content_type)
    if kind == PHOTO:
        from fhirbridge.media.photo import prepare_photo

        data = source.read_bytes() if isinstance(source, Path) else source
        return PreparedMedia(kind, prepare_photo(data, content_type,
                                                 max_pixels=limits.max_pixels,
                                                 min_side=limits.min_side,
                                                 uniform_stddev=limits.uniform_stddev,
                                                 max_decoded_bytes=limits.max_decoded_bytes))
    if kind == PDF:
        from fhirbridge.media.pdf import prepare_pdf

        data = source.read_bytes() if isinstance(source, Path) else source
        return PreparedMedia(kind, prepare_pdf(data, max_bytes=limits.max_pdf_bytes))
    if kind == VIDEO:
        from fhirbridge.media.video import prepare_video

        return PreparedMedia(kind, prepare_video(source, max_bytes=limits.max_video_bytes,
                                                 max_seconds=limits.max_video_seconds))
    raise MediaError(UNSUPPORTED_TYPE, f"{content_type or 'this type'} is not accepted")


def build_object(media: PreparedMedia, patient: PatientDemographics, ctx: StudyContext, *,
                 now: datetime | None = None) -> Dataset:
    if media.kind == PHOTO:
        from fhirbridge.dicom.photo import build_vl_photographic

        return build_vl_photographic(media.prepared, patient, ctx, now=now)
    if media.kind == PDF:
        from fhirbridge.dicom.pdf import build_encapsulated_pdf

        return build_encapsulated_pdf(media.prepared, patient, ctx, now=now)
    if media.kind == VIDEO:
        from fhirbridge.dicom.video import build_video_photographic

        return build_video_photographic(media.prepared, patient, ctx, now=now)
    raise ValueError(f"no builder for {media.kind}")
