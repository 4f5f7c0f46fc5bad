"""Video uploads (MP4 / QuickTime) prepared for a Video Photographic Image.

The compressed video is never re-encoded. The first video stream's packets are copied with
PyAV (FFmpeg) into a fresh MP4 file (ISO/IEC 14496-12/-14, `moov` first) that holds that one
video track and nothing else; that MP4 goes into Pixel Data (see fhirbridge.dicom.video).

Why an MP4 and not the bare elementary stream: PS3.5 8.2.7 (H.264 High/L4.1), 8.2.8
(High/L4.2), 8.2.9 (Stereo High) and 8.2.10/8.2.11 (HEVC Main/Main 10) each say "The
container format for the video bit stream shall be MPEG-2 Transport Stream ... or MPEG-4,
a.k.a. MP4 container (ISO/IEC 14496-12 and 14496-14)". An Annex B elementary stream (what
FFmpeg's `h264_mp4toannexb` / `hevc_mp4toannexb` bitstream filters produce) is neither, so
it is not used, although FFmpeg and Orthanc would accept it. Re-muxing rather than copying
the upload verbatim drops what the upload's container carries besides the pictures: the
audio track, and the metadata (QuickTime/MP4 `udta`/`meta` boxes: GPS location, device
make/model, titles typed by the user) — never sent to the PACS, as for photos. The display
matrix (rotation) is part of the track's codec parameters and is copied with it.

Accepted (everything else is UNSUPPORTED_CODEC, naming the codec found and these):
- H.264 / MPEG-4 AVC, 8-bit 4:2:0, profile High, Main or Constrained Baseline (the latter two
  are subsets a High Profile decoder must decode, ISO/IEC 14496-10 A.2), or Stereo High:
    level ≤ 4.1 → 1.2.840.10008.1.2.4.102  MPEG-4 AVC/H.264 High Profile / Level 4.1 (8.2.7)
    level 4.2   → 1.2.840.10008.1.2.4.104  High Profile / Level 4.2 for 2D video (8.2.8)
    Stereo High, level ≤ 4.2 → 1.2.840.10008.1.2.4.106  Stereo High Profile / Level 4.2
                  (8.2.9)
  Not chosen: .103 (BD-compatible High/L4.1) only narrows .102 to the Blu-ray sizes and
  rates of PS3.5 Table 8-4 (1920x1080 interlaced at 25/29.97, 1280x720 ...), and a .102
  receiver decodes the same stream; phone video (1080p30 progressive) is not even in that
  table. .105 (3D, frame-packed) needs Stereo Pairs Present YES and a frame packing
  arrangement we do not detect: every High/L4.2 stream is treated as 2D (.104).
- HEVC / H.265, 4:2:0, level ≤ 5.1 (general_level_idc ≤ 153):
    Main    → 1.2.840.10008.1.2.4.107  HEVC/H.265 Main Profile / Level 5.1 (8.2.10)
    Main 10 → 1.2.840.10008.1.2.4.108  HEVC/H.265 Main 10 Profile / Level 5.1 (8.2.11)
- The non-fragmentable transfer syntaxes: 8.2.7-8.2.9 require "One fragment shall contain
  the whole MPEG-4 AVC/H.264 bit stream" (HEVC may use several; one is fine), and the size
  limit (512 MiB by default) is far below the ~4 GB of one fragment. The fragmentable
  variants (.102.1, .104.1, .106.1 — newer, known to pydicom 3) are not used: fewer archives
  accept them and a single fragment needs none of what they add.

**A stream above its transfer syntax's level** (typically a phone's 4K H.264 at level 5.0 /
5.1, or 4K60 HEVC at level 5.2) is refused as UNSUPPORTED_CODEC with a text that says which
level was found and which are accepted. We do not pick "the nearest" transfer syntax: 8.2.7
requires Rows, Columns, Cine Rate and Frame Time to be "compliant with the High Profile /
Level 4.1" (4.2, Main/Level 5.1), and a PACS or viewer that negotiated .102 may rightly fail
on a level 5.1 stream. We do not transcode either (a derived, re-compressed object and a
CPU-heavy job); the submitter is told to send 1080p. The declared level is also checked
against the frame size (MaxFS of ISO/IEC 14496-10 Table A-1, MaxLumaPs of ISO/IEC 23008-2
Table A.8): a stream larger than its level allows is refused the same way. Bit rate and
macroblock rate limits are not checked.

**Audio is dropped**: 8.2.12 would allow AAC/MP3/MP2 in an MP4 container only at 48 kHz
(phones often record 44.1 kHz) and within bit-rate limits, and a clip's sound may record
bystanders. VideoInfo.has_audio says whether there was any.

**Memory**: FFmpeg reads the upload from its file (a Path is never loaded whole) and writes
the re-muxed MP4 to a temporary file, which is then read into one bytes object: preparing
holds about 1x the video size; building the DICOM object adds one more copy (the
encapsulated Pixel Data), writing it a third (pydicom) — about 3 x max_bytes at worst,
1.5 GiB at the 512 MiB default (measured peak RSS 610 MB for a 194 MB video).
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from fhirbridge.media.errors import (
    NOT_DECODABLE,
    TOO_LARGE,
    TOO_LONG,
    TYPE_MISMATCH,
    UNSUPPORTED_CODEC,
    MediaError,
)
from fhirbridge.media.sniff import sniff_content_type

__all__ = [
    "DEFAULT_MAX_VIDEO_BYTES", "DEFAULT_MAX_VIDEO_SECONDS", "ACCEPTED_CODECS",
    "MPEG4_HP41", "MPEG4_HP42_2D", "MPEG4_HP42_STEREO", "HEVC_MP51", "HEVC_M10P51",
    "VideoInfo", "PreparedVideo", "probe_video", "prepare_video", "select_transfer_syntax",
]

DEFAULT_MAX_VIDEO_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_VIDEO_SECONDS = 600.0

MPEG4_HP41 = "1.2.840.10008.1.2.4.102"
MPEG4_HP42_2D = "1.2.840.10008.1.2.4.104"
MPEG4_HP42_STEREO = "1.2.840.10008.1.2.4.106"
HEVC_MP51 = "1.2.840.10008.1.2.4.107"
HEVC_M10P51 = "1.2.840.10008.1.2.4.108"

ACCEPTED_CODECS = ("H.264/AVC High, Main or Constrained Baseline profile up to level 4.2",
                   "HEVC/H.265 Main or Main 10 profile up to level 5.1")
_ACCEPTED_TEXT = "; accepted: " + "; ".join(ACCEPTED_CODECS)

_CONTAINERS = frozenset({"video/mp4", "video/quicktime"})
_H264_PROFILES = frozenset({"High", "Main", "Constrained Baseline"})
_H264_STEREO = "Stereo High"
_H264_MAX_FS = 8192  # macroblocks per frame, levels 4.1 and 4.2 (ISO/IEC 14496-10 Table A-1)
_HEVC_MAX_LUMA_PS = 8_912_896  # samples per picture, level 5.1 (ISO/IEC 23008-2 Table A.8)
_HEVC_MAX_LEVEL_IDC = 153  # general_level_idc = 30 x level
_PIX_FMT_DEPTH = {"yuv420p": 8, "yuvj420p": 8, "yuv420p10le": 10, "yuv420p10be": 10}
_CODEC_NAMES = {"h264": "H.264/AVC", "hevc": "HEVC/H.265", "mpeg4": "MPEG-4 Part 2",
                "vp9": "VP9", "vp8": "VP8", "av1": "AV1", "mjpeg": "Motion JPEG",
                "prores": "ProRes", "mpeg2video": "MPEG-2", "h263": "H.263"}
_ACCEPTED = frozenset({"h264", "hevc"})


@dataclass(frozen=True)
class VideoInfo:
    """What the container and the first video stream say."""

    content_type: str  # video/mp4 or video/quicktime (from the ftyp box)
    codec: str  # FFmpeg's codec name: h264, hevc, vp9, ...
    profile: str  # FFmpeg's profile name: High, Main, Main 10, ...
    level: float | None  # 4.1, 5.1 ... (None when the stream does not say)
    width: int
    height: int
    pix_fmt: str
    bit_depth: int
    frame_count: int  # from the stream index, else duration x rate
    frame_rate: Fraction  # average frames per second
    duration: float  # seconds
    rotation: int = 0  # display-matrix rotation as FFmpeg reports it (degrees, mod 360);
    # kept in the re-muxed MP4's track header, not applied to the pictures
    has_audio: bool = False  # audio is never carried into DICOM
    size_bytes: int = 0
    transfer_syntax_uid: str = ""  # "" for a stream we do not accept

    @property
    def frame_time_ms(self) -> float:
        """Nominal time per frame in milliseconds (DICOM FrameTime)."""
        return 1000.0 / float(self.frame_rate) if self.frame_rate else 0.0


@dataclass(frozen=True)
class PreparedVideo:
    """The video as it goes into Pixel Data: an MP4 file with the one video track (coded
    pictures unchanged, no audio, no metadata), with its facts."""

    info: VideoInfo
    mp4: bytes  # ISO/IEC 14496-12/-14 file, `moov` first, video track only
    frame_count: int  # coded pictures (packets) in the track
    transfer_syntax_uid: str

    @property
    def frame_time_ms(self) -> float:
        return self.info.frame_time_ms


# -- transfer syntax -------------------------------------------------------------------------

def _codec_label(codec: str) -> str:
    return _CODEC_NAMES.get(codec, codec or "unknown")


def _level_value(codec: str, level: int | None) -> float | None:
    if level is None or level < 0:
        return None
    if codec == "h264":
        return 1.0 if level == 9 else level / 10  # level_idc 9 is level 1b (reported as 1.0)
    if codec == "hevc":
        return round(level / 30, 1)  # general_level_idc = 30 x level
    return float(level)


def select_transfer_syntax(codec: str, profile: str, level_idc: int | None, width: int,
                           height: int, pix_fmt: str) -> str:
    """The MPEG-4 AVC or HEVC transfer syntax UID for the stream, or MediaError
    UNSUPPORTED_CODEC naming what was found and what is accepted."""
    label = _codec_label(codec)
    if codec not in _ACCEPTED:
        raise MediaError(UNSUPPORTED_CODEC, f"video codec {label} is not accepted{_ACCEPTED_TEXT}")
    depth = _PIX_FMT_DEPTH.get(pix_fmt)
    if depth is None:
        raise MediaError(UNSUPPORTED_CODEC, f"{label} with pixel format {pix_fmt or 'unknown'} "
                         f"is not accepted (4:2:0 only){_ACCEPTED_TEXT}")
    if level_idc is None or level_idc <= 0:
        raise MediaError(UNSUPPORTED_CODEC, f"{label} stream does not declare its level"
                         f"{_ACCEPTED_TEXT}")
    level = _level_value(codec, level_idc)
    if codec == "h264":
        if depth != 8 or (profile not in _H264_PROFILES and profile != _H264_STEREO):
            raise MediaError(UNSUPPORTED_CODEC, f"H.264/AVC profile {profile or 'unknown'} "
                             f"({depth}-bit) is not accepted{_ACCEPTED_TEXT}")
        if level_idc > 42:
            raise MediaError(UNSUPPORTED_CODEC, f"H.264/AVC level {level:g} is above level 4.2, "
                             f"the highest DICOM transfer syntax for H.264 (send 1080p or "
                             f"less){_ACCEPTED_TEXT}")
        mbs = math.ceil(width / 16) * math.ceil(height / 16)
        if mbs > _H264_MAX_FS:
            raise MediaError(UNSUPPORTED_CODEC, f"H.264/AVC frame size {width}x{height} exceeds "
                             f"what level 4.2 allows{_ACCEPTED_TEXT}")
        if profile == _H264_STEREO:
            return MPEG4_HP42_STEREO
        return MPEG4_HP41 if level_idc <= 41 else MPEG4_HP42_2D
    # hevc
    if profile not in ("Main", "Main 10") or (profile == "Main" and depth != 8):
        raise MediaError(UNSUPPORTED_CODEC, f"HEVC/H.265 profile {profile or 'unknown'} "
                         f"({depth}-bit) is not accepted{_ACCEPTED_TEXT}")
    if level_idc > _HEVC_MAX_LEVEL_IDC:
        raise MediaError(UNSUPPORTED_CODEC, f"HEVC/H.265 level {level:g} is above level 5.1, "
                         f"the highest DICOM transfer syntax for HEVC{_ACCEPTED_TEXT}")
    if width * height > _HEVC_MAX_LUMA_PS:
        raise MediaError(UNSUPPORTED_CODEC, f"HEVC/H.265 frame size {width}x{height} exceeds "
                         f"what level 5.1 allows{_ACCEPTED_TEXT}")
    return HEVC_MP51 if profile == "Main" else HEVC_M10P51


# -- probing ---------------------------------------------------------------------------------

def _size_of(source: Path | bytes | bytearray | memoryview) -> int:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source)
    return os.stat(source).st_size


def _head(source: Path | bytes | bytearray | memoryview) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[:4096])
    with open(source, "rb") as fh:
        return fh.read(4096)


def _open(source: Path | bytes | bytearray | memoryview):
    import av

    av.logging.set_level(av.logging.PANIC)  # FFmpeg's own messages may name file contents
    target = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) \
        else os.fspath(source)
    try:
        return av.open(target, "r", format="mov,mp4,m4a,3gp,3g2,mj2")
    except Exception:  # noqa: BLE001 - av.error.* (InvalidDataError, no moov atom, EOF, ...)
        raise MediaError(NOT_DECODABLE, "video could not be opened (damaged or truncated "
                         "MP4/QuickTime file)") from None


def _check_container(source: Path | bytes | bytearray | memoryview, max_bytes: int | None
                     ) -> tuple[int, str]:
    size = _size_of(source)
    if max_bytes is not None and size > max_bytes:
        raise MediaError(TOO_LARGE, f"video is larger than {max_bytes} bytes")
    kind = sniff_content_type(_head(source))
    if kind not in _CONTAINERS:
        raise MediaError(TYPE_MISMATCH, "the bytes are not an MP4 or QuickTime video")
    return size, kind


def _rotation(frame) -> int:
    try:
        return int(round(float(frame.rotation or 0))) % 360
    except Exception:  # noqa: BLE001 - older PyAV or no display matrix
        return 0


def _info(container, stream, *, content_type: str, size: int, first_frame=None) -> VideoInfo:
    cc = stream.codec_context
    codec = cc.name or ""
    profile = cc.profile or ""
    level_idc = getattr(cc, "level", None)
    width, height = int(cc.width or 0), int(cc.height or 0)
    pix_fmt = cc.pix_fmt or ""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / 1_000_000  # AV_TIME_BASE
    else:
        duration = 0.0
    frames = int(stream.frames or 0)
    if not rate and frames and duration > 0:
        rate = Fraction(frames / duration).limit_denominator(1001)
    if not frames and rate and duration > 0:
        frames = int(round(duration * float(rate)))
    rate = Fraction(rate) if rate else Fraction(0)
    try:
        ts = select_transfer_syntax(codec, profile, level_idc, width, height, pix_fmt)
    except MediaError:
        ts = ""
    return VideoInfo(
        content_type=content_type, codec=codec, profile=profile,
        level=_level_value(codec, level_idc), width=width, height=height, pix_fmt=pix_fmt,
        bit_depth=_PIX_FMT_DEPTH.get(pix_fmt, 8), frame_count=frames, frame_rate=rate,
        duration=duration, rotation=_rotation(first_frame) if first_frame is not None else 0,
        has_audio=bool(container.streams.audio), size_bytes=size, transfer_syntax_uid=ts)


def _check_stream(container, info: VideoInfo, max_seconds: float | None) -> None:
    cc = container.streams.video[0].codec_context
    select_transfer_syntax(info.codec, info.profile, getattr(cc, "level", None), info.width,
                           info.height, info.pix_fmt)  # raises UNSUPPORTED_CODEC
    if info.width <= 0 or info.height <= 0 or info.width > 65535 or info.height > 65535:
        raise MediaError(NOT_DECODABLE, "video has no usable frame size")
    if not info.frame_rate or info.frame_count <= 0:
        raise MediaError(NOT_DECODABLE, "video has no frames or no frame rate")
    if max_seconds is not None and info.duration > max_seconds:
        raise MediaError(TOO_LONG, f"video is longer than {max_seconds:g} seconds")


def _first_frame(container, stream):
    try:
        for frame in container.decode(stream):
            return frame
    except Exception:  # noqa: BLE001
        pass
    raise MediaError(NOT_DECODABLE, "video could not be decoded")


def probe_video(source: Path | bytes, *, max_bytes: int | None = None,
                max_seconds: float | None = None) -> VideoInfo:
    """Container, codec, profile/level, size and timing of the first video stream, checked:
    TOO_LARGE, TYPE_MISMATCH (not MP4/QuickTime), NOT_DECODABLE (damaged, truncated, no
    video, first frame does not decode), UNSUPPORTED_CODEC, TOO_LONG. Decodes one frame."""
    size, kind = _check_container(source, max_bytes)
    container = _open(source)
    try:
        if not container.streams.video:
            raise MediaError(NOT_DECODABLE, "the file holds no video stream")
        stream = container.streams.video[0]
        info = _info(container, stream, content_type=kind, size=size)
        _check_stream(container, info, max_seconds)
        frame = _first_frame(container, stream)
        return _info(container, stream, content_type=kind, size=size, first_frame=frame)
    finally:
        container.close()


def prepare_video(source: Path | bytes, *, max_bytes: int = DEFAULT_MAX_VIDEO_BYTES,
                  max_seconds: float = DEFAULT_MAX_VIDEO_SECONDS) -> PreparedVideo:
    """Probe, then copy every packet of the first video stream into a new MP4 (no audio, no
    metadata). Only the first frame is decoded (by the probe); the coded pictures are
    unchanged.

    Raises MediaError as probe_video, and NOT_DECODABLE when the packets stop short of what
    the index promises (a truncated file) or cannot be re-muxed."""
    info = probe_video(source, max_bytes=max_bytes, max_seconds=max_seconds)
    import av

    fd, tmp_name = tempfile.mkstemp(prefix="fhirbridge-video-", suffix=".mp4")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        container = _open(source)
        try:
            stream = container.streams.video[0]
            packets = 0
            try:
                # faststart: moov before mdat (a second pass over the temporary file), so a
                # viewer can start playing before it has read the whole fragment; bitexact:
                # no "encoder" tag, no creation time.
                with av.open(tmp_name, "w", format="mp4",
                             options={"movflags": "faststart", "fflags": "+bitexact"}) as out:
                    track = out.add_stream_from_template(stream)
                    for packet in container.demux(stream):
                        if packet.dts is None or packet.size == 0:  # end-of-stream markers
                            continue
                        packets += 1
                        packet.stream = track
                        out.mux(packet)
            except MediaError:
                raise
            except Exception:  # noqa: BLE001 - av.error.* while reading a damaged file
                raise MediaError(NOT_DECODABLE, "video could not be read (damaged or "
                                 "truncated file)") from None
            expected = int(stream.frames or 0)
        finally:
            container.close()
        if packets == 0:
            raise MediaError(NOT_DECODABLE, "video has no frames")
        if expected and packets < expected:
            raise MediaError(NOT_DECODABLE, f"video is truncated ({packets} of {expected} "
                             "frames present)")
        if tmp.stat().st_size > max_bytes:
            raise MediaError(TOO_LARGE, f"video is larger than {max_bytes} bytes")
        mp4 = tmp.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)
    return PreparedVideo(info=info, mp4=mp4, frame_count=packets,
                         transfer_syntax_uid=info.transfer_syntax_uid)
