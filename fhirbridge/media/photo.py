"""Photo bytes → a baseline JPEG ready for DICOM (JPEG Baseline, 1.2.840.10008.1.2.4.50).

A baseline 8-bit YCbCr 4:2:0/4:2:2 (or greyscale) JPEG that needs no rotation passes through:
its metadata segments are removed at byte level and the compressed pixels are untouched (no
decode). Anything else — EXIF orientation 2-8, progressive or other non-baseline processes,
CMYK/YCCK, RGB-coded or 4:4:4 colour (the VL Photographic IOD takes only YBR_FULL_422) — is
decoded, turned upright and re-encoded as baseline JPEG, and marked derived.

Sizes are checked from the frame header before anything is decoded. Other input types are
added by registering a preparer in `_PREPARERS` (PNG and HEIC would decode with Pillow /
pillow-heif and go through `_encode_image`).
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from PIL import Image

from fhirbridge.media import jpeg as jp
from fhirbridge.media.errors import (
    NOT_DECODABLE, TOO_MANY_PIXELS, TOO_SMALL, TYPE_MISMATCH, UNSUPPORTED_TYPE, MediaError,
)
from fhirbridge.media.sniff import normalize_content_type, sniff_content_type

__all__ = ["ExifInfo", "PreparedPhoto", "prepare_photo", "read_exif", "DEFAULT_MAX_PIXELS",
           "JPEG_QUALITY", "SUPPORTED_TYPES"]

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's MAX_IMAGE_PIXELS default
JPEG_QUALITY = 92
_SUBSAMPLING_420 = 2  # Pillow: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0

# EXIF Orientation → Pillow transpose turning the stored pixels upright (as
# PIL.ImageOps.exif_transpose does).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_PASS_SUBSAMPLING = frozenset({"4:2:0", "4:2:2"})


@dataclass(frozen=True)
class ExifInfo:
    """The few EXIF values worth carrying into DICOM. Never GPS, owner or serial numbers."""

    datetime_original: datetime | None = None  # aware when OffsetTimeOriginal was given
    make: str = ""
    model: str = ""
    exposure_time: float | None = None  # seconds
    f_number: float | None = None
    focal_length: float | None = None  # mm


@dataclass(frozen=True)
class PreparedPhoto:
    """A baseline JPEG (SOF0, 8-bit, APPn/COM removed) and what DICOM needs to describe it."""

    jpeg: bytes
    rows: int
    columns: int
    samples_per_pixel: int  # 3, or 1 for greyscale
    photometric: str  # "YBR_FULL_422" or "MONOCHROME2"
    icc_profile: bytes | None
    derived: bool  # True when the pixels were decoded and re-encoded
    derivation_description: str  # "" unless derived
    lossy_ratios: tuple[str, ...]  # one per lossy JPEG encoding, in order (DS strings)
    exif: ExifInfo = field(default_factory=ExifInfo)
    source_content_type: str = "image/jpeg"

    @property
    def lossy_ratio(self) -> str | None:
        """Compression ratio of the JPEG as stored (the last lossy step)."""
        return self.lossy_ratios[-1] if self.lossy_ratios else None


# -- EXIF ------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")
_EXIF_DT = re.compile(r"^(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_EXIF_OFFSET = re.compile(r"^([+-])(\d{2}):?(\d{2})$")


def _text(value: Any, limit: int = 64) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return ""
    value = value.split("\x00", 1)[0]
    return " ".join(_CONTROL.sub(" ", value).split())[:limit].strip()


def _positive(value: Any) -> float | None:
    if isinstance(value, tuple) and len(value) == 2:  # (num, den) from some writers
        value = value[0] / value[1] if value[1] else math.nan
    try:
        f = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _exif_datetime(value: Any, offset: Any, subsec: Any) -> datetime | None:
    text = _text(value, 32)
    m = _EXIF_DT.match(text)
    if not m:
        return None
    try:
        dt = datetime(*(int(g) for g in m.groups()))
    except ValueError:  # 0000:00:00 00:00:00 and friends
        return None
    digits = re.sub(r"\D", "", _text(subsec, 16))
    if digits:
        dt = dt.replace(microsecond=int((digits + "000000")[:6]))
    om = _EXIF_OFFSET.match(_text(offset, 16))
    if om:
        delta = timedelta(hours=int(om.group(2)), minutes=int(om.group(3)))
        if delta < timedelta(hours=24):
            dt = dt.replace(tzinfo=timezone(-delta if om.group(1) == "-" else delta))
    return dt


def read_exif(tiff: bytes | None) -> ExifInfo:
    """ExifInfo from an EXIF (TIFF) block; empty when absent or unreadable (EXIF is advisory:
    a broken block never rejects a photo)."""
    if not tiff:
        return ExifInfo()
    try:
        exif = Image.Exif()
        exif.load(tiff)
        sub = exif.get_ifd(0x8769)  # Exif IFD
        return ExifInfo(
            datetime_original=_exif_datetime(sub.get(0x9003), sub.get(0x9011), sub.get(0x9291)),
            make=_text(exif.get(0x010F)),
            model=_text(exif.get(0x0110)),
            exposure_time=_positive(sub.get(0x829A)),
            f_number=_positive(sub.get(0x829D)),
            focal_length=_positive(sub.get(0x920A)),
        )
    except Exception:  # noqa: BLE001 - any malformation in optional metadata
        return ExifInfo()


# -- helpers ---------------------------------------------------------------------------------

def _ratio(rows: int, columns: int, samples: int, compressed: int) -> str:
    ratio = rows * columns * samples / max(compressed, 1)
    return f"{ratio:.2f}"[:16]


def _check_size(frame: jp.JpegFrame, max_pixels: int, min_side: int) -> None:
    if frame.pixel_count > max_pixels:
        raise MediaError(TOO_MANY_PIXELS, f"image has {frame.pixel_count} pixels, more than "
                                          f"the limit of {max_pixels}")
    if min(frame.rows, frame.columns) < min_side:
        raise MediaError(TOO_SMALL, f"image is {frame.columns}x{frame.rows} pixels; each side "
                                    f"must be at least {min_side}")


def _photometric(samples: int) -> str:
    return "MONOCHROME2" if samples == 1 else "YBR_FULL_422"


def _reasons(info: jp.JpegInfo) -> list[str]:
    f = info.frame
    out = []
    if info.orientation != 1:
        out.append(f"rotated/flipped upright from EXIF orientation {info.orientation}")
    if f.precision != 8:
        out.append(f"{f.precision}-bit source")
    if f.is_progressive:
        out.append("progressive source")
    elif f.sof_marker != jp.SOF0:
        out.append(f"non-baseline source (SOF{f.sof_marker - 0xC0})")
    if info.color_space in ("CMYK", "YCCK"):
        out.append(f"{info.color_space} converted to RGB")
    elif info.color_space == "RGB":
        out.append("RGB-coded source")
    elif info.color_space == "YCbCr" and f.subsampling not in _PASS_SUBSAMPLING:
        out.append(f"chroma subsampling {f.subsampling} changed to 4:2:0")
    elif info.color_space not in ("GRAY", "YCbCr"):
        out.append(f"{f.components}-component source")
    return out


def _srgb_profile() -> bytes | None:
    try:
        from PIL import ImageCms

        return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    except Exception:  # noqa: BLE001 - Pillow built without LittleCMS
        return None


def _cmyk_to_rgb(im: Image.Image, icc: bytes | None) -> tuple[Image.Image, bytes | None]:
    """CMYK → RGB through the embedded CMYK profile when there is one (to sRGB, the profile
    then recorded); Pillow's plain conversion otherwise (no profile recorded)."""
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            if src.profile.xcolor_space.strip() == "CMYK":
                srgb = ImageCms.createProfile("sRGB")
                out = ImageCms.profileToProfile(
                    im, src, srgb, renderingIntent=ImageCms.Intent.PERCEPTUAL, outputMode="RGB")
                if out is not None:
                    return out, _srgb_profile()
        except Exception:  # noqa: BLE001 - unusable profile: fall back to the plain formula
            pass
    return im.convert("RGB"), None


def _encode_image(im: Image.Image) -> bytes:
    """Baseline JPEG (SOF0), 4:2:0, no metadata."""
    if im.mode not in ("RGB", "L"):
        im = im.convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=JPEG_QUALITY, subsampling=_SUBSAMPLING_420,
            progressive=False, optimize=False)
    return buf.getvalue()


def _decode(data: bytes, max_pixels: int, *, load: bool = True) -> Image.Image:
    """Decode with Pillow (or, with load=False, only let it parse the headers: ~0.2 ms), its
    decompression-bomb warning turned into an error."""
    with warnings.catch_warnings():
        if max_pixels <= (Image.MAX_IMAGE_PIXELS or max_pixels):
            warnings.simplefilter("error", Image.DecompressionBombWarning)
        else:  # our own (checked) limit is above Pillow's: its warning is not ours to raise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=["JPEG"])
            if load:
                im.load()
            return im
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise MediaError(TOO_MANY_PIXELS, "image has more pixels than allowed") from None
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
            raise MediaError(NOT_DECODABLE,
                             f"JPEG could not be decoded ({type(exc).__name__})") from None


# -- JPEG ------------------------------------------------------------------------------------

def _prepare_jpeg(data: bytes, *, max_pixels: int, min_side: int) -> PreparedPhoto:
    if sniff_content_type(data) != "image/jpeg":
        raise MediaError(TYPE_MISMATCH, "the bytes are not a JPEG image")
    # Headers first: size limits before any scan is read or decoded.
    head = jp.read_headers(data)
    _check_size(head.frame, max_pixels, min_side)
    info = jp.inspect_jpeg(data)  # whole stream: truncation, EOI, scans
    frame = info.frame
    exif = read_exif(info.exif)
    samples = 1 if info.color_space == "GRAY" else 3
    original_size = _stripped_size(data, info)
    original_ratio = _ratio(frame.rows, frame.columns, frame.components, original_size)

    reasons = _reasons(info)
    if not reasons:
        # No pixel decode (a 12 MP decode costs ~80 ms, even a 1/8-scale one ~25 ms): our walk
        # checked the marker structure up to EOI; Pillow's header parse cross-checks the rest.
        _decode(data, max_pixels, load=False)
        out = jp.strip_app_segments(data, info)
        return PreparedPhoto(
            jpeg=out, rows=frame.rows, columns=frame.columns, samples_per_pixel=samples,
            photometric=_photometric(samples), icc_profile=info.icc_profile, derived=False,
            derivation_description="", lossy_ratios=(_ratio(frame.rows, frame.columns,
                                                            samples, len(out)),),
            exif=exif, source_content_type="image/jpeg")

    if frame.precision != 8:
        raise MediaError(NOT_DECODABLE, f"{frame.precision}-bit JPEG cannot be decoded here")
    im = _decode(data, max_pixels)
    icc = info.icc_profile
    if im.mode == "CMYK":
        im, icc = _cmyk_to_rgb(im, icc)
    elif im.mode not in ("RGB", "L"):
        im = im.convert("RGB")
    method = _TRANSPOSE.get(info.orientation)
    if method is not None:
        im = im.transpose(method)
    return _from_image(im, icc=icc, exif=exif, reasons=reasons,
                       previous_ratios=(original_ratio,), source_content_type="image/jpeg")


def _stripped_size(data: bytes, info: jp.JpegInfo) -> int:
    """Bytes of the stream without metadata segments (for the original compression ratio)."""
    meta = sum(s.end - s.offset for s in info.segments
               if s.marker == jp.COM or 0xE0 <= s.marker <= 0xEF)
    return max(info.end - meta, 1)


def _from_image(im: Image.Image, *, icc: bytes | None, exif: ExifInfo, reasons: list[str],
                previous_ratios: tuple[str, ...], source_content_type: str) -> PreparedPhoto:
    """Encode a decoded, upright image as baseline JPEG; the PreparedPhoto for it."""
    encoded = _encode_image(im)
    info = jp.inspect_jpeg(encoded)
    out = jp.strip_app_segments(encoded, info)
    f = info.frame
    samples = 1 if info.color_space == "GRAY" else 3
    if not f.is_baseline or (samples == 3 and f.subsampling not in _PASS_SUBSAMPLING):
        raise MediaError(NOT_DECODABLE, "re-encoding did not give a baseline JPEG")
    text = "; ".join(reasons)
    description = (f"Re-encoded as baseline JPEG (quality {JPEG_QUALITY}, 4:2:0): {text}"
                   if text else f"Encoded as baseline JPEG (quality {JPEG_QUALITY}, 4:2:0)")
    return PreparedPhoto(
        jpeg=out, rows=f.rows, columns=f.columns, samples_per_pixel=samples,
        photometric=_photometric(samples), icc_profile=icc, derived=True,
        derivation_description=description[:1024],
        lossy_ratios=(*previous_ratios, _ratio(f.rows, f.columns, samples, len(out))),
        exif=exif, source_content_type=source_content_type)


_Preparer = Callable[..., PreparedPhoto]
_PREPARERS: dict[str, _Preparer] = {
    "image/jpeg": _prepare_jpeg,
}
SUPPORTED_TYPES = tuple(_PREPARERS)


def check_photo(data: bytes, content_type: str, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                min_side: int = 0) -> None:
    """The cheap checks run at intake, before 201 (≈1 ms for 12 MP): the type is one we take,
    the bytes are of that type, the header's size is within limits, the stream is complete.
    Decoding and re-encoding happen later, in the worker (prepare_photo)."""
    kind = normalize_content_type(content_type)
    if kind not in _PREPARERS:
        raise MediaError(UNSUPPORTED_TYPE, "media type is not supported for photos; supported: "
                                           + ", ".join(SUPPORTED_TYPES))
    if not data:
        raise MediaError(NOT_DECODABLE, "no image data")
    if kind == "image/jpeg":
        if sniff_content_type(data) != "image/jpeg":
            raise MediaError(TYPE_MISMATCH, "the bytes are not a JPEG image")
        _check_size(jp.read_headers(data).frame, max_pixels, min_side)
        jp.inspect_jpeg(data)
        _decode(data, max_pixels, load=False)


def prepare_photo(data: bytes, content_type: str, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                  min_side: int = 0) -> PreparedPhoto:
    """Check and prepare photo bytes declared as `content_type` for a VL Photographic Image.

    Raises MediaError: unsupported-type (no preparer for the type), type-mismatch (the bytes
    are not of the declared type), too-many-pixels / too-small (from the header, before any
    decode), truncated, not-decodable."""
    kind = normalize_content_type(content_type)
    preparer = _PREPARERS.get(kind)
    if preparer is None:
        raise MediaError(UNSUPPORTED_TYPE, "media type is not supported for photos; supported: "
                                           + ", ".join(SUPPORTED_TYPES))
    if not data:
        raise MediaError(NOT_DECODABLE, "no image data")
    return preparer(bytes(data), max_pixels=max_pixels, min_side=min_side)
