"""Byte-level JPEG (ITU-T T.81) helpers: markers, frame header, EXIF orientation, ICC profile,
metadata stripping. Nothing here decodes pixels.

A JPEG stream is SOI, marker segments (APPn, COM, DQT, DHT, DRI, SOFn, ...), then one or more
scans (an SOS segment followed by entropy-coded data in which 0xFF is always followed by 0x00
or by an RSTn marker), more tables between scans for progressive files, and EOI. Anything after
EOI (Samsung trailers, Google motion-photo videos, MPF secondary images such as gain maps and
depth maps) is not part of the image.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from fhirbridge.media.errors import NOT_DECODABLE, TRUNCATED, MediaError

__all__ = [
    "JpegFrame", "JpegInfo", "Segment",
    "SOI", "EOI", "SOS", "SOF0", "SOF_MARKERS", "APP0", "APP1", "APP2", "APP14", "COM",
    "iter_segments", "iter_markers", "inspect_jpeg", "read_headers", "read_sof",
    "exif_orientation", "exif_payload", "icc_profile", "strip_app_segments", "is_truncated",
    "scan_data",
]

SOI = 0xD8
EOI = 0xD9
SOS = 0xDA
DQT = 0xDB
DHT = 0xC4
COM = 0xFE
APP0 = 0xE0
APP1 = 0xE1
APP2 = 0xE2
APP14 = 0xEE
SOF0 = 0xC0
# Start-of-frame markers: C0-C3 (Huffman), C5-C7 (differential Huffman), C9-CB (arithmetic),
# CD-CF (differential arithmetic). C4 is DHT, C8 is JPG (reserved), CC is DAC.
SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7,
                         0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7 (SOI/EOI handled apart)

# The next marker inside entropy-coded data: 0xFF followed by neither a stuffed 0x00, nor
# RST0-7, nor another 0xFF (fill byte; the marker starts at the last 0xFF of a run).
_NEXT_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")

_EXIF_ID = b"Exif\x00\x00"
_ICC_ID = b"ICC_PROFILE\x00"
_JFIF_ID = b"JFIF\x00"
_ADOBE_ID = b"Adobe"
_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class Segment:
    """One marker (and its segment, when it has one). `offset` is the 0xFF byte of the marker;
    `end` the offset after the segment (for SOS: after the scan header, before the
    entropy-coded data). `payload` is data[offset + 4:end] for segments with a length."""

    marker: int
    offset: int
    end: int

    @property
    def has_length(self) -> bool:
        return self.marker not in _STANDALONE and self.marker not in (SOI, EOI)

    def payload(self, data: bytes) -> bytes:
        return bytes(data[self.offset + 4:self.end]) if self.has_length else b""


@dataclass(frozen=True)
class JpegFrame:
    """The frame header (SOFn), T.81 B.2.2."""

    rows: int
    columns: int
    components: int
    precision: int  # bits per sample: 8 or 12 (16 for lossless)
    sof_marker: int  # 0xC0 baseline, 0xC1 extended, 0xC2 progressive, 0xC3 lossless, ...
    sampling: tuple[tuple[int, int], ...]  # (H, V) per component
    component_ids: tuple[int, ...]

    @property
    def is_baseline(self) -> bool:
        """JPEG Baseline Process 1 (the only process 1.2.840.10008.1.2.4.50 allows)."""
        return self.sof_marker == SOF0 and self.precision == 8

    @property
    def is_progressive(self) -> bool:
        return self.sof_marker in PROGRESSIVE_SOF

    @property
    def pixel_count(self) -> int:
        return self.rows * self.columns

    @property
    def subsampling(self) -> str:
        """"4:2:0", "4:2:2", "4:4:4", "4:4:0", "4:1:1", "gray" or "other"."""
        if self.components == 1:
            return "gray"
        if self.components != 3 or any(s != (1, 1) for s in self.sampling[1:]):
            return "other"
        return {(1, 1): "4:4:4", (2, 1): "4:2:2", (2, 2): "4:2:0", (1, 2): "4:4:0",
                (4, 1): "4:1:1"}.get(self.sampling[0], "other")


@dataclass(frozen=True)
class JpegInfo:
    """Everything the pipeline needs from one walk over a complete JPEG stream."""

    frame: JpegFrame
    orientation: int  # EXIF Orientation 1-8; 1 when absent or invalid
    color_space: str  # GRAY, YCbCr, RGB, CMYK or YCCK (libjpeg's rules)
    jfif: bool
    adobe_transform: int | None  # APP14 Adobe colour transform flag, None when absent
    icc_profile: bytes | None
    exif: bytes | None  # the first APP1 Exif payload, TIFF header onwards
    scans: int
    end: int  # offset just after EOI
    segments: tuple[Segment, ...]
    data_length: int = 0  # len() of the data walked

    @property
    def trailing_bytes(self) -> int:
        """Bytes after EOI (removed by strip_app_segments); 0 for a headers-only walk."""
        return max(self.data_length - self.end, 0) if self.end else 0


def _err(code: str, text: str) -> MediaError:
    return MediaError(code, text)


def iter_segments(data: bytes, *, headers_only: bool = False) -> Iterator[Segment]:
    """Every marker from SOI to EOI, in order. With headers_only, stop after the first SOS
    (cheap: no entropy-coded data is scanned). Raises MediaError("truncated") when the data
    ends before EOI and MediaError("not-decodable") on a malformed stream."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != SOI:
        raise _err(NOT_DECODABLE, "not a JPEG stream (no SOI marker)")
    yield Segment(SOI, 0, 2)
    pos = 2
    while True:
        if pos >= n:
            raise _err(TRUNCATED, "JPEG data ends before the EOI marker")
        if data[pos] != 0xFF:
            # Extraneous bytes before a marker: libjpeg tolerates them with a warning.
            nxt = data.find(b"\xff", pos)
            if nxt < 0:
                raise _err(TRUNCATED, "JPEG data ends before the EOI marker")
            pos = nxt
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            raise _err(TRUNCATED, "JPEG data ends before the EOI marker")
        marker = data[pos]
        start = pos - 1
        pos += 1
        if marker == 0x00:
            raise _err(NOT_DECODABLE, f"invalid marker at offset {start}")
        if marker == EOI:
            yield Segment(EOI, start, pos)
            return
        if marker == SOI:
            raise _err(NOT_DECODABLE, f"unexpected SOI marker at offset {start}")
        if marker in _STANDALONE:
            yield Segment(marker, start, pos)
            continue
        if pos + 2 > n:
            raise _err(TRUNCATED, "JPEG data ends inside a marker segment")
        length = (data[pos] << 8) | data[pos + 1]
        if length < 2:
            raise _err(NOT_DECODABLE, f"invalid segment length at offset {start}")
        end = pos + length
        if end > n:
            raise _err(TRUNCATED, "JPEG data ends inside a marker segment")
        yield Segment(marker, start, end)
        pos = end
        if marker == SOS:
            if headers_only:
                return
            found = _NEXT_MARKER.search(data, pos)
            if found is None:
                raise _err(TRUNCATED, "JPEG scan data ends without an EOI marker")
            pos = found.start()


iter_markers = iter_segments


def _parse_sof(data: bytes, seg: Segment) -> JpegFrame:
    p = seg.payload(data)
    if len(p) < 6:
        raise _err(NOT_DECODABLE, "frame header too short")
    precision, rows, columns, nc = p[0], (p[1] << 8) | p[2], (p[3] << 8) | p[4], p[5]
    if nc < 1 or len(p) < 6 + 3 * nc:
        raise _err(NOT_DECODABLE, "frame header has an invalid component count")
    ids, sampling = [], []
    for i in range(nc):
        cid, hv = p[6 + 3 * i], p[7 + 3 * i]
        h, v = hv >> 4, hv & 0x0F
        if not (1 <= h <= 4 and 1 <= v <= 4):
            raise _err(NOT_DECODABLE, "frame header has invalid sampling factors")
        ids.append(cid)
        sampling.append((h, v))
    if columns == 0:
        raise _err(NOT_DECODABLE, "frame header has zero columns")
    if rows == 0:  # height defined later by a DNL marker: not supported by the DICOM path
        raise _err(NOT_DECODABLE, "frame height is not given in the frame header (DNL)")
    return JpegFrame(rows=rows, columns=columns, components=nc, precision=precision,
                     sof_marker=seg.marker, sampling=tuple(sampling), component_ids=tuple(ids))


def _tiff_orientation(tiff: bytes) -> int:
    """Orientation from IFD0 of a TIFF (EXIF) block; 1 when absent or unreadable."""
    if len(tiff) < 8:
        return 1
    order = tiff[:2]
    if order == b"II":
        e = "<"
    elif order == b"MM":
        e = ">"
    else:
        return 1
    if struct.unpack(e + "H", tiff[2:4])[0] != 42:
        return 1
    ifd = struct.unpack(e + "I", tiff[4:8])[0]
    if ifd + 2 > len(tiff):
        return 1
    count = struct.unpack(e + "H", tiff[ifd:ifd + 2])[0]
    for i in range(count):
        off = ifd + 2 + 12 * i
        if off + 12 > len(tiff):
            return 1
        tag, typ, n = struct.unpack(e + "HHI", tiff[off:off + 8])
        if tag != _ORIENTATION_TAG or n < 1:
            continue
        if typ == 3:  # SHORT
            value = struct.unpack(e + "H", tiff[off + 8:off + 10])[0]
        elif typ == 4:  # LONG
            value = struct.unpack(e + "I", tiff[off + 8:off + 12])[0]
        else:
            return 1
        return value if 1 <= value <= 8 else 1
    return 1


def _color_space(frame: JpegFrame, jfif: bool, adobe_transform: int | None) -> str:
    """libjpeg's default_decompress_parms, so we agree with the decoder."""
    if frame.components == 1:
        return "GRAY"
    if frame.components == 3:
        if jfif:
            return "YCbCr"
        if adobe_transform is not None:
            return "RGB" if adobe_transform == 0 else "YCbCr"
        if frame.component_ids == (82, 71, 66):  # 'R', 'G', 'B'
            return "RGB"
        return "YCbCr"
    if frame.components == 4:
        return "YCCK" if adobe_transform == 2 else "CMYK"
    return "other"


def _assemble_icc(chunks: list[tuple[int, int, bytes]]) -> bytes | None:
    if not chunks:
        return None
    total = chunks[0][1]
    by_seq: dict[int, bytes] = {}
    for seq, count, body in chunks:
        if count != total or not 1 <= seq <= count or seq in by_seq:
            return None
        by_seq[seq] = body
    if len(by_seq) != total:
        return None
    profile = b"".join(by_seq[i] for i in range(1, total + 1))
    return profile or None


def _collect(data: bytes, *, headers_only: bool) -> JpegInfo:
    frame: JpegFrame | None = None
    jfif = False
    adobe: int | None = None
    exif: bytes | None = None
    icc_chunks: list[tuple[int, int, bytes]] = []
    segments: list[Segment] = []
    scans = 0
    end = 0
    for seg in iter_segments(data, headers_only=headers_only):
        segments.append(seg)
        m = seg.marker
        if m == SOS:
            if frame is None:
                raise _err(NOT_DECODABLE, "scan before the frame header")
            scans += 1
        elif m in SOF_MARKERS:
            if frame is not None:  # hierarchical JPEG, or a stream built to mislead
                raise _err(NOT_DECODABLE, "JPEG has more than one frame header")
            frame = _parse_sof(data, seg)
        elif m == EOI:
            end = seg.end
        elif scans == 0 and m in (APP0, APP1, APP2, APP14):
            head = data[seg.offset + 4:seg.offset + 4 + 14]
            if m == APP0 and head.startswith(_JFIF_ID):
                jfif = True
            elif m == APP14 and head.startswith(_ADOBE_ID) and seg.end - seg.offset - 4 >= 12:
                adobe = data[seg.offset + 4 + 11]
            elif m == APP1 and exif is None and head.startswith(_EXIF_ID):
                exif = bytes(data[seg.offset + 10:seg.end])
                if exif.startswith(_EXIF_ID):  # doubled header, as Pillow tolerates
                    exif = exif[6:]
            elif m == APP2 and head.startswith(_ICC_ID) and seg.end - seg.offset - 4 >= 14:
                p = seg.offset + 4
                icc_chunks.append((data[p + 12], data[p + 13], bytes(data[p + 14:seg.end])))
    if frame is None:
        raise _err(NOT_DECODABLE, "JPEG has no frame header (SOF)")
    if not headers_only and scans == 0:
        raise _err(NOT_DECODABLE, "JPEG has no scan (SOS)")
    return JpegInfo(
        frame=frame,
        orientation=_tiff_orientation(exif) if exif else 1,
        color_space=_color_space(frame, jfif, adobe),
        jfif=jfif,
        adobe_transform=adobe,
        icc_profile=_assemble_icc(icc_chunks),
        exif=exif,
        scans=scans,
        end=end,
        segments=tuple(segments),
        data_length=len(data),
    )


def inspect_jpeg(data: bytes) -> JpegInfo:
    """Walk the whole stream (headers and scans up to EOI) without decoding. Raises
    MediaError("truncated") or MediaError("not-decodable")."""
    return _collect(data, headers_only=False)


def read_headers(data: bytes) -> JpegInfo:
    """Like inspect_jpeg, but stops at the first scan: frame, orientation, ICC, EXIF and colour
    space without reading entropy-coded data (`end` is 0, `scans` is 1)."""
    return _collect(data, headers_only=True)


def read_sof(data: bytes) -> JpegFrame:
    """The frame header; reads only the headers before the first scan."""
    return _collect(data, headers_only=True).frame


def exif_orientation(data: bytes) -> int:
    """EXIF Orientation (0x0112) from the first APP1 Exif segment; 1 when absent/invalid."""
    return _collect(data, headers_only=True).orientation


def exif_payload(data: bytes) -> bytes | None:
    """The first APP1 Exif block (TIFF header onwards), or None."""
    return _collect(data, headers_only=True).exif


def icc_profile(data: bytes) -> bytes | None:
    """The ICC profile reassembled from APP2 ICC_PROFILE chunks (in sequence order); None
    when absent or when the chunks are inconsistent (missing, duplicated, bad numbering)."""
    return _collect(data, headers_only=True).icc_profile


def is_truncated(data: bytes) -> bool:
    """True when the stream ends before its EOI marker. Other malformations raise
    MediaError("not-decodable")."""
    try:
        _collect(data, headers_only=False)
    except MediaError as exc:
        if exc.code == TRUNCATED:
            return True
        raise
    return False


def _keep(data: bytes, seg: Segment) -> bool:
    m = seg.marker
    if m == COM or (APP1 <= m <= 0xEF and m != APP14):
        return False
    if m == APP0:
        return data[seg.offset + 4:seg.offset + 9] == _JFIF_ID
    if m == APP14:
        return data[seg.offset + 4:seg.offset + 9] == _ADOBE_ID
    return True


def _clean_jfif(data: bytes, seg: Segment) -> bytes | None:
    """An APP0 JFIF segment without its thumbnail (or None when it has none)."""
    p = seg.payload(data)
    if len(p) >= 14 and (p[12] or p[13]):
        return b"\xff\xe0\x00\x10" + p[:12] + b"\x00\x00"
    return None


def strip_app_segments(data: bytes, info: JpegInfo | None = None) -> bytes:
    """The same JPEG without APP1-APP15 and COM segments (EXIF, XMP, GPS, ICC, MPF, maker
    notes, comments) and without anything after EOI. APP0 JFIF (minus any thumbnail) and APP14
    Adobe (colour transform flag) stay; any other APP0/APP14 goes. Every other byte — tables,
    frame and scan headers, entropy-coded data — is copied unchanged.

    Pass the JpegInfo from inspect_jpeg() to avoid walking the stream twice."""
    if info is None:
        info = inspect_jpeg(data)
    out: list[bytes | memoryview] = []
    view = memoryview(data)  # slices without copies; join copies once
    pos = 0
    for seg in info.segments:
        if seg.marker == APP0 and _keep(data, seg):
            cleaned = _clean_jfif(data, seg)
            if cleaned is not None:
                out.append(view[pos:seg.offset])
                out.append(cleaned)
                pos = seg.end
            continue
        if not _keep(data, seg):
            out.append(view[pos:seg.offset])
            pos = seg.end
    out.append(view[pos:info.end])
    return b"".join(out)


def scan_data(data: bytes) -> bytes:
    """The bytes from the first SOS marker to the end of EOI (scan headers, entropy-coded
    data, any tables between scans)."""
    for seg in iter_segments(data):
        if seg.marker == SOS:
            info_end = _collect(data, headers_only=False).end
            return bytes(data[seg.offset:info_end])
    raise _err(NOT_DECODABLE, "JPEG has no scan (SOS)")
