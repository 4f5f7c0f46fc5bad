"""Photo bytes → a baseline JPEG ready for DICOM (JPEG Baseline, 1.2.840.10008.1.2.4.50).

Accepted types (SUPPORTED_TYPES): image/jpeg, image/png, image/heic, image/heif, image/webp.

JPEG: a baseline 8-bit YCbCr 4:2:0/4:2:2 (or greyscale) JPEG that needs no rotation passes
through: its metadata segments are removed at byte level and the compressed pixels are untouched
(no decode). Anything else — EXIF orientation 2-8, progressive or other non-baseline processes,
CMYK/YCCK, RGB-coded or 4:4:4 colour (the VL Photographic IOD takes only YBR_FULL_422) — is
decoded, turned upright and re-encoded as baseline JPEG, and marked derived.

PNG and WebP (still images only) are decoded with Pillow, HEIC/HEIF with pillow-heif (primary
image only: no depth, auxiliary or thumbnail images; sequences are refused). Alpha is flattened
onto white, 16-bit samples are scaled to 8 bits, palettes become RGB, greyscale stays
MONOCHROME2. The ICC profile is kept; every other metadata block (EXIF, XMP, text chunks) is
dropped because the JPEG is encoded from pixels only. EXIF is read for ExifInfo and, for PNG
and WebP, its orientation is applied; HEIF is turned upright by the decoder (irot/imir) and
never rotated a second time.

Sizes are checked from the header (JPEG frame header, PNG IHDR, WebP VP8/VP8L/VP8X, HEIF
ispe via libheif's header parse) before anything is decoded, and Pillow's
DecompressionBombWarning is an error for every format. After preparing, an image whose
luminance standard deviation (on a reduced image) is below `uniform_stddev` is refused as
blank / single-coloured (code uniform-image).
"""

from __future__ import annotations

import io
import math
import re
import struct
import sys
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from PIL import Image, ImageStat

from fhirbridge.media import jpeg as jp
from fhirbridge.media.errors import (
    NOT_DECODABLE,
    TOO_MANY_PIXELS,
    TOO_SMALL,
    TRUNCATED,
    TYPE_MISMATCH,
    UNIFORM,
    UNSUPPORTED_TYPE,
    MediaError,
)
from fhirbridge.media.sniff import content_type_matches, normalize_content_type, sniff_content_type

__all__ = ["ExifInfo", "PreparedPhoto", "prepare_photo", "check_photo", "read_exif",
           "DEFAULT_MAX_DECODED_BYTES", "DEFAULT_MAX_PIXELS", "DEFAULT_UNIFORM_STDDEV",
           "JPEG_QUALITY", "SUPPORTED_TYPES"]

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's MAX_IMAGE_PIXELS default
DEFAULT_MAX_DECODED_BYTES = 512 * 1024 * 1024  # media.max_decoded_bytes
DEFAULT_UNIFORM_STDDEV = 2.0  # luminance standard deviation (0-255 scale) below this: uniform
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


def _check_dims(columns: int, rows: int, max_pixels: int, min_side: int) -> None:
    """Size limits from a header (never from decoded pixels)."""
    pixels = columns * rows
    if pixels > max_pixels:
        raise MediaError(TOO_MANY_PIXELS, f"image has {pixels} pixels, more than "
                                          f"the limit of {max_pixels}")
    if min(rows, columns) < min_side:
        raise MediaError(TOO_SMALL, f"image is {columns}x{rows} pixels; each side "
                                    f"must be at least {min_side}")


def _check_decoded(columns: int, rows: int, bands: int, bytes_per_sample: int,
                   max_decoded_bytes: int) -> None:
    """Decode memory from a header, before decoding: width x height x bands x bytes per
    sample. A 700 KB 16-bit PNG of 9000x9900 holds 178 MB of samples per band."""
    need = columns * rows * bands * bytes_per_sample
    if need > max_decoded_bytes:
        raise MediaError(TOO_MANY_PIXELS, f"decoding the image would take {need // 2**20} MiB, "
                         f"more than the limit of {max_decoded_bytes // 2**20} MiB "
                         "(media.max_decoded_bytes)")


def _check_size(frame: jp.JpegFrame, max_pixels: int, min_side: int,
                max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> None:
    _check_dims(frame.columns, frame.rows, max_pixels, min_side)
    _check_decoded(frame.columns, frame.rows, frame.components, 2 if frame.precision > 8 else 1,
                   max_decoded_bytes)


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


class _BombGuard:
    """Pillow's DecompressionBombWarning as an error while active (when our own limit is not
    above Pillow's: then its warning is not ours to raise; its DecompressionBombError, at 2x
    its limit, still is)."""

    def __init__(self, max_pixels: int) -> None:
        self._max_pixels = max_pixels
        self._cm = warnings.catch_warnings()

    def __enter__(self) -> None:
        self._cm.__enter__()
        if self._max_pixels <= (Image.MAX_IMAGE_PIXELS or self._max_pixels):
            warnings.simplefilter("error", Image.DecompressionBombWarning)
        else:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)


_BOMB = (Image.DecompressionBombWarning, Image.DecompressionBombError)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, MemoryError, RuntimeError,
                  zlib.error, struct.error)


def _decode_failed(label: str, exc: BaseException) -> MediaError:
    # Only the exception's class name: its message may quote bytes of the file.
    if isinstance(exc, OSError) and "truncated" in str(exc).lower():
        return MediaError(TRUNCATED, f"{label} data ends before the image is complete")
    return MediaError(NOT_DECODABLE, f"{label} could not be decoded ({type(exc).__name__})")


def _decode(data: bytes, max_pixels: int, *, load: bool = True,
            formats: tuple[str, ...] = ("JPEG",), label: str = "JPEG") -> Image.Image:
    """Decode with Pillow (or, with load=False, only let it parse the headers: ~0.2 ms), its
    decompression-bomb warning turned into an error."""
    with _BombGuard(max_pixels):
        try:
            im = Image.open(io.BytesIO(data), formats=list(formats))
            if load:
                im.load()
            return im
        except _BOMB:
            raise MediaError(TOO_MANY_PIXELS, "image has more pixels than allowed") from None
        except _DECODE_ERRORS as exc:
            raise _decode_failed(label, exc) from None


# -- uniform (blank) images -----------------------------------------------------------------

_UNIFORM_TEXT = "image is blank or a single colour"
_STAT_SIDE = 512  # the reduced image used for the luminance statistics: about this long side


def _luma_stddev(im: Image.Image) -> float:
    """Standard deviation of the luminance (0-255) of a decoded RGB/L image, on a box-reduced
    copy (about 1/8 scale for a 12 MP photo: a few ms, no full-size conversion)."""
    factor = max(1, max(im.size) // _STAT_SIDE)
    small = im.reduce(factor) if factor > 1 else im
    if small.mode != "L":
        small = small.convert("L")
    return float(ImageStat.Stat(small).stddev[0])


def _jpeg_luma_stddev(data: bytes, columns: int, rows: int, max_pixels: int) -> float:
    """The same for a JPEG left undecoded: libjpeg's DCT-scaled 1/8 decode of the luminance
    only (draft), ~20 ms for 12 MP instead of ~80 ms for a full decode."""
    with _BombGuard(max_pixels):
        try:
            im = Image.open(io.BytesIO(data), formats=["JPEG"])
            im.draft("L", (max(columns // 8, 1), max(rows // 8, 1)))
            im.load()
        except _BOMB:
            raise MediaError(TOO_MANY_PIXELS, "image has more pixels than allowed") from None
        except _DECODE_ERRORS as exc:
            raise _decode_failed("JPEG", exc) from None
    return _luma_stddev(im)


# (share of the scan's bytes decoded, share of the rows looked at): cheap first, then more
_EARLY_TIERS = ((16, 20), (4, 5))


def _jpeg_not_uniform_early(data: bytes, info: jp.JpegInfo, uniform_stddev: float,
                            max_pixels: int) -> bool:
    """True when the top of a single-scan JPEG already proves the whole image is not
    uniform, after decoding only the first 1/16 (then 1/4) of its entropy-coded data at 1/8
    scale.

    The total variance of an image is at least its band's share times the band's variance
    (within-group variance only counts part of the total), so a band of 1/k of the rows
    whose luminance std-dev is >= sqrt(k) x the threshold proves the image's std-dev >= the
    threshold. For an evenly coded (blank-like) image 1/16 of the bytes covers about 1/16 of
    its rows, so the top 1/20 was decoded; where the top is so busy that it was not, the rows
    the decoder filled repeat the last decoded block, and such an image is not blank.
    Otherwise (sky at the top, a document's margin) the caller does the full 1/8-scale
    decode."""
    sos = next((seg for seg in info.segments if seg.marker == jp.SOS), None)
    if sos is None or info.scans != 1 or not info.end:
        return False
    scan_len = info.end - 2 - sos.end
    if scan_len < 64 * 1024:  # small files: the full decode is cheap anyway
        return False
    rows, columns = info.frame.rows, info.frame.columns
    for head_share, band_share in _EARLY_TIERS:
        head = bytes(data[:sos.end + scan_len // head_share]) + b"\xff\xd9"
        with _BombGuard(max_pixels):
            try:
                im = Image.open(io.BytesIO(head), formats=["JPEG"])
                im.draft("L", (max(columns // 8, 1), max(rows // 8, 1)))
                im.load()
            except Exception:  # noqa: BLE001 - the full decode decides (and reports)
                return False
        band = im.crop((0, 0, im.width, max(1, im.height // band_share)))
        if band.mode != "L":
            band = band.convert("L")
        if float(ImageStat.Stat(band).stddev[0]) >= uniform_stddev * band_share ** 0.5:
            return True
    return False


def _check_uniform(stddev: float, uniform_stddev: float) -> None:
    if uniform_stddev > 0 and stddev < uniform_stddev:
        raise MediaError(UNIFORM, _UNIFORM_TEXT)


# -- JPEG ------------------------------------------------------------------------------------

def _check_jpeg(data: bytes, *, max_pixels: int, min_side: int,
                max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> None:
    if sniff_content_type(data) != "image/jpeg":
        raise MediaError(TYPE_MISMATCH, "the bytes are not a JPEG image")
    frame = jp.read_headers(data).frame
    _check_size(frame, max_pixels, min_side, max_decoded_bytes)
    jp.inspect_jpeg(data)
    if frame.precision == 8:  # Pillow (libjpeg-turbo, 8-bit) cross-checks the headers
        _decode(data, max_pixels, load=False)


def _decode_12bit(data: bytes, components: int) -> Image.Image:
    """A 12-bit JPEG (T.81 extended or progressive process, SOF1/SOF2 with P=12) decoded with
    libjpeg (pylibjpeg-libjpeg; Pillow's libjpeg-turbo build reads 8-bit only), scaled to
    8 bits per sample (the top 8 of 12 bits)."""
    try:
        import numpy as np
        from libjpeg import decode
    except ImportError:  # pragma: no cover - a dependency of fhirbridge
        raise MediaError(NOT_DECODABLE, "12-bit JPEG support is not installed") from None
    try:
        arr = decode(data)
    except (RuntimeError, ValueError) as exc:
        raise MediaError(NOT_DECODABLE,
                         f"12-bit JPEG could not be decoded ({type(exc).__name__})") from None
    arr8 = (np.asarray(arr, dtype=np.uint16) >> 4).astype(np.uint8)
    if components == 1 or arr8.ndim == 2:
        return Image.fromarray(arr8.reshape(arr8.shape[:2]), "L")
    return Image.fromarray(arr8[:, :, :3], "RGB")


def _prepare_jpeg(data: bytes, *, max_pixels: int, min_side: int,
                  uniform_stddev: float = DEFAULT_UNIFORM_STDDEV,
                  max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> PreparedPhoto:
    if sniff_content_type(data) != "image/jpeg":
        raise MediaError(TYPE_MISMATCH, "the bytes are not a JPEG image")
    # Headers first: size limits before any scan is read or decoded.
    head = jp.read_headers(data)
    _check_size(head.frame, max_pixels, min_side, max_decoded_bytes)
    info = jp.inspect_jpeg(data)  # whole stream: truncation, EOI, scans
    frame = info.frame
    exif = read_exif(info.exif)
    samples = 1 if info.color_space == "GRAY" else 3
    original_size = _stripped_size(data, info)
    original_ratio = _ratio(frame.rows, frame.columns, frame.components, original_size)

    reasons = _reasons(info)
    if not reasons:
        # No full pixel decode (a 12 MP decode costs ~80 ms): our walk checked the marker
        # structure up to EOI; Pillow's header parse cross-checks the rest. The uniform check
        # needs only a 1/8-scale luminance decode.
        _decode(data, max_pixels, load=False)
        if uniform_stddev > 0 and not _jpeg_not_uniform_early(data, info, uniform_stddev,
                                                               max_pixels):
            _check_uniform(_jpeg_luma_stddev(data, frame.columns, frame.rows, max_pixels),
                           uniform_stddev)
        out = jp.strip_app_segments(data, info)
        return PreparedPhoto(
            jpeg=out, rows=frame.rows, columns=frame.columns, samples_per_pixel=samples,
            photometric=_photometric(samples), icc_profile=info.icc_profile, derived=False,
            derivation_description="", lossy_ratios=(_ratio(frame.rows, frame.columns,
                                                            samples, len(out)),),
            exif=exif, source_content_type="image/jpeg")

    if frame.precision == 12:
        im = _decode_12bit(data, frame.components)
    elif frame.precision != 8:  # 16-bit is lossless (SOF3), not a photo
        raise MediaError(NOT_DECODABLE, f"{frame.precision}-bit JPEG is not accepted")
    else:
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
                       previous_ratios=(original_ratio,), source_content_type="image/jpeg",
                       uniform_stddev=uniform_stddev)


def _stripped_size(data: bytes, info: jp.JpegInfo) -> int:
    """Bytes of the stream without metadata segments (for the original compression ratio)."""
    meta = sum(s.end - s.offset for s in info.segments
               if s.marker == jp.COM or 0xE0 <= s.marker <= 0xEF)
    return max(info.end - meta, 1)


def _from_image(im: Image.Image, *, icc: bytes | None, exif: ExifInfo, reasons: list[str],
                previous_ratios: tuple[str, ...], source_content_type: str,
                uniform_stddev: float = 0.0) -> PreparedPhoto:
    """Encode a decoded, upright RGB/L image as baseline JPEG; the PreparedPhoto for it.
    With uniform_stddev > 0 the image is first checked for being blank (before encoding)."""
    if im.mode not in ("RGB", "L"):
        im = im.convert("RGB")
    if uniform_stddev > 0:
        _check_uniform(_luma_stddev(im), uniform_stddev)
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


# -- decoded sources (PNG, WebP, HEIF): shared steps -----------------------------------------

def _tiff_block(raw: Any) -> bytes | None:
    """An EXIF block as read_exif wants it (TIFF header first): Pillow and pillow-heif give it
    with or without the JPEG-style "Exif\0\0" prefix."""
    if not isinstance(raw, (bytes, bytearray)) or not raw:
        return None
    raw = bytes(raw)
    if raw.startswith(b"Exif\x00\x00"):
        raw = raw[6:]
    return raw or None


def _icc_for(icc: Any, samples: int) -> bytes | None:
    """The embedded ICC profile when it describes what we store (an RGB profile for colour, a
    GRAY profile for greyscale); anything else (CMYK, Lab, a mismatch, junk) is dropped."""
    if not isinstance(icc, (bytes, bytearray)) or len(icc) < 128:
        return None
    space = bytes(icc[16:20])
    if (samples == 3 and space == b"RGB ") or (samples == 1 and space == b"GRAY"):
        return bytes(icc)
    return None


def _flatten(im: Image.Image, grey: bool) -> Image.Image:
    """Composite an image with alpha onto white."""
    if im.mode in ("LA", "La") and grey:
        if im.mode == "La":
            im = im.convert("LA")
        base = Image.new("L", im.size, 255)
        base.paste(im.getchannel("L"), mask=im.getchannel("A"))
        return base
    if im.mode != "RGBA":
        im = im.convert("RGBA")
    base = Image.new("RGB", im.size, (255, 255, 255))
    base.paste(im.convert("RGB"), mask=im.getchannel("A"))
    return base.convert("L") if grey else base


# 16-bit modes → Pillow's raw unpacker that keeps each sample's high byte (v >> 8)
_HIGH_BYTE = {"I;16": "L;16", "I;16L": "L;16", "I;16B": "L;16B",
              "I;16N": "L;16" if sys.byteorder == "little" else "L;16B"}
_STRIP_ROWS = 256


def _high_bytes(im: Image.Image, rawmode: str) -> Image.Image:
    """A 16-bit greyscale image as 8-bit (the high byte of each sample), a strip of rows at
    a time: the extra memory is the 8-bit result and one strip, not a 32-bit copy (a
    9000x9900 16-bit PNG: +89 MB instead of +700 MB)."""
    out = Image.new("L", im.size)
    for top in range(0, im.height, _STRIP_ROWS):
        box = (0, top, im.width, min(im.height, top + _STRIP_ROWS))
        strip = im.crop(box)
        out.paste(Image.frombytes("L", strip.size, strip.tobytes(), "raw", rawmode), box[:2])
    return out


def _to_8bit_rgb_or_l(im: Image.Image, *, grey: bool, reasons: list[str]) -> Image.Image:
    """RGB or L, 8 bits per sample: 16-bit scaled (not clipped), palettes expanded, alpha
    (including tRNS/palette transparency) flattened onto white. `grey`: the source is
    greyscale (stays L, MONOCHROME2)."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow's convert("L") clips 16-bit values at 255: scale by 1/256 instead.
        trns = im.info.get("transparency")
        if mode in _HIGH_BYTE and not isinstance(trns, int):
            out = _high_bytes(im, _HIGH_BYTE[mode])  # no 32-bit copy: 1 byte per pixel more
        else:
            wide = im.convert("I")
            out = wide.point(lambda v: v * (1 / 256)).convert("L")
        reasons.append("16-bit samples reduced to 8 bits")
        if isinstance(trns, int):  # tRNS: one grey value is fully transparent
            from PIL import ImageMath

            opaque = ImageMath.lambda_eval(lambda a: (a["w"] != trns) * 255, w=wide)
            base = Image.new("L", im.size, 255)
            base.paste(out, mask=opaque.convert("L"))
            out = base
            reasons.append("transparency flattened onto white")
        return out if grey else out.convert("RGB")
    if mode == "1":
        return im.convert("L")
    has_trns = im.info.get("transparency") is not None
    if mode in ("P", "PA"):
        if mode == "PA" or has_trns:
            im = im.convert("RGBA")
        else:
            im = im.convert("RGB")
        reasons.append("palette expanded")
    elif mode == "L" and has_trns:
        im = im.convert("LA")
    elif mode == "RGB" and has_trns:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "RGBa", "LA", "La"):
        im = _flatten(im, grey)
        reasons.append("transparency flattened onto white")
    elif im.mode not in ("RGB", "L"):
        im = im.convert("RGB")
    if grey and im.mode == "RGB":
        im = im.convert("L")
    return im


def _orient(im: Image.Image, tiff: bytes | None, reasons: list[str]) -> Image.Image:
    orientation = jp._tiff_orientation(tiff) if tiff else 1  # noqa: SLF001 - same package
    method = _TRANSPOSE.get(orientation)
    if method is not None:
        im = im.transpose(method)
        reasons.append(f"rotated/flipped upright from EXIF orientation {orientation}")
    return im


def _unsupported(text: str) -> MediaError:
    return MediaError(UNSUPPORTED_TYPE, f"{text}; supported: " + ", ".join(SUPPORTED_TYPES))


# -- PNG -------------------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_PNG_MAX_HEADER_CHUNKS = 4096  # chunks before the first IDAT


@dataclass(frozen=True)
class _PngHeader:
    columns: int
    rows: int
    bit_depth: int
    color_type: int  # 0 grey, 2 RGB, 3 palette, 4 grey+alpha, 6 RGBA

    @property
    def grey(self) -> bool:
        return self.color_type in (0, 4)

    @property
    def bands(self) -> int:
        """Samples per pixel once decoded (a palette expands to RGB)."""
        return {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}[self.color_type]


def _png_header(data: bytes) -> _PngHeader:
    """IHDR (the first chunk, CRC checked): size, bit depth, colour type. Reads 33 bytes."""
    if not data.startswith(_PNG_SIGNATURE):
        raise MediaError(TYPE_MISMATCH, "the bytes are not a PNG image")
    if len(data) < 33:
        raise MediaError(TRUNCATED, "PNG data ends inside the header")
    length, ctype = struct.unpack(">I4s", data[8:16])
    if ctype != b"IHDR" or length != 13:
        raise MediaError(NOT_DECODABLE, "PNG does not start with a valid IHDR chunk")
    body = data[16:29]
    if zlib.crc32(data[12:29]) & 0xFFFFFFFF != struct.unpack(">I", data[29:33])[0]:
        raise MediaError(NOT_DECODABLE, "PNG header chunk has a bad CRC")
    columns, rows, depth, color, compression, filt, interlace = struct.unpack(">IIBBBBB", body)
    if not (0 < columns < 2**31 and 0 < rows < 2**31):
        raise MediaError(NOT_DECODABLE, "PNG header has an invalid image size")
    if depth not in _PNG_DEPTHS.get(color, ()) or compression or filt or interlace > 1:
        raise MediaError(NOT_DECODABLE, "PNG header has an invalid bit depth or colour type")
    return _PngHeader(columns, rows, depth, color)


def _png_structure(data: bytes) -> None:
    """Cheap structure checks without inflating anything: the chunks before the first IDAT
    (an animated PNG's acTL is refused), an IDAT, and the IEND chunk (else truncated)."""
    pos, n, chunks = 8, len(data), 0
    while True:
        if pos + 8 > n:
            raise MediaError(TRUNCATED, "PNG data ends before the image data")
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        if length >= 2**31 or not ctype.isalpha():
            raise MediaError(NOT_DECODABLE, "PNG has an invalid chunk")
        if pos + 12 + length > n:
            raise MediaError(TRUNCATED, "PNG data ends inside a chunk")
        if ctype == b"acTL" and length >= 8 and struct.unpack(">I", data[pos + 8:pos + 12])[0] > 1:
            raise _unsupported("animated PNG is not supported for photos")
        if ctype == b"IDAT":
            break
        if ctype == b"IEND":
            raise MediaError(NOT_DECODABLE, "PNG has no image data")
        chunks += 1
        if chunks > _PNG_MAX_HEADER_CHUNKS:
            raise MediaError(NOT_DECODABLE, "PNG has too many chunks before the image data")
        pos += 12 + length
    if data.rfind(_PNG_IEND, pos) < 0:
        raise MediaError(TRUNCATED, "PNG data ends before the IEND chunk")


def _check_png(data: bytes, *, max_pixels: int, min_side: int,
               max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> None:
    if sniff_content_type(data) != "image/png":
        raise MediaError(TYPE_MISMATCH, "the bytes are not a PNG image")
    head = _png_header(data)
    _check_dims(head.columns, head.rows, max_pixels, min_side)
    _check_decoded(head.columns, head.rows, head.bands, 2 if head.bit_depth == 16 else 1,
                   max_decoded_bytes)
    _png_structure(data)


def _prepare_png(data: bytes, *, max_pixels: int, min_side: int,
                 uniform_stddev: float = DEFAULT_UNIFORM_STDDEV,
                 max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> PreparedPhoto:
    _check_png(data, max_pixels=max_pixels, min_side=min_side,  # header first: no decode yet
               max_decoded_bytes=max_decoded_bytes)
    head = _png_header(data)
    im = _decode(data, max_pixels, formats=("PNG",), label="PNG")
    if (im.width, im.height) != (head.columns, head.rows):
        raise MediaError(NOT_DECODABLE, "PNG decoded to a size other than its header's")
    reasons = ["PNG source"]
    info = dict(im.info)  # after load(): an eXIf chunk after IDAT is included
    tiff = _tiff_block(info.get("exif"))
    im = _to_8bit_rgb_or_l(im, grey=head.grey, reasons=reasons)
    im = _orient(im, tiff, reasons)
    samples = 1 if im.mode == "L" else 3
    return _from_image(im, icc=_icc_for(info.get("icc_profile"), samples),
                       exif=read_exif(tiff), reasons=reasons, previous_ratios=(),
                       source_content_type="image/png", uniform_stddev=uniform_stddev)


# -- WebP ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _WebpHeader:
    columns: int
    rows: int
    animated: bool


def _webp_header(data: bytes) -> _WebpHeader:
    """The canvas size from the first chunk (VP8X, VP8 or VP8L) and the RIFF length; reads
    30 bytes."""
    if len(data) < 12 or data[0:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise MediaError(TYPE_MISMATCH, "the bytes are not a WebP image")
    if len(data) < 30:
        raise MediaError(TRUNCATED, "WebP data ends inside the header")
    fourcc = data[12:16]
    if fourcc == b"VP8X":
        flags = data[20]
        columns = 1 + int.from_bytes(data[24:27], "little")
        rows = 1 + int.from_bytes(data[27:30], "little")
        return _WebpHeader(columns, rows, animated=bool(flags & 0x02))
    if fourcc == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise MediaError(NOT_DECODABLE, "WebP has an invalid VP8 frame header")
        columns, rows = struct.unpack("<HH", data[26:30])
        columns, rows = columns & 0x3FFF, rows & 0x3FFF
    elif fourcc == b"VP8L":
        if data[20] != 0x2F:
            raise MediaError(NOT_DECODABLE, "WebP has an invalid VP8L header")
        bits = struct.unpack("<I", data[21:25])[0]
        columns, rows = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    else:
        raise MediaError(NOT_DECODABLE, "WebP has no image chunk")
    if not columns or not rows:
        raise MediaError(NOT_DECODABLE, "WebP header has an invalid image size")
    return _WebpHeader(columns, rows, animated=False)


def _check_webp(data: bytes, *, max_pixels: int, min_side: int,
                max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> _WebpHeader:
    if sniff_content_type(data) != "image/webp":
        raise MediaError(TYPE_MISMATCH, "the bytes are not a WebP image")
    head = _webp_header(data)
    if head.animated:
        raise _unsupported("animated WebP is not supported for photos")
    _check_dims(head.columns, head.rows, max_pixels, min_side)
    _check_decoded(head.columns, head.rows, 4, 1, max_decoded_bytes)  # RGBA at most, 8-bit
    riff_end = 8 + struct.unpack("<I", data[4:8])[0]
    if riff_end > len(data):
        raise MediaError(TRUNCATED, "WebP data ends before the end of its RIFF container")
    return head


def _prepare_webp(data: bytes, *, max_pixels: int, min_side: int,
                  uniform_stddev: float = DEFAULT_UNIFORM_STDDEV,
                  max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> PreparedPhoto:
    head = _check_webp(data, max_pixels=max_pixels, min_side=min_side,
                       max_decoded_bytes=max_decoded_bytes)
    im = _decode(data, max_pixels, formats=("WEBP",), label="WebP")
    if getattr(im, "n_frames", 1) > 1 or getattr(im, "is_animated", False):
        raise _unsupported("animated WebP is not supported for photos")
    if (im.width, im.height) != (head.columns, head.rows):
        raise MediaError(NOT_DECODABLE, "WebP decoded to a size other than its header's")
    reasons = ["WebP source"]
    info = dict(im.info)
    tiff = _tiff_block(info.get("exif"))
    im = _to_8bit_rgb_or_l(im, grey=False, reasons=reasons)
    im = _orient(im, tiff, reasons)
    samples = 1 if im.mode == "L" else 3
    return _from_image(im, icc=_icc_for(info.get("icc_profile"), samples),
                       exif=read_exif(tiff), reasons=reasons, previous_ratios=(),
                       source_content_type="image/webp", uniform_stddev=uniform_stddev)


# -- HEIC / HEIF -----------------------------------------------------------------------------

_HEIF_STILL = frozenset({"image/heic", "image/heif"})
_HEIF_SEQUENCE = frozenset({"image/heic-sequence", "image/heif-sequence"})


def _heif_boxes(data: bytes) -> None:
    """Walk the top-level ISO BMFF boxes (ftyp, meta, mdat, ...): a file cut short ends inside
    one (truncated). Reads only box headers."""
    pos, n, boxes = 0, len(data), 0
    while pos < n:
        if pos + 8 > n:
            raise MediaError(TRUNCATED, "HEIF data ends inside a box header")
        size = struct.unpack(">I", data[pos:pos + 4])[0]
        header = 8
        if size == 1:
            if pos + 16 > n:
                raise MediaError(TRUNCATED, "HEIF data ends inside a box header")
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
            header = 16
        elif size == 0:  # to the end of the file
            size = n - pos
        if size < header:
            raise MediaError(NOT_DECODABLE, "HEIF has an invalid box size")
        if pos + size > n:
            raise MediaError(TRUNCATED, "HEIF data ends inside a box")
        pos += size
        boxes += 1
        if boxes > 10_000:
            raise MediaError(NOT_DECODABLE, "HEIF has too many top-level boxes")


def _heif_kind(data: bytes, declared: str) -> str:
    sniffed = sniff_content_type(data)
    if sniffed in _HEIF_SEQUENCE:
        raise _unsupported("HEIF image sequences are not supported for photos")
    if sniffed not in _HEIF_STILL or not content_type_matches(declared, sniffed):
        raise MediaError(TYPE_MISMATCH, "the bytes are not a HEIC/HEIF image")
    return sniffed


def _open_heif(data: bytes) -> Any:
    """pillow-heif's container parse (no pixel decode): the primary image and its size."""
    try:
        import pillow_heif
    except ImportError:  # pragma: no cover - a dependency in pyproject
        raise MediaError(NOT_DECODABLE, "HEIC/HEIF support is not installed") from None
    try:
        heif = pillow_heif.open_heif(io.BytesIO(data), convert_hdr_to_8bit=True)
        heif.size  # noqa: B018 - the primary image, after its irot/imir transformations
    except _DECODE_ERRORS as exc:
        raise MediaError(NOT_DECODABLE,
                         f"HEIC/HEIF container could not be read ({type(exc).__name__})") from None
    return heif


def _check_heif_size(heif: Any, max_pixels: int, min_side: int,
                     max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> tuple[int, int]:
    """Our limits from the header, then Pillow's bomb rule as for its own formats."""
    columns, rows = heif.size
    _check_dims(columns, rows, max_pixels, min_side)
    # decoded to 8 bits per sample (convert_hdr_to_8bit), RGB or RGBA
    _check_decoded(columns, rows, 4 if getattr(heif, "has_alpha", True) else 3, 1,
                   max_decoded_bytes)
    with _BombGuard(max_pixels):
        try:
            Image._decompression_bomb_check((columns, rows))  # noqa: SLF001 - Image.open's rule
        except _BOMB:
            raise MediaError(TOO_MANY_PIXELS, "image has more pixels than allowed") from None
    return columns, rows


def _check_heif(data: bytes, declared: str, *, max_pixels: int, min_side: int,
                max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> Any:
    _heif_kind(data, declared)
    _heif_boxes(data)
    heif = _open_heif(data)
    _check_heif_size(heif, max_pixels, min_side, max_decoded_bytes)
    return heif


def _prepare_heif(data: bytes, *, declared: str, max_pixels: int, min_side: int,
                  uniform_stddev: float = DEFAULT_UNIFORM_STDDEV,
                  max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> PreparedPhoto:
    kind = _heif_kind(data, declared)
    _heif_boxes(data)
    heif = _open_heif(data)
    columns, rows = _check_heif_size(heif, max_pixels, min_side,  # nothing decoded yet
                                     max_decoded_bytes)
    try:
        primary = heif[heif.primary_index]  # never depth, auxiliary or thumbnail images
        info = dict(primary.info)
        im = primary.to_pillow()  # decodes; irot/imir already applied by libheif
    except _DECODE_ERRORS as exc:
        raise MediaError(NOT_DECODABLE,
                         f"HEIC/HEIF image could not be decoded ({type(exc).__name__})") from None
    if im.size != (columns, rows):
        raise MediaError(NOT_DECODABLE, "HEIC/HEIF decoded to a size other than its header's")
    label = "HEIC" if kind == "image/heic" else "HEIF"
    reasons = [f"{label} source"]
    original = im.info.get("original_orientation")
    if isinstance(original, int) and original != 1:
        # HEIF's irot/imir are authoritative and libheif has applied them; the EXIF tag only
        # repeats them (HEIF says so): applying it too would turn the picture twice.
        reasons.append(f"HEIF transformations applied by the decoder (EXIF orientation "
                       f"{original} not applied again)")
    im = _to_8bit_rgb_or_l(im, grey=im.mode in ("L", "LA", "I;16", "I;16L", "I;16B"),
                           reasons=reasons)
    samples = 1 if im.mode == "L" else 3
    icc = info.get("icc_profile") if info.get("icc_profile_type") != "nclx" else None
    exif = read_exif(_tiff_block(info.get("exif")))  # GPS is never read
    return _from_image(im, icc=_icc_for(icc, samples), exif=exif,
                       reasons=reasons, previous_ratios=(), source_content_type=kind,
                       uniform_stddev=uniform_stddev)


# -- entry points ----------------------------------------------------------------------------

_Preparer = Callable[..., PreparedPhoto]
_PREPARERS: dict[str, _Preparer] = {
    "image/jpeg": _prepare_jpeg,
    "image/png": _prepare_png,
    "image/heic": _prepare_heif,
    "image/heif": _prepare_heif,
    "image/webp": _prepare_webp,
}
SUPPORTED_TYPES: tuple[str, ...] = tuple(_PREPARERS)


def _kind(data: bytes, content_type: str) -> str:
    kind = normalize_content_type(content_type)
    if kind not in _PREPARERS:
        raise MediaError(UNSUPPORTED_TYPE, "media type is not supported for photos; supported: "
                                           + ", ".join(SUPPORTED_TYPES))
    if not data:
        raise MediaError(NOT_DECODABLE, "no image data")
    return kind


def check_photo(data: bytes, content_type: str, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                min_side: int = 0, uniform_stddev: float = DEFAULT_UNIFORM_STDDEV,
                max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> None:
    """The cheap checks run at intake, before 201 (≈1 ms for a 12 MP JPEG): the type is one we
    take, the bytes are of that type (by signature), the header's size is within limits, the
    stream is complete. Nothing is decoded: PNG (IHDR, chunks before IDAT, IEND), WebP
    (VP8/VP8L/VP8X header, RIFF length; animated refused), HEIC/HEIF (top-level boxes,
    libheif's container parse; sequences refused).

    max_pixels: width x height above this is too-many-pixels (decompression bombs).
    max_decoded_bytes: width x height x bands x bytes per sample above this is
        too-many-pixels too (a small 16-bit PNG can decode to gigabytes).
    min_side: width or height below this is too-small (0: no minimum).
    uniform_stddev: accepted so that callers pass the same limits to both functions, but not
        applied here: the blank-image check needs pixels, so it runs in prepare_photo.

    Decoding and re-encoding happen later, in the worker (prepare_photo)."""
    kind = _kind(data, content_type)
    data = bytes(data)
    if kind == "image/jpeg":
        _check_jpeg(data, max_pixels=max_pixels, min_side=min_side,
                    max_decoded_bytes=max_decoded_bytes)
    elif kind == "image/png":
        _check_png(data, max_pixels=max_pixels, min_side=min_side,
                   max_decoded_bytes=max_decoded_bytes)
    elif kind == "image/webp":
        _check_webp(data, max_pixels=max_pixels, min_side=min_side,
                    max_decoded_bytes=max_decoded_bytes)
    else:
        _check_heif(data, kind, max_pixels=max_pixels, min_side=min_side,
                    max_decoded_bytes=max_decoded_bytes)


def prepare_photo(data: bytes, content_type: str, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                  min_side: int = 0, uniform_stddev: float = DEFAULT_UNIFORM_STDDEV,
                  max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> PreparedPhoto:
    """Check and prepare photo bytes declared as `content_type` for a VL Photographic Image.

    max_pixels: width x height above this (from the header, before any decode; Pillow's
        DecompressionBombWarning is an error too) → too-many-pixels.
    max_decoded_bytes: width x height x bands x bytes per sample above this (from the
        header, before any decode) → too-many-pixels.
    min_side: width or height below this → too-small (0: no minimum).
    uniform_stddev: after preparing, a luminance standard deviation (0-255 scale, measured on
        a reduced image) below this → uniform-image ("blank or a single colour"); 0 disables.
        A pass-through JPEG is measured on a 1/8-scale DCT luminance decode (~20 ms at 12 MP).

    Raises MediaError: unsupported-type (no preparer for the type, an animated PNG/WebP, a
    HEIF sequence), type-mismatch (the bytes are not of the declared type), too-many-pixels /
    too-small (from the header, before any decode), truncated, not-decodable,
    uniform-image."""
    kind = _kind(data, content_type)
    data = bytes(data)
    if kind in _HEIF_STILL:
        return _prepare_heif(data, declared=kind, max_pixels=max_pixels, min_side=min_side,
                             uniform_stddev=uniform_stddev, max_decoded_bytes=max_decoded_bytes)
    return _PREPARERS[kind](data, max_pixels=max_pixels, min_side=min_side,
                            uniform_stddev=uniform_stddev, max_decoded_bytes=max_decoded_bytes)
