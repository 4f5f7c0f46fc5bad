"""fhirbridge.media: sniffing, byte-level JPEG handling, photo preparation."""

from __future__ import annotations

import importlib.util
import io
import struct
from pathlib import Path

import pydicom
import pytest
from PIL import Image, ImageCms

from fhirbridge.media import jpeg as jp
from fhirbridge.media import photo as photo_mod
from fhirbridge.media.errors import MediaError
from fhirbridge.media.photo import ExifInfo, PreparedPhoto, check_photo, prepare_photo, read_exif
from fhirbridge.media.sniff import content_type_matches, sniff_content_type

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "samples" / "photo.jpg"
_spec = importlib.util.spec_from_file_location("make_samples", ROOT / "samples" / "make_samples.py")
make_samples = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_samples)


@pytest.fixture(scope="module")
def sample() -> bytes:
    return SAMPLE.read_bytes()


def _save(im: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **params)
    return buf.getvalue()


def _markers(data: bytes) -> list[int]:
    return [s.marker for s in jp.iter_segments(data)]


def _first_sos(data: bytes) -> int:
    return next(s.offset for s in jp.iter_segments(data) if s.marker == jp.SOS)


# -- sniffing --------------------------------------------------------------------------------

def _ftyp(major: bytes, *compatible: bytes) -> bytes:
    body = major + b"\x00\x00\x00\x00" + b"".join(compatible)
    return struct.pack(">I", 8 + len(body)) + b"ftyp" + body + b"\x00\x00\x00\x08free"


@pytest.mark.parametrize("data, expected", [
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "image/png"),
    (b"GIF89a\x01\x00\x01\x00", "image/gif"),
    (b"GIF87a\x01\x00\x01\x00", "image/gif"),
    (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "image/webp"),
    (b"II*\x00\x08\x00\x00\x00", "image/tiff"),
    (b"MM\x00*\x00\x00\x00\x08", "image/tiff"),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "application/pdf"),
    (_ftyp(b"heic", b"mif1", b"heic"), "image/heic"),
    (_ftyp(b"heix", b"mif1"), "image/heic"),
    (_ftyp(b"mif1", b"mif1", b"heic"), "image/heic"),  # Samsung-style: major mif1
    (_ftyp(b"mif1", b"mif1", b"miaf"), "image/heif"),
    (_ftyp(b"heim", b"mif1"), "image/heic"),
    (_ftyp(b"heis", b"mif1"), "image/heic"),
    (_ftyp(b"hevc", b"msf1"), "image/heic-sequence"),
    (_ftyp(b"hevx", b"msf1"), "image/heic-sequence"),
    (_ftyp(b"msf1", b"msf1"), "image/heif-sequence"),
    (_ftyp(b"avif", b"mif1", b"avif"), "image/avif"),
    (_ftyp(b"isom", b"isom", b"iso2", b"avc1", b"mp41"), "video/mp4"),
    (_ftyp(b"mp42", b"isom"), "video/mp4"),
    (_ftyp(b"qt  ", b"qt  "), "video/quicktime"),
    (_ftyp(b"xxxx", b"isom"), "video/mp4"),
    (_ftyp(b"3gp4", b"isom"), "video/3gpp"),
    (b"\x00\x00\x00\x08wide\x00\x00\x00\x00mdat", "video/quicktime"),
    (b"hello world, not an image", None),
    (b"", None),
    (b"\xff\xd8", None),
])
def test_sniff(data, expected):
    assert sniff_content_type(data) == expected


def test_sniff_sample(sample):
    assert sniff_content_type(sample) == "image/jpeg"


@pytest.mark.parametrize("declared, sniffed, ok", [
    ("image/jpeg", "image/jpeg", True),
    ("image/jpg", "image/jpeg", True),
    ("IMAGE/JPEG; charset=binary", "image/jpeg", True),
    ("image/pjpeg", "image/jpeg", True),
    ("image/heic", "image/heif", True),
    ("image/heif", "image/heic", True),
    ("image/heic", "image/heic-sequence", True),
    ("image/jpeg", "image/png", False),
    ("image/png", "image/jpeg", False),
    ("image/heic", "image/avif", False),
    ("application/pdf", "application/pdf", True),
    ("video/mp4", "video/quicktime", False),
    ("image/jpeg", None, False),
    ("", "image/jpeg", False),
])
def test_content_type_matches(declared, sniffed, ok):
    assert content_type_matches(declared, sniffed) is ok


# -- byte-level JPEG -------------------------------------------------------------------------

def test_sample_is_what_the_tests_need(sample):
    assert len(sample) < 40_000
    frame = jp.read_sof(sample)
    assert (frame.columns, frame.rows, frame.components) == (320, 240, 3)
    assert frame.is_baseline and frame.sof_marker == jp.SOF0 and frame.subsampling == "4:2:0"
    assert jp.exif_orientation(sample) == 1
    with Image.open(io.BytesIO(sample)) as im:
        exif = im.getexif()
        assert exif[0x010F] and exif[0x0110]
        assert exif.get_ifd(0x8769)[0x9003] == "2024:05:01 14:30:05"
        assert exif.get_ifd(0x8825)  # GPS IFD
        assert jp.icc_profile(sample) == im.info["icc_profile"]
    for needle in (b"Exif", b"GPS", b"WGS-84", b"http://ns.adobe.com/xap"):
        assert needle in sample


def test_iter_segments_structure(sample):
    markers = _markers(sample)
    assert markers[0] == jp.SOI and markers[-1] == jp.EOI
    assert jp.APP1 in markers and jp.APP2 in markers and jp.COM in markers
    assert markers.count(jp.SOS) == 1
    assert jp.iter_markers is jp.iter_segments


def test_read_sof_progressive_and_gray():
    im = make_samples.photo_image()
    prog = jp.read_sof(_save(im, progressive=True, quality=80))
    assert prog.sof_marker == 0xC2 and prog.is_progressive and not prog.is_baseline
    gray = jp.read_sof(_save(im.convert("L")))
    assert gray.components == 1 and gray.subsampling == "gray" and gray.is_baseline
    full = jp.read_sof(_save(im, subsampling=0))
    assert full.subsampling == "4:4:4"
    half = jp.read_sof(_save(im, subsampling=1))
    assert half.subsampling == "4:2:2"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(orientation):
    data = make_samples.photo_jpeg(orientation=orientation)
    assert jp.exif_orientation(data) == orientation
    with Image.open(io.BytesIO(data)) as im:
        assert im.getexif().get(0x0112) == orientation


def test_exif_orientation_absent_or_invalid():
    im = make_samples.photo_image()
    assert jp.exif_orientation(_save(im)) == 1
    exif = Image.Exif()
    exif[0x0112] = 9
    assert jp.exif_orientation(_save(im, exif=exif.tobytes())) == 1


def test_icc_profile_in_several_chunks():
    # A profile larger than one APP2 segment (Pillow splits at 65519 bytes).
    base = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    big = base + bytes(range(256)) * 600  # ~154 KB: 3 chunks
    data = _save(make_samples.photo_image(), icc_profile=big)
    assert sum(1 for s in jp.iter_segments(data) if s.marker == jp.APP2) == 3
    assert jp.icc_profile(data) == big
    # A missing chunk: no profile rather than a corrupt one.
    seg = [s for s in jp.iter_segments(data) if s.marker == jp.APP2][1]
    broken = data[:seg.offset] + data[seg.end:]
    assert jp.icc_profile(broken) is None
    assert jp.icc_profile(_save(make_samples.photo_image())) is None


def test_strip_keeps_scan_bytes_and_drops_metadata(sample):
    stripped = jp.strip_app_segments(sample)
    assert stripped[_first_sos(stripped):] == sample[_first_sos(sample):]
    markers = _markers(stripped)
    assert markers[:2] == [jp.SOI, jp.APP0]  # JFIF kept
    assert not [m for m in markers if m == jp.COM or 0xE1 <= m <= 0xEF]
    for needle in (b"Exif", b"GPS", b"WGS-84", b"http://ns.adobe.com/xap", b"ICC_PROFILE",
                   b"sample comment", b"FhirbridgeCam", b"SampleOS"):
        assert needle not in stripped
    # Every byte that is not a removed segment is unchanged: removing the segments from the
    # original by offsets gives exactly the stripped stream.
    removed = [s for s in jp.iter_segments(sample)
               if s.marker == jp.COM or 0xE1 <= s.marker <= 0xEF]
    rebuilt, pos = b"", 0
    for s in removed:
        rebuilt += sample[pos:s.offset]
        pos = s.end
    assert rebuilt + sample[pos:] == stripped
    # And it decodes to the very same pixels.
    with Image.open(io.BytesIO(sample)) as a, Image.open(io.BytesIO(stripped)) as b:
        assert a.tobytes() == b.tobytes()


def test_strip_keeps_adobe_and_drops_other_app0_and_trailer():
    cmyk = _save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)))
    assert jp.APP14 in _markers(cmyk)
    assert jp.APP14 in _markers(jp.strip_app_segments(cmyk))
    sample = make_samples.photo_jpeg()
    # A JFXX APP0 (thumbnail extension) and a motion-photo style trailer after EOI.
    jfxx = b"\xff\xe0" + struct.pack(">H", 2 + 6) + b"JFXX\x00\x10"
    data = sample[:20] + jfxx + sample[20:] + b"\x00\x00\x00\x18ftypmp42 trailing video"
    info = jp.inspect_jpeg(data)
    assert info.trailing_bytes > 0
    stripped = jp.strip_app_segments(data)
    assert b"JFXX" not in stripped and b"trailing video" not in stripped
    assert stripped.endswith(b"\xff\xd9")
    assert stripped == jp.strip_app_segments(sample)


def test_strip_removes_jfif_thumbnail():
    im = make_samples.photo_image()
    data = _save(im)
    seg = [s for s in jp.iter_segments(data) if s.marker == jp.APP0][0]
    payload = bytearray(seg.payload(data))
    payload[12:14] = b"\x02\x01"  # a 2x1 RGB thumbnail
    app0 = b"\xff\xe0" + struct.pack(">H", 2 + len(payload) + 6) + bytes(payload) + bytes(6)
    with_thumb = data[:seg.offset] + app0 + data[seg.end:]
    stripped = jp.strip_app_segments(with_thumb)
    assert stripped == data


def test_restart_markers_and_fill_bytes():
    im = make_samples.photo_image()
    data = _save(im, restart_marker_rows=1, exif=make_samples.photo_exif().tobytes())
    assert 0xDD in _markers(data)  # DRI
    assert any(b"\xff" + bytes([m]) in data[_first_sos(data):] for m in range(0xD0, 0xD8))
    # Fill bytes before a marker are legal (T.81 B.1.1.2).
    dqt = next(s for s in jp.iter_segments(data) if s.marker == jp.DQT)
    filled = data[:dqt.offset] + b"\xff\xff" + data[dqt.offset:]
    for d in (data, filled):
        stripped = jp.strip_app_segments(d)
        assert stripped[_first_sos(stripped):] == d[_first_sos(d):]
        with Image.open(io.BytesIO(d)) as a, Image.open(io.BytesIO(stripped)) as b:
            assert a.tobytes() == b.tobytes()


def test_progressive_scans_walked_and_metadata_between_scans_removed():
    data = _save(make_samples.photo_image(), progressive=True)
    segments = list(jp.iter_segments(data))
    sos = [s for s in segments if s.marker == jp.SOS]
    assert len(sos) > 2
    # A comment between the first and second scan (legal: "tables/misc." may appear there).
    second_scan_tables = next(s for s in segments if s.offset > sos[0].end)
    com = b"\xff\xfe\x00\x07hello"
    with_com = data[:second_scan_tables.offset] + com + data[second_scan_tables.offset:]
    info = jp.inspect_jpeg(with_com)
    assert info.scans == len(sos)
    assert jp.strip_app_segments(with_com) == jp.strip_app_segments(data)


def test_truncated_and_malformed(sample):
    cut = sample[: len(sample) // 2]
    assert jp.is_truncated(cut)
    assert not jp.is_truncated(sample)
    with pytest.raises(MediaError) as e:
        jp.inspect_jpeg(cut)
    assert e.value.code == "truncated"
    with pytest.raises(MediaError) as e:
        jp.inspect_jpeg(sample[:-2])  # no EOI
    assert e.value.code == "truncated"
    with pytest.raises(MediaError) as e:
        jp.inspect_jpeg(sample[:300])  # inside a segment
    assert e.value.code == "truncated"
    with pytest.raises(MediaError) as e:
        jp.inspect_jpeg(b"\x89PNG\r\n\x1a\n" + bytes(100))
    assert e.value.code == "not-decodable"
    # Headers only: read_sof does not need the scan data.
    assert jp.read_sof(cut).rows == 240


def test_two_frame_headers_refused(sample):
    sof = next(s for s in jp.iter_segments(sample) if s.marker == jp.SOF0)
    doubled = sample[:sof.end] + sample[sof.offset:sof.end] + sample[sof.end:]
    with pytest.raises(MediaError) as e:
        jp.inspect_jpeg(doubled)
    assert e.value.code == "not-decodable"


def test_media_error_is_plain():
    err = MediaError("truncated", "JPEG data ends before the EOI marker")
    assert (err.code, err.text) == ("truncated", "JPEG data ends before the EOI marker")
    import pickle

    again = pickle.loads(pickle.dumps(err))
    assert (again.code, again.text) == (err.code, err.text)


# -- prepare_photo ---------------------------------------------------------------------------

def test_pass_through(sample):
    p = prepare_photo(sample, "image/jpeg")
    assert isinstance(p, PreparedPhoto)
    assert (p.rows, p.columns, p.samples_per_pixel) == (240, 320, 3)
    assert p.photometric == "YBR_FULL_422"
    assert not p.derived and p.derivation_description == ""
    assert p.jpeg == jp.strip_app_segments(sample)
    assert p.jpeg[_first_sos(p.jpeg):] == sample[_first_sos(sample):]
    assert p.icc_profile == jp.icc_profile(sample)
    assert len(p.lossy_ratios) == 1 and p.lossy_ratio == p.lossy_ratios[0]
    assert float(p.lossy_ratio) == pytest.approx(240 * 320 * 3 / len(p.jpeg), rel=1e-3)
    assert prepare_photo(sample, "image/jpg").jpeg == p.jpeg


def test_exif_info(sample):
    p = prepare_photo(sample, "image/jpeg")
    e = p.exif
    assert e.make == "FhirbridgeCam" and e.model == "Model 7 Pro"
    assert e.datetime_original.isoformat() == "2024-05-01T14:30:05.250000+02:00"
    assert e.exposure_time == pytest.approx(1 / 120)
    assert e.f_number == pytest.approx(1.8)
    assert e.focal_length == pytest.approx(4.25)
    assert read_exif(None) == ExifInfo()
    assert read_exif(b"garbage, not TIFF") == ExifInfo()


def test_exif_without_offset_is_naive():
    exif = Image.Exif()
    exif[0x8769] = {0x9003: "2023:12:24 08:00:00"}
    data = _save(make_samples.photo_image(), exif=exif.tobytes())
    dt = prepare_photo(data, "image/jpeg").exif.datetime_original
    assert dt.tzinfo is None and dt.isoformat() == "2023-12-24T08:00:00"
    exif[0x8769] = {0x9003: "0000:00:00 00:00:00"}
    data = _save(make_samples.photo_image(), exif=exif.tobytes())
    assert prepare_photo(data, "image/jpeg").exif.datetime_original is None


def test_progressive_reencoded_to_baseline():
    data = make_samples.photo_jpeg(progressive=True)
    assert jp.read_sof(data).sof_marker == 0xC2
    p = prepare_photo(data, "image/jpeg")
    frame = jp.read_sof(p.jpeg)
    assert frame.sof_marker == jp.SOF0 and frame.is_baseline and frame.subsampling == "4:2:0"
    assert p.derived and "progressive" in p.derivation_description
    assert len(p.lossy_ratios) == 2
    assert p.icc_profile == jp.icc_profile(data)
    assert not [m for m in _markers(p.jpeg) if m == jp.COM or 0xE1 <= m <= 0xEF]


def test_444_reencoded_to_420():
    data = make_samples.photo_jpeg(subsampling=0)
    p = prepare_photo(data, "image/jpeg")
    assert jp.read_sof(p.jpeg).subsampling == "4:2:0"
    assert p.derived and "4:4:4" in p.derivation_description
    assert p.photometric == "YBR_FULL_422"


def test_422_passes_through():
    data = make_samples.photo_jpeg(subsampling=1)
    p = prepare_photo(data, "image/jpeg")
    assert not p.derived and jp.read_sof(p.jpeg).subsampling == "4:2:2"


def test_cmyk_reencoded_as_rgb():
    im = Image.new("CMYK", (64, 48), (0, 0, 0, 0))  # white
    im.paste((0, 255, 255, 0), (0, 0, 32, 48))  # red left half
    data = _save(im, quality=95)
    assert jp.inspect_jpeg(data).color_space == "CMYK"
    p = prepare_photo(data, "image/jpeg")
    assert p.derived and "CMYK" in p.derivation_description
    assert p.samples_per_pixel == 3 and p.photometric == "YBR_FULL_422"
    info = jp.inspect_jpeg(p.jpeg)
    assert info.frame.components == 3 and info.color_space == "YCbCr" and info.frame.is_baseline
    with Image.open(io.BytesIO(p.jpeg)) as out:
        rgb = out.convert("RGB")
        r, g, b = rgb.getpixel((8, 24))
        assert r > 200 and g < 60 and b < 60
        assert min(rgb.getpixel((56, 24))) > 200


def test_cmyk_with_unusable_profile_falls_back():
    # LittleCMS cannot make a CMYK profile here; a non-CMYK profile on CMYK data is unusable,
    # so the plain conversion is used and no profile is recorded.
    im = Image.new("CMYK", (32, 32), (0, 255, 255, 0))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    p = prepare_photo(_save(im, icc_profile=srgb), "image/jpeg", uniform_stddev=0)
    assert p.derived and p.samples_per_pixel == 3 and p.icc_profile is None


def test_rgb_coded_jpeg_reencoded():
    im = make_samples.photo_image()
    data = _save(im, keep_rgb=True, subsampling=0)
    assert jp.inspect_jpeg(data).color_space == "RGB"
    p = prepare_photo(data, "image/jpeg")
    assert p.derived and jp.inspect_jpeg(p.jpeg).color_space == "YCbCr"


def test_gray_passes_through_as_monochrome2():
    data = _save(make_samples.photo_image().convert("L"), quality=90)
    p = prepare_photo(data, "image/jpeg")
    assert not p.derived and p.samples_per_pixel == 1 and p.photometric == "MONOCHROME2"


def test_rotated_photo_is_derived_and_upright():
    data = make_samples.photo_jpeg(orientation=6)
    p = prepare_photo(data, "image/jpeg")
    assert p.derived and "orientation 6" in p.derivation_description
    assert (p.rows, p.columns) == (320, 240)  # the stored 320x240 turned upright
    assert jp.exif_orientation(p.jpeg) == 1 and b"Exif" not in p.jpeg
    assert p.icc_profile == jp.icc_profile(data)


def test_truncated_photo():
    data = make_samples.photo_jpeg()
    with pytest.raises(MediaError) as e:
        prepare_photo(data[: len(data) * 2 // 3], "image/jpeg")
    assert e.value.code == "truncated"


def _with_size(data: bytes, rows: int, columns: int) -> bytes:
    sof = next(s for s in jp.iter_segments(data, headers_only=True) if s.marker in jp.SOF_MARKERS)
    p = sof.offset + 5
    return data[:p] + struct.pack(">HH", rows, columns) + data[p + 4:]


def test_too_many_pixels_checked_before_decoding(monkeypatch):
    data = _with_size(make_samples.photo_jpeg(orientation=6), 50000, 50000)

    def no_decoding(*args, **kwargs):
        raise AssertionError("Pillow must not be asked to open this")

    monkeypatch.setattr(photo_mod.Image, "open", no_decoding)
    with pytest.raises(MediaError) as e:
        prepare_photo(data, "image/jpeg")
    assert e.value.code == "too-many-pixels"
    # Also for a header claiming the size on a truncated stream: the size comes first.
    with pytest.raises(MediaError) as e:
        prepare_photo(data[:_first_sos(data) + 100], "image/jpeg")
    assert e.value.code == "too-many-pixels"


def test_pixel_limit_and_min_side(sample):
    with pytest.raises(MediaError) as e:
        prepare_photo(sample, "image/jpeg", max_pixels=320 * 240 - 1)
    assert e.value.code == "too-many-pixels"
    assert prepare_photo(sample, "image/jpeg", max_pixels=320 * 240).rows == 240
    with pytest.raises(MediaError) as e:
        prepare_photo(sample, "image/jpeg", min_side=241)
    assert e.value.code == "too-small"
    assert prepare_photo(sample, "image/jpeg", min_side=240).columns == 320


def test_pillow_bomb_warning_is_an_error(monkeypatch, sample):
    # Defence in depth behind the frame-header check: Pillow's own warning becomes an error.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # 76,800 px: warns, < 2x
    with pytest.raises(MediaError) as e:
        photo_mod._decode(sample, 10_000)
    assert e.value.code == "too-many-pixels"


def test_twelve_bit_is_not_decodable(sample):
    sof = next(s for s in jp.iter_segments(sample) if s.marker == jp.SOF0)
    data = bytearray(make_samples.photo_jpeg(orientation=1))
    data[sof.offset + 4] = 12
    with pytest.raises(MediaError) as e:
        prepare_photo(bytes(data), "image/jpeg")
    assert e.value.code == "not-decodable"


def test_types(sample):
    with pytest.raises(MediaError) as e:
        prepare_photo(sample, "image/gif")
    assert e.value.code == "unsupported-type"
    with pytest.raises(MediaError) as e:
        prepare_photo(sample, "image/png")
    assert e.value.code == "type-mismatch"
    with pytest.raises(MediaError) as e:
        prepare_photo(b"\x89PNG\r\n\x1a\n" + bytes(64), "image/jpeg")
    assert e.value.code == "type-mismatch"
    with pytest.raises(MediaError) as e:
        prepare_photo(b"", "image/jpeg")
    assert e.value.code == "not-decodable"


def test_error_texts_carry_no_data():
    data = make_samples.photo_jpeg()
    for bad, kwargs in ((data[:5000], {}), (data, {"min_side": 10_000}),
                        (data, {"max_pixels": 10})):
        with pytest.raises(MediaError) as e:
            prepare_photo(bad, "image/jpeg", **kwargs)
        assert "FhirbridgeCam" not in e.value.text and "2024" not in e.value.text


def twelve_bit_jpeg(tmp_path) -> bytes:
    """A 12-bit greyscale JPEG (T.81 extended sequential, SOF1), made by DCMTK's dcmcjpeg."""
    import subprocess

    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import generate_frames
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    h, w = 240, 320
    arr = (np.linspace(0, 4095, w)[None, :] * np.ones((h, 1))).astype(np.uint16)
    arr[: h // 4, : w // 4] = 4000  # a bright block top-left
    ds.Rows, ds.Columns, ds.SamplesPerPixel = h, w, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = arr.tobytes()
    ds.save_as(tmp_path / "in.dcm", enforce_file_format=True)
    subprocess.run(["dcmcjpeg", "+ee", str(tmp_path / "in.dcm"), str(tmp_path / "out.dcm")],
                   check=True)
    out = pydicom.dcmread(tmp_path / "out.dcm")
    return next(generate_frames(out.PixelData, number_of_frames=1))


def test_12_bit_jpeg_is_reencoded_as_8_bit_baseline(tmp_path):
    data = twelve_bit_jpeg(tmp_path)
    assert jp.read_headers(data).frame.precision == 12
    check_photo(data, "image/jpeg")
    p = prepare_photo(data, "image/jpeg")
    assert p.derived and "12-bit source" in p.derivation_description
    assert p.photometric == "MONOCHROME2" and (p.rows, p.columns) == (240, 320)
    frame = jp.read_headers(p.jpeg).frame
    assert frame.is_baseline
    out = Image.open(io.BytesIO(p.jpeg))
    assert out.getpixel((10, 10)) > 240 and 230 < out.getpixel((300, 100)) < 250
