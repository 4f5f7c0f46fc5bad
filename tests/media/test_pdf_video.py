"""fhirbridge.media.pdf and fhirbridge.media.video: checks, page counts, codec/profile/level
to transfer syntax, the re-muxed MP4 (video track only, pictures unchanged). Fixtures are
generated here: PDFs with pypdf, MP4/QuickTime files with PyAV's bundled encoders (libx264,
libx265, mpeg4, libvpx-vp9, mjpeg, aac)."""

from __future__ import annotations

import io
import struct
from fractions import Fraction
from pathlib import Path

import av
import pytest
from PIL import Image
from pypdf import PdfWriter

from fhirbridge.media import errors as E
from fhirbridge.media.errors import MediaError
from fhirbridge.media.pdf import check_pdf, prepare_pdf
from fhirbridge.media.sniff import sniff_content_type
from fhirbridge.media.video import (
    HEVC_M10P51, HEVC_MP51, MPEG4_HP41, MPEG4_HP42_2D, MPEG4_HP42_STEREO, prepare_video,
    probe_video, select_transfer_syntax,
)

# -- fixture makers (also used by tests/dicom/test_pdf_video.py) ------------------------------


def make_pdf(pages: int = 1, *, title: str | None = None, user_password: str | None = None,
             owner_password: str | None = None, pad_to: int = 0) -> bytes:
    writer = PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(width=595, height=842)
    if title is not None:
        writer.add_metadata({"/Title": title})
    if pad_to:
        # an uncompressed stream object to reach a given size (a "large" PDF)
        from pypdf.generic import DecodedStreamObject

        blob = DecodedStreamObject()
        blob.set_data(b"0" * pad_to)
        writer._add_object(blob)  # noqa: SLF001 - test fixture only
    if user_password is not None or owner_password is not None:
        writer.encrypt(user_password or "", owner_password, algorithm="RC4-128")
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


def make_video(codec: str = "libx264", *, fmt: str = "mp4", width: int = 320,
               height: int = 240, frames: int = 50, rate: int = 25,
               options: dict[str, str] | None = None, pix_fmt: str = "yuv420p",
               audio: bool = False, container_options: dict[str, str] | None = None,
               metadata: dict[str, str] | None = None) -> bytes:
    """A short synthetic clip: a moving bar on a colour that changes every frame.
    (faststart needs a real file: the muxer re-reads it to move the moov box first.)"""
    import tempfile

    tmp = tempfile.NamedTemporaryFile(suffix="." + fmt, delete=False)
    tmp.close()
    target: io.BytesIO | str = tmp.name if container_options else io.BytesIO()
    with av.open(target, "w", format=fmt, options=container_options or {}) as out:
        for key, value in (metadata or {}).items():
            out.metadata[key] = value
        video = out.add_stream(codec, rate=rate, options=options or {})
        video.width, video.height, video.pix_fmt = width, height, pix_fmt
        sound = None
        if audio:
            sound = out.add_stream("aac", rate=44100)
            sound.layout = "mono"
        for i in range(frames):
            img = Image.new("RGB", (width, height), ((i * 5) % 255, 40, 90))
            img.paste((200, 200, 30), ((i * 3) % width, height // 4, width, height // 2))
            for packet in video.encode(av.VideoFrame.from_image(img)):
                out.mux(packet)
            if sound is not None:
                for _ in range(2):  # ~46 ms of silence per 40 ms frame: enough
                    frame = av.AudioFrame(format="fltp", layout="mono", samples=1024)
                    for plane in frame.planes:
                        plane.update(bytes(plane.buffer_size))
                    frame.sample_rate = 44100
                    for packet in sound.encode(frame):
                        out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        if sound is not None:
            for packet in sound.encode():
                out.mux(packet)
    data = Path(tmp.name).read_bytes() if isinstance(target, str) else target.getvalue()
    Path(tmp.name).unlink()
    return data


H264_HIGH_41 = {"profile": "high", "level": "4.1"}


@pytest.fixture(scope="session")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every clip the tests use, made once per session."""
    root = tmp_path_factory.mktemp("videos")
    specs = {
        "h264": dict(options=H264_HIGH_41),
        "h264_l42": dict(options={"profile": "high", "level": "4.2"}),
        "h264_l51": dict(options={"profile": "high", "level": "5.1"}),
        "h264_main_mov": dict(fmt="mov", options={"profile": "main", "level": "3.1"}),
        "h264_audio": dict(options=H264_HIGH_41, audio=True),
        "h264_faststart": dict(options=H264_HIGH_41,
                               container_options={"movflags": "faststart"}),
        "h264_high10": dict(options={"profile": "high10"}, pix_fmt="yuv420p10le"),
        "hevc": dict(codec="libx265", options={"x265-params": "log-level=error"}),
        "hevc10": dict(codec="libx265", pix_fmt="yuv420p10le",
                       options={"x265-params": "log-level=error"}),
        "mpeg4": dict(codec="mpeg4"),
        "vp9": dict(codec="libvpx-vp9", frames=10),
        "mjpeg": dict(codec="mjpeg", fmt="mov", pix_fmt="yuvj420p", frames=10),
    }
    out = {}
    for name, spec in specs.items():
        path = root / f"{name}.{spec.get('fmt', 'mp4')}"
        path.write_bytes(make_video(**spec))
        out[name] = path
    return out


# -- PDF -------------------------------------------------------------------------------------

def test_prepare_pdf_counts_pages_and_keeps_bytes():
    data = make_pdf(3, title="Befund Müller")
    pdf = prepare_pdf(data)
    assert pdf.data == data
    assert pdf.page_count == 3
    assert pdf.title == "Befund Müller"  # read, but never used for DICOM by default
    assert pdf.version and not pdf.encrypted


def test_pdf_without_title():
    assert prepare_pdf(make_pdf()).title == ""


def test_not_a_pdf_is_type_mismatch():
    for data in (b"\xff\xd8\xff\xe0 not a pdf %%EOF", b"", b" %PDF-1.4\n%%EOF"):
        with pytest.raises(MediaError) as err:
            prepare_pdf(data)
        assert err.value.code == E.TYPE_MISMATCH
        with pytest.raises(MediaError):
            check_pdf(data)


def test_truncated_pdf():
    data = make_pdf(2)
    for cut in (data[: len(data) // 2], data[:-10]):
        with pytest.raises(MediaError) as err:
            prepare_pdf(cut)
        assert err.value.code == E.TRUNCATED
        with pytest.raises(MediaError) as err:
            check_pdf(cut)
        assert err.value.code == E.TRUNCATED


def test_pdf_size_limit():
    data = make_pdf()
    with pytest.raises(MediaError) as err:
        prepare_pdf(data, max_bytes=len(data) - 1)
    assert err.value.code == E.TOO_LARGE
    with pytest.raises(MediaError) as err:
        check_pdf(data, max_bytes=100)
    assert err.value.code == E.TOO_LARGE
    check_pdf(data)  # default limit: fine
    assert prepare_pdf(data, max_bytes=len(data)).data == data


def test_undecodable_pdf():
    for data in (b"%PDF-1.7\n garbage garbage \n%%EOF\n",
                 b"%PDF-1.4\n" + bytes(range(256)) * 20 + b"\n%%EOF"):
        check_pdf(data)  # the cheap check passes...
        with pytest.raises(MediaError) as err:
            prepare_pdf(data)  # ...pypdf does not
        assert err.value.code == E.NOT_DECODABLE


def test_encrypted_pdf_with_a_user_password_is_refused():
    data = make_pdf(user_password="secret", owner_password="owner")
    check_pdf(data)
    with pytest.raises(MediaError) as err:
        prepare_pdf(data)
    assert err.value.code == E.NOT_DECODABLE
    assert err.value.text == "PDF is encrypted"


def test_pdf_encrypted_only_with_an_owner_password_opens():
    data = make_pdf(2, owner_password="owner")
    pdf = prepare_pdf(data)
    assert pdf.encrypted and pdf.page_count == 2 and pdf.data == data


def test_media_error_texts_hold_no_content():
    data = make_pdf(title="Jane Doe 1984-03-07")
    with pytest.raises(MediaError) as err:
        prepare_pdf(data[:-20])
    assert "Jane" not in str(err.value)


# -- video: probing and transfer syntax --------------------------------------------------------

def test_probe_h264_high_41(videos):
    info = probe_video(videos["h264"])
    assert (info.codec, info.profile, info.level) == ("h264", "High", 4.1)
    assert (info.width, info.height) == (320, 240)
    assert info.frame_count == 50
    assert info.frame_rate == Fraction(25)
    assert info.frame_time_ms == pytest.approx(40.0)
    assert info.duration == pytest.approx(2.0, abs=0.05)
    assert info.content_type == "video/mp4"
    assert info.transfer_syntax_uid == MPEG4_HP41
    assert info.has_audio is False and info.rotation == 0
    assert info.size_bytes == videos["h264"].stat().st_size


def test_probe_accepts_bytes_and_quicktime(videos):
    info = probe_video(videos["h264_main_mov"].read_bytes())
    assert info.content_type == "video/quicktime"
    assert (info.profile, info.level) == ("Main", 3.1)
    assert info.transfer_syntax_uid == MPEG4_HP41  # Main is decodable by High/L4.1


@pytest.mark.parametrize("name, ts", [("h264", MPEG4_HP41), ("h264_l42", MPEG4_HP42_2D),
                                      ("hevc", HEVC_MP51), ("hevc10", HEVC_M10P51)])
def test_transfer_syntax_by_profile_and_level(videos, name, ts):
    assert probe_video(videos[name]).transfer_syntax_uid == ts
    assert prepare_video(videos[name]).transfer_syntax_uid == ts


def test_hevc_main10_info(videos):
    info = probe_video(videos["hevc10"])
    assert (info.codec, info.profile, info.bit_depth) == ("hevc", "Main 10", 10)


@pytest.mark.parametrize("name, label", [("mpeg4", "MPEG-4 Part 2"), ("vp9", "VP9"),
                                         ("mjpeg", "Motion JPEG")])
def test_other_codecs_are_unsupported(videos, name, label):
    for call in (probe_video, prepare_video):
        with pytest.raises(MediaError) as err:
            call(videos[name])
        assert err.value.code == E.UNSUPPORTED_CODEC
        assert label in err.value.text
        assert "H.264" in err.value.text and "HEVC" in err.value.text


def test_h264_above_level_42_is_held_as_unsupported(videos):
    with pytest.raises(MediaError) as err:
        probe_video(videos["h264_l51"])
    assert err.value.code == E.UNSUPPORTED_CODEC
    assert "level 5.1" in err.value.text and "4.2" in err.value.text


def test_h264_high10_is_unsupported(videos):
    with pytest.raises(MediaError) as err:
        probe_video(videos["h264_high10"])
    assert err.value.code == E.UNSUPPORTED_CODEC
    assert "High 10" in err.value.text


def test_select_transfer_syntax_table():
    s = select_transfer_syntax
    assert s("h264", "High", 41, 1920, 1080, "yuv420p") == MPEG4_HP41
    assert s("h264", "Constrained Baseline", 30, 640, 480, "yuv420p") == MPEG4_HP41
    assert s("h264", "High", 42, 1920, 1080, "yuvj420p") == MPEG4_HP42_2D
    assert s("h264", "Stereo High", 41, 1920, 1080, "yuv420p") == MPEG4_HP42_STEREO
    assert s("hevc", "Main", 153, 3840, 2160, "yuv420p") == HEVC_MP51
    assert s("hevc", "Main 10", 150, 3840, 2160, "yuv420p10le") == HEVC_M10P51
    assert s("hevc", "Main 10", 120, 1920, 1080, "yuv420p") == HEVC_M10P51
    refused = [
        ("h264", "High", 51, 3840, 2160, "yuv420p"),  # a phone's 4K: level 5.1
        ("h264", "High", 41, 3840, 2160, "yuv420p"),  # 4K claiming level 4.1
        ("h264", "Baseline", 30, 640, 480, "yuv420p"),  # FMO/ASO: not a High subset
        ("h264", "High 4:2:2", 41, 1920, 1080, "yuv422p"),
        ("h264", "High", None, 1920, 1080, "yuv420p"),  # no level
        ("hevc", "Main", 156, 3840, 2160, "yuv420p"),  # level 5.2 (4K60)
        ("hevc", "Main", 153, 7680, 4320, "yuv420p"),  # 8K
        ("hevc", "Rext", 153, 1920, 1080, "yuv444p"),
        ("hevc", "Main", 120, 1920, 1080, "yuv420p10le"),  # 10-bit needs Main 10
        ("av1", "Main", 8, 1920, 1080, "yuv420p"),
    ]
    for args in refused:
        with pytest.raises(MediaError) as err:
            s(*args)
        assert err.value.code == E.UNSUPPORTED_CODEC, args


# -- video: preparing the MP4 that goes into Pixel Data ----------------------------------------

def _open_mp4(data: bytes):
    return av.open(io.BytesIO(data), format="mp4")


def _decode_count(data: bytes) -> tuple[int, int, int]:
    with _open_mp4(data) as c:
        frames = list(c.decode(video=0))
    return len(frames), frames[0].width, frames[0].height


def _packets(data: bytes) -> list[bytes]:
    with _open_mp4(data) as c:
        return [bytes(p) for p in c.demux(video=0) if p.size]


@pytest.mark.parametrize("name", ["h264", "hevc", "h264_main_mov"])
def test_prepare_remuxes_the_video_track_unchanged(videos, name):
    source = videos[name]
    video = prepare_video(source)
    assert video.frame_count == 50
    assert sniff_content_type(video.mp4) == "video/mp4"
    assert video.mp4[4:8] == b"ftyp" and video.mp4.find(b"moov") < video.mp4.find(b"mdat")
    with _open_mp4(video.mp4) as c:
        assert len(c.streams) == 1 and c.streams.video[0].codec_context.name == \
            probe_video(source).codec
    # the coded pictures, bit for bit
    with av.open(str(source)) as c:
        original = [bytes(p) for p in c.demux(video=0) if p.size]
    assert _packets(video.mp4) == original
    assert _decode_count(video.mp4) == (50, 320, 240)
    again = probe_video(video.mp4)
    assert (again.profile, again.level, again.transfer_syntax_uid) == \
        (video.info.profile, video.info.level, video.transfer_syntax_uid)


def test_audio_and_metadata_are_dropped(videos, tmp_path):
    info = probe_video(videos["h264_audio"])
    assert info.has_audio
    video = prepare_video(videos["h264_audio"])
    assert video.frame_count == 50
    with _open_mp4(video.mp4) as c:
        assert not c.streams.audio and len(c.streams.video) == 1
    assert not probe_video(video.mp4).has_audio
    # a QuickTime file with GPS location and a title typed by the user
    src = tmp_path / "tagged.mov"
    src.write_bytes(make_video(fmt="mov", options=H264_HIGH_41, frames=10, metadata={
        "location": "+48.8577+002.2950/", "title": "Jane Doe left leg"}))
    raw = src.read_bytes()
    assert b"+48.8577" in raw and b"Jane Doe" in raw
    out = prepare_video(src).mp4
    assert b"+48.8577" not in out and b"Jane Doe" not in out and b"Lavf" not in out


def _rotate_90(mp4: bytes) -> bytes:
    """Set the first track header's display matrix to a 90° rotation, as phones do for
    portrait video (ISO/IEC 14496-12 tkhd, version 0)."""
    i = mp4.index(b"tkhd") + 4
    assert mp4[i] == 0
    at = i + 4 + 4 + 4 + 4 + 4 + 4 + 8 + 2 + 2 + 2 + 2
    matrix = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
    return mp4[:at] + matrix + mp4[at + 36:]


def test_rotation_is_reported_and_kept(videos):
    rotated = _rotate_90(videos["h264"].read_bytes())
    assert probe_video(videos["h264"]).rotation == 0
    info = probe_video(rotated)
    assert info.rotation in (90, 270)
    video = prepare_video(rotated)
    assert probe_video(video.mp4).rotation == info.rotation  # the matrix travels with it


def test_video_limits(videos):
    path = videos["h264"]
    with pytest.raises(MediaError) as err:
        prepare_video(path, max_bytes=path.stat().st_size - 1)
    assert err.value.code == E.TOO_LARGE
    with pytest.raises(MediaError) as err:
        prepare_video(path, max_seconds=1.5)
    assert err.value.code == E.TOO_LONG
    with pytest.raises(MediaError) as err:
        probe_video(path, max_seconds=1)
    assert err.value.code == E.TOO_LONG
    assert prepare_video(path, max_seconds=2.5).frame_count == 50


def test_truncated_videos(videos):
    # moov at the end (the default): cut, the file cannot be opened at all
    data = videos["h264"].read_bytes()
    with pytest.raises(MediaError) as err:
        prepare_video(data[: len(data) // 2])
    assert err.value.code == E.NOT_DECODABLE
    # moov first (faststart): it opens, but the samples stop short of the index
    data = videos["h264_faststart"].read_bytes()
    assert prepare_video(data).frame_count == 50
    with pytest.raises(MediaError) as err:
        prepare_video(data[: len(data) * 2 // 3])
    assert err.value.code == E.NOT_DECODABLE


def test_not_a_video(tmp_path):
    with pytest.raises(MediaError) as err:
        probe_video(make_pdf())
    assert err.value.code == E.TYPE_MISMATCH
    junk = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x00" * 200
    with pytest.raises(MediaError) as err:
        prepare_video(junk)
    assert err.value.code == E.NOT_DECODABLE
