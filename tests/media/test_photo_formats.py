"""fhirbridge.media.photo: PNG, HEIC/HEIF and WebP sources, the blank-image (uniform) check,
EXIF orientation for every value, and DICOM objects built from the new formats.

Every fixture is made here with Pillow / pillow-heif (HEIC encoded with x265)."""

from __future__ import annotations

import importlib.util
import io
import struct
import time
import zlib
from datetime import datetime
from pathlib import Path

import pillow_heif
import pytest
from PIL import Image, PngImagePlugin

from fhirbridge.dicom.context import CodedConcept, PatientDemographics, StudyContext
from fhirbridge.dicom.io import write_dataset
from fhirbridge.dicom.photo import build_vl_photographic
from fhirbridge.dicom.uids import uid_from
from fhirbridge.media import jpeg as jp
from fhirbridge.media import photo as photo_mod
from fhirbridge.media.errors import MediaError
from fhirbridge.media.photo import SUPPORTED_TYPES, check_photo, prepare_photo

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("make_samples", ROOT / "samples" / "make_samples.py")
make_samples = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_samples)

pillow_heif.register_heif_opener()  # for encoding fixtures (Image.save(..., "HEIF"))

RED = (220, 30, 30)
BACKGROUND = (40, 120, 200)
SECRETS = (b"GPS", b"WGS-84", b"FhirbridgeCam", b"Model 7 Pro", b"Exif", b"2024:05:01",
           b"SampleOS")


# -- fixtures --------------------------------------------------------------------------------

def pattern(size: tuple[int, int] = (96, 64)) -> Image.Image:
    """Upright picture: blue background with a red block in the top-left corner only."""
    im = Image.new("RGB", size, BACKGROUND)
    im.paste(RED, (0, 0, size[0] // 4, size[1] // 4))
    return im


# Stored pixels for an EXIF orientation: the inverse of the transpose that turns them upright.
_INVERSE = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def stored_for(upright: Image.Image, orientation: int) -> Image.Image:
    method = _INVERSE[orientation]
    return upright if method is None else upright.transpose(method)


def is_red(px) -> bool:
    r, g, b = px[:3]
    return r > 150 and g < 110 and b < 110


def assert_upright(jpeg: bytes, size: tuple[int, int] = (96, 64)) -> None:
    """The decoded output has the red block in the top-left corner and nowhere else."""
    with Image.open(io.BytesIO(jpeg)) as im:
        im = im.convert("RGB")
        assert im.size == size
        w, h = size
        assert is_red(im.getpixel((6, 6)))
        for corner in ((w - 7, 6), (6, h - 7), (w - 7, h - 7)):
            assert not is_red(im.getpixel(corner)), corner


def srgb() -> bytes:
    return make_samples.srgb_profile()


def png(im: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **params)
    return buf.getvalue()


def webp(im: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "WEBP", **params)
    return buf.getvalue()


def heic(im: Image.Image, **params) -> bytes:
    params.setdefault("quality", 90)
    buf = io.BytesIO()
    im.save(buf, "HEIF", **params)
    return buf.getvalue()


def jpeg(im: Image.Image, **params) -> bytes:
    params.setdefault("quality", 90)
    buf = io.BytesIO()
    im.save(buf, "JPEG", **params)
    return buf.getvalue()


def chunk(ctype: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + ctype + body
            + struct.pack(">I", zlib.crc32(ctype + body) & 0xFFFFFFFF))


def raw_png(width: int, height: int, depth: int, color: int, rows: list[bytes]) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    idat = zlib.compress(b"".join(b"\x00" + r for r in rows))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def decoded(p) -> Image.Image:
    im = Image.open(io.BytesIO(p.jpeg))
    im.load()
    return im


def close(a, b, tol: int = 6) -> bool:
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def no_secrets(data: bytes) -> None:
    for secret in SECRETS:
        assert secret not in data, secret


# -- PNG -------------------------------------------------------------------------------------

def test_png_rgb_is_reencoded_from_pixels():
    p = prepare_photo(png(make_samples.photo_image()), "image/png")
    assert (p.columns, p.rows, p.samples_per_pixel) == (320, 240, 3)
    assert p.photometric == "YBR_FULL_422" and p.derived
    assert "PNG source" in p.derivation_description
    assert len(p.lossy_ratios) == 1  # PNG is lossless: only our own JPEG step
    assert p.source_content_type == "image/png" and p.icc_profile is None
    info = jp.inspect_jpeg(p.jpeg)
    assert info.frame.is_baseline and info.frame.subsampling == "4:2:0"
    check_photo(png(make_samples.photo_image()), "image/png")


def test_png_rgba_flattened_onto_white():
    im = pattern().convert("RGBA")
    im.paste((0, 0, 0, 0), (48, 0, 96, 64))  # right half fully transparent (black underneath)
    p = prepare_photo(png(im), "image/png")
    assert p.photometric == "YBR_FULL_422"
    out = decoded(p).convert("RGB")
    assert close(out.getpixel((80, 40)), (255, 255, 255))
    assert close(out.getpixel((30, 40)), BACKGROUND)
    assert "transparency flattened onto white" in p.derivation_description


def test_png_la_stays_greyscale_and_is_flattened():
    im = Image.new("LA", (64, 64), (40, 255))
    im.paste((200, 255), (0, 0, 16, 16))
    im.paste((0, 0), (32, 0, 64, 64))  # transparent
    p = prepare_photo(png(im), "image/png")
    assert (p.samples_per_pixel, p.photometric) == (1, "MONOCHROME2")
    out = decoded(p)
    assert out.mode == "L"
    assert close(out.getpixel((50, 40)), 255) and close(out.getpixel((20, 40)), 40)


def test_png_palette_with_and_without_transparency():
    base = pattern().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    p = prepare_photo(png(base), "image/png")
    assert p.photometric == "YBR_FULL_422"
    assert_upright(p.jpeg)
    # tRNS: the background's palette index fully transparent → white.
    index = base.getpixel((90, 60))
    p = prepare_photo(png(base, transparency=index), "image/png")
    out = decoded(p).convert("RGB")
    assert close(out.getpixel((80, 50)), (255, 255, 255))
    assert is_red(out.getpixel((6, 6)))


def test_png_grey_and_rgb_with_trns():
    grey = Image.new("L", (64, 64), 30)
    grey.paste(200, (0, 0, 32, 64))
    p = prepare_photo(png(grey, transparency=30), "image/png")
    assert p.photometric == "MONOCHROME2"
    assert close(decoded(p).getpixel((50, 30)), 255) and close(decoded(p).getpixel((10, 30)), 200)
    rgb = pattern()
    p = prepare_photo(png(rgb, transparency=BACKGROUND), "image/png")
    out = decoded(p).convert("RGB")
    assert close(out.getpixel((80, 50)), (255, 255, 255)) and is_red(out.getpixel((6, 6)))


def test_png_greyscale_stays_monochrome2():
    im = make_samples.photo_image().convert("L")
    p = prepare_photo(png(im), "image/png")
    assert (p.samples_per_pixel, p.photometric) == (1, "MONOCHROME2")
    assert jp.inspect_jpeg(p.jpeg).color_space == "GRAY"


def test_png_16bit_grey_is_scaled_not_clipped():
    im = Image.new("I;16", (64, 32), 10_000)
    im.paste(Image.new("I;16", (32, 32), 40_000), (0, 0))  # (paste(int) wraps for I;16)
    assert im.getpixel((10, 10)) == 40_000
    data = png(im)
    assert data[24:26] == b"\x10\x00"  # bit depth 16, colour type 0
    p = prepare_photo(data, "image/png")
    assert p.photometric == "MONOCHROME2"
    out = decoded(p)
    assert close(out.getpixel((10, 10)), 40_000 // 256, 2)  # 156, not 255 (clipped)
    assert close(out.getpixel((50, 10)), 10_000 // 256, 2)  # 39
    assert "16-bit" in p.derivation_description


def test_png_16bit_rgb_is_reduced_to_8bit():
    left = struct.pack(">3H", 0xC000, 0x4000, 0x2000)
    right = struct.pack(">3H", 0x1000, 0x8000, 0xF000)
    rows = [left * 32 + right * 32] * 32
    p = prepare_photo(raw_png(64, 32, 16, 2, rows), "image/png")
    assert p.photometric == "YBR_FULL_422"
    out = decoded(p).convert("RGB")
    assert close(out.getpixel((8, 16)), (0xC0, 0x40, 0x20), 8)
    assert close(out.getpixel((56, 16)), (0x10, 0x80, 0xF0), 8)


def test_png_16bit_grey_alpha_stays_greyscale():
    px = struct.pack(">2H", 0x8000, 0xFFFF)
    clear = struct.pack(">2H", 0x0000, 0x0000)
    rows = [px * 16 + clear * 16] * 16
    p = prepare_photo(raw_png(32, 16, 16, 4, rows), "image/png")
    assert p.photometric == "MONOCHROME2"
    out = decoded(p)
    assert close(out.getpixel((4, 8)), 0x80, 3) and close(out.getpixel((28, 8)), 255, 3)


def test_png_icc_kept_and_only_when_it_fits():
    p = prepare_photo(png(make_samples.photo_image(), icc_profile=srgb()), "image/png")
    assert p.icc_profile == srgb()
    assert b"ICC_PROFILE" not in p.jpeg and b"acsp" not in p.jpeg  # carried by DICOM only
    # An RGB profile on a greyscale image describes nothing we store: dropped.
    grey = make_samples.photo_image().convert("L")
    assert prepare_photo(png(grey, icc_profile=srgb()), "image/png").icc_profile is None


def test_png_exif_orientation_applied_and_no_metadata_carried():
    exif = make_samples.photo_exif(orientation=6)  # with GPS, make, model, dates
    text = PngImagePlugin.PngInfo()
    text.add_text("Comment", "FhirbridgeCam secret text")
    text.add_itxt("Description", "Model 7 Pro iTXt", zip=False)
    data = png(stored_for(pattern(), 6), exif=exif, pnginfo=text,
               icc_profile=srgb())
    assert b"eXIf" in data and b"WGS-84" in data and b"iTXt" in data
    p = prepare_photo(data, "image/png")
    assert_upright(p.jpeg)
    assert (p.columns, p.rows) == (96, 64)
    assert "orientation 6" in p.derivation_description
    assert p.exif.make == "FhirbridgeCam" and p.exif.model == "Model 7 Pro"
    assert p.exif.datetime_original is not None and p.exif.f_number == pytest.approx(1.8)
    no_secrets(p.jpeg)
    assert b"secret text" not in p.jpeg and b"iTXt" not in p.jpeg
    assert not any(s.marker in (jp.APP1, jp.COM) for s in jp.iter_segments(p.jpeg))


def test_png_exif_after_the_image_data_is_read():
    data = png(stored_for(pattern(), 6), exif=make_samples.photo_exif(orientation=6))
    chunks, pos = [], 8
    while pos < len(data):
        n = struct.unpack(">I", data[pos:pos + 4])[0]
        chunks.append(data[pos:pos + 12 + n])
        pos += 12 + n
    exif = next(c for c in chunks if c[4:8] == b"eXIf")
    chunks.remove(exif)
    chunks.insert(len(chunks) - 1, exif)  # just before IEND, after IDAT (allowed by PNG 1.5)
    p = prepare_photo(data[:8] + b"".join(chunks), "image/png")
    assert_upright(p.jpeg)
    assert p.exif.make == "FhirbridgeCam"


def png_bomb_header() -> bytes:
    """Signature + IHDR claiming 50,000 x 50,000 (CRC right), and nothing else."""
    ihdr = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)


def test_png_bomb_refused_from_the_header(monkeypatch):
    data = png_bomb_header()

    def no_decoding(*args, **kwargs):
        raise AssertionError("Pillow must not be asked to open this")

    monkeypatch.setattr(photo_mod.Image, "open", no_decoding)
    for fn in (check_photo, prepare_photo):
        start = time.perf_counter()
        with pytest.raises(MediaError) as e:
            fn(data, "image/png")
        assert e.value.code == "too-many-pixels"
        assert time.perf_counter() - start < 0.05
        assert "2500000000 pixels" in e.value.text


def test_png_limits_and_structure():
    data = png(make_samples.photo_image())
    with pytest.raises(MediaError) as e:
        prepare_photo(data, "image/png", max_pixels=320 * 240 - 1)
    assert e.value.code == "too-many-pixels"
    with pytest.raises(MediaError) as e:
        check_photo(data, "image/png", min_side=241)
    assert e.value.code == "too-small"
    for fn in (check_photo, prepare_photo):
        with pytest.raises(MediaError) as e:
            fn(data[: len(data) // 2], "image/png")
        assert e.value.code == "truncated"
    bad_crc = bytearray(data)
    bad_crc[20] ^= 0x01  # inside IHDR's width
    with pytest.raises(MediaError) as e:
        check_photo(bytes(bad_crc), "image/png")
    assert e.value.code == "not-decodable"
    with pytest.raises(MediaError) as e:
        prepare_photo(jpeg(pattern()), "image/png")
    assert e.value.code == "type-mismatch"


def test_png_corrupt_image_data_is_not_decodable():
    data = bytearray(png(make_samples.photo_image()))
    idat = data.find(b"IDAT")
    for i in range(idat + 40, idat + 400):
        data[i] ^= 0x5A
    with pytest.raises(MediaError) as e:
        prepare_photo(bytes(data), "image/png")
    assert e.value.code in ("not-decodable", "truncated")
    assert "decoded" in e.value.text or "ends" in e.value.text


def test_animated_png_is_unsupported():
    frames = [pattern(), pattern().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    data = png(frames[0], save_all=True, append_images=frames[1:])
    assert b"acTL" in data
    for fn in (check_photo, prepare_photo):
        with pytest.raises(MediaError) as e:
            fn(data, "image/png")
        assert e.value.code == "unsupported-type"


@pytest.mark.parametrize("fmt", ["png", "heic", "webp"])
def test_pillow_bomb_rule_applies_to_every_format(monkeypatch, fmt):
    data, ctype = _encode(fmt, make_samples.photo_image())  # 76,800 px
    # Our limit allows it; Pillow's (monkeypatched down) does not: its rule still refuses.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)  # 2x = 60,000 < 76,800: an error
    with pytest.raises(MediaError) as e:
        prepare_photo(data, ctype, max_pixels=100_000)
    assert e.value.code == "too-many-pixels"
    # Between Pillow's limit and 2x it only warns: the warning is an error too (defence in
    # depth behind the header check, as tests/media/test_jpeg.py checks for JPEG).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)
    if fmt != "heic":
        with pytest.raises(MediaError) as e:
            photo_mod._decode(data, 10_000, formats=(fmt.upper(),), label=fmt)
        assert e.value.code == "too-many-pixels"


# -- HEIC / HEIF -----------------------------------------------------------------------------

def test_heic_photo():
    data = heic(make_samples.photo_image(), exif=make_samples.photo_exif().tobytes(),
                icc_profile=srgb())
    p = prepare_photo(data, "image/heic")
    assert (p.columns, p.rows, p.photometric) == (320, 240, "YBR_FULL_422")
    assert p.derived and "HEIC source" in p.derivation_description
    assert p.source_content_type == "image/heic" and len(p.lossy_ratios) == 1
    assert p.icc_profile == srgb()
    assert p.exif.make == "FhirbridgeCam" and p.exif.model == "Model 7 Pro"
    assert p.exif.datetime_original.year == 2024
    assert p.exif.exposure_time == pytest.approx(1 / 120)
    no_secrets(p.jpeg)
    check_photo(data, "image/heic")
    assert prepare_photo(data, "image/heif").jpeg == p.jpeg  # the family is one type


def test_heic_rotated_lands_upright_exactly_once():
    data = heic(stored_for(pattern(), 6), exif=make_samples.photo_exif(orientation=6).tobytes())
    assert b"irot" in data  # stored sideways, with the HEIF rotation, as phones write it
    p = prepare_photo(data, "image/heic")
    assert (p.columns, p.rows) == (96, 64)
    assert_upright(p.jpeg)
    assert "orientation 6 not applied again" in p.derivation_description
    assert p.exif.make == "FhirbridgeCam"
    no_secrets(p.jpeg)


def test_heic_with_alpha_is_flattened():
    im = pattern().convert("RGBA")
    im.paste((0, 0, 0, 0), (48, 0, 96, 64))
    p = prepare_photo(heic(im), "image/heic")
    out = decoded(p).convert("RGB")
    assert close(out.getpixel((80, 40)), (255, 255, 255), 10)
    assert is_red(out.getpixel((6, 6)))


def test_heic_truncated_and_corrupt():
    data = heic(make_samples.photo_image())
    for cut in (len(data) // 2, len(data) - 10):
        for fn in (check_photo, prepare_photo):
            with pytest.raises(MediaError) as e:
                fn(data[:cut], "image/heic")
            assert e.value.code == "truncated"
            assert "HEIF" in e.value.text
    # Whole length, garbage inside the meta box: libheif refuses it.
    meta = data.find(b"meta")
    bad = data[:meta + 8] + bytes(range(200)) + data[meta + 208:]
    with pytest.raises(MediaError) as e:
        prepare_photo(bad, "image/heic")
    assert e.value.code in ("not-decodable", "truncated") and "HEI" in e.value.text


def test_heic_size_limits_from_the_header(monkeypatch):
    data = heic(make_samples.photo_image())

    def no_decoding(*args, **kwargs):
        raise AssertionError("must not decode")

    monkeypatch.setattr(pillow_heif.HeifImage, "to_pillow", no_decoding)
    for fn in (check_photo, prepare_photo):
        with pytest.raises(MediaError) as e:
            fn(data, "image/heic", max_pixels=1000)
        assert e.value.code == "too-many-pixels"
        with pytest.raises(MediaError) as e:
            fn(data, "image/heic", min_side=300)
        assert e.value.code == "too-small"


def _with_brands(data: bytes, old: bytes, new: bytes) -> bytes:
    size = struct.unpack(">I", data[:4])[0]
    return data[:size].replace(old, new) + data[size:]


def test_heic_sequences_and_other_types_are_unsupported():
    data = heic(make_samples.photo_image())
    for declared in ("image/heic-sequence", "image/heif-sequence"):
        with pytest.raises(MediaError) as e:
            prepare_photo(data, declared)
        assert e.value.code == "unsupported-type"
    sequence = _with_brands(data, b"heic", b"hevc")
    for fn in (check_photo, prepare_photo):
        with pytest.raises(MediaError) as e:
            fn(sequence, "image/heic")
        assert e.value.code == "unsupported-type"
    with pytest.raises(MediaError) as e:
        prepare_photo(jpeg(pattern()), "image/heic")
    assert e.value.code == "type-mismatch"
    with pytest.raises(MediaError) as e:
        prepare_photo(data, "image/jpeg")
    assert e.value.code == "type-mismatch"


# -- WebP ------------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [dict(quality=90), dict(lossless=True)])
def test_webp_photo(params):
    data = webp(stored_for(pattern(), 8), exif=make_samples.photo_exif(8).tobytes(),
                icc_profile=srgb(), **params)
    p = prepare_photo(data, "image/webp")
    assert p.photometric == "YBR_FULL_422" and "WebP source" in p.derivation_description
    assert_upright(p.jpeg)
    assert p.icc_profile == srgb() and p.exif.make == "FhirbridgeCam"
    assert len(p.lossy_ratios) == 1
    no_secrets(p.jpeg)
    check_photo(data, "image/webp")


def test_webp_alpha_flattened():
    im = pattern().convert("RGBA")
    im.paste((0, 0, 0, 0), (48, 0, 96, 64))
    p = prepare_photo(webp(im, lossless=True), "image/webp")
    out = decoded(p).convert("RGB")
    assert close(out.getpixel((80, 40)), (255, 255, 255)) and is_red(out.getpixel((6, 6)))


def test_animated_webp_is_unsupported():
    frames = [pattern(), pattern().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    data = webp(frames[0], save_all=True, append_images=frames[1:], duration=100)
    for fn in (check_photo, prepare_photo):
        with pytest.raises(MediaError) as e:
            fn(data, "image/webp")
        assert e.value.code == "unsupported-type"
        assert "image/jpeg" in e.value.text


def test_webp_limits_and_truncation():
    data = webp(make_samples.photo_image())
    with pytest.raises(MediaError) as e:
        check_photo(data, "image/webp", max_pixels=1000)
    assert e.value.code == "too-many-pixels"
    for fn in (check_photo, prepare_photo):
        with pytest.raises(MediaError) as e:
            fn(data[: len(data) // 2], "image/webp")
        assert e.value.code == "truncated"


# -- unsupported types -----------------------------------------------------------------------

def test_supported_types():
    assert set(SUPPORTED_TYPES) == {"image/jpeg", "image/png", "image/heic", "image/heif",
                                    "image/webp"}


@pytest.mark.parametrize("content_type, fmt", [("image/gif", "GIF"), ("image/tiff", "TIFF"),
                                               ("image/bmp", "BMP"), ("image/avif", None)])
def test_other_types_are_unsupported_with_the_list(content_type, fmt):
    data = b"\x00" * 64
    if fmt:
        buf = io.BytesIO()
        pattern().save(buf, fmt)
        data = buf.getvalue()
    for fn in (check_photo, prepare_photo):
        with pytest.raises(MediaError) as e:
            fn(data, content_type)
        assert e.value.code == "unsupported-type"
        assert all(t in e.value.text for t in SUPPORTED_TYPES)


# -- blank / uniform images ------------------------------------------------------------------

def _encode(fmt: str, im: Image.Image) -> tuple[bytes, str]:
    if fmt == "jpeg":
        return jpeg(im, subsampling=2), "image/jpeg"
    if fmt == "png":
        return png(im), "image/png"
    if fmt == "heic":
        return heic(im), "image/heic"
    return webp(im), "image/webp"


@pytest.mark.parametrize("fmt", ["jpeg", "png", "heic", "webp"])
@pytest.mark.parametrize("colour", [(255, 255, 255), (128, 128, 128), (30, 140, 60)])
def test_uniform_image_is_refused(fmt, colour):
    data, ctype = _encode(fmt, Image.new("RGB", (320, 240), colour))
    check_photo(data, ctype)  # intake stays cheap: the check runs in the worker
    with pytest.raises(MediaError) as e:
        prepare_photo(data, ctype)
    assert e.value.code == "uniform-image"
    assert e.value.text == "image is blank or a single colour"
    p = prepare_photo(data, ctype, uniform_stddev=0)  # 0 disables the check
    assert (p.columns, p.rows) == (320, 240)


def test_uniform_check_on_pass_through_jpeg_and_transparent_png():
    data = jpeg(Image.new("L", (640, 480), 200))
    with pytest.raises(MediaError) as e:
        prepare_photo(data, "image/jpeg")
    assert e.value.code == "uniform-image"
    p = prepare_photo(data, "image/jpeg", uniform_stddev=0)
    assert not p.derived  # still the pass-through path
    # Fully transparent: flattened onto white → blank.
    with pytest.raises(MediaError) as e:
        prepare_photo(png(Image.new("RGBA", (64, 64), (255, 0, 0, 0))), "image/png")
    assert e.value.code == "uniform-image"


@pytest.mark.parametrize("fmt", ["jpeg", "png", "heic", "webp"])
def test_normal_photo_passes(fmt):
    data, ctype = _encode(fmt, make_samples.photo_image())
    p = prepare_photo(data, ctype)
    assert (p.columns, p.rows) == (320, 240)
    assert p.derived is (fmt != "jpeg")


def test_threshold_is_applied():
    # A faint 1-level checkerboard: std-dev ~0.5 — refused at 2.0, accepted at 0.1.
    im = Image.new("L", (256, 256), 100)
    px = im.load()
    for y in range(256):
        for x in range(256):
            if (x // 32 + y // 32) % 2:
                px[x, y] = 101
    data = png(im)
    with pytest.raises(MediaError):
        prepare_photo(data, "image/png")
    assert prepare_photo(data, "image/png", uniform_stddev=0.1).rows == 256
    with pytest.raises(MediaError):
        prepare_photo(png(make_samples.photo_image()), "image/png", uniform_stddev=1000)


def test_pass_through_uniform_check_uses_a_scaled_decode(monkeypatch):
    from PIL import JpegImagePlugin

    seen = []
    real = JpegImagePlugin.JpegImageFile.draft

    def draft(self, mode, size):
        seen.append((mode, size))
        return real(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
    p = prepare_photo(make_samples.photo_jpeg(), "image/jpeg")  # 320x240, passes through
    assert not p.derived
    assert seen == [("L", (40, 30))]  # luminance only, DCT-scaled to 1/8
    seen.clear()
    prepare_photo(make_samples.photo_jpeg(), "image/jpeg", uniform_stddev=0)
    assert seen == []  # disabled: no decode at all


# -- JPEG: every EXIF orientation ------------------------------------------------------------

@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_every_orientation_lands_upright(orientation):
    data = jpeg(stored_for(pattern(), orientation),
                exif=make_samples.photo_exif(orientation).tobytes(), subsampling=2)
    p = prepare_photo(data, "image/jpeg")
    assert_upright(p.jpeg)
    assert p.derived is (orientation != 1)
    assert jp.exif_orientation(p.jpeg) == 1
    no_secrets(p.jpeg)


# -- error texts -----------------------------------------------------------------------------

def test_error_texts_carry_no_data():
    exif = make_samples.photo_exif(6).tobytes()
    sources = [(png(make_samples.photo_image(), exif=exif), "image/png"),
               (heic(make_samples.photo_image(), exif=exif), "image/heic"),
               (webp(make_samples.photo_image(), exif=exif), "image/webp")]
    for data, ctype in sources:
        for bad, kwargs in ((data[: len(data) // 2], {}), (data, {"min_side": 10_000}),
                            (data, {"max_pixels": 10}), (data, {"uniform_stddev": 1e9})):
            with pytest.raises(MediaError) as e:
                prepare_photo(bad, ctype, **kwargs)
            for secret in ("FhirbridgeCam", "2024", "Model 7", "WGS", "SampleOS"):
                assert secret not in e.value.text


# -- DICOM -----------------------------------------------------------------------------------

def _patient() -> PatientDemographics:
    return PatientDemographics(patient_id="MRN-000123", issuer_of_patient_id="HOSP-MRN",
                               family="Müller", given=("José",), birth_date="19800214",
                               sex="M")


def _context(key: str) -> StudyContext:
    return StudyContext(
        study_instance_uid=uid_from("study", key), series_instance_uid=uid_from("series", key),
        sop_instance_uid=uid_from("sop", key), content_datetime=datetime(2024, 5, 1, 14, 30, 5),
        study_id="1", accession_number="", study_description="Patient-generated photo",
        series_description="Patient portal photo",
        anatomic_region=CodedConcept("40983000", "SCT", "Upper arm structure"),
        laterality="L", comments=(), source_description="Patient portal upload")


@pytest.mark.parametrize("fmt", ["png", "png-grey", "heic", "webp"])
def test_vl_photographic_from_new_formats_passes_dciodvfy(fmt, dciodvfy_check):
    exif = make_samples.photo_exif(6).tobytes()
    im = make_samples.photo_image()
    if fmt == "png":
        data, ctype = png(im.convert("RGBA"), exif=exif, icc_profile=srgb()), "image/png"
    elif fmt == "png-grey":
        data, ctype = png(im.convert("L")), "image/png"
    elif fmt == "heic":
        data, ctype = heic(stored_for(im, 6), exif=exif, icc_profile=srgb()), "image/heic"
    else:
        data, ctype = webp(im, exif=exif), "image/webp"
    photo = prepare_photo(data, ctype)
    ds = build_vl_photographic(photo, _patient(), _context(fmt))
    raw = write_dataset(ds)
    out = dciodvfy_check(raw)
    assert "VLPhotographicImage" in out
    assert ds.ImageType[0] == "DERIVED" and ds.PhotometricInterpretation == photo.photometric
    for secret in (b"GPS", b"WGS-84", b"Exif", b"SampleOS"):  # make/model may be Manufacturer
        assert secret not in raw


# -- the blank check's early exit for pass-through JPEGs ------------------------------------

def _jpeg_12mp(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _busy_12mp() -> Image.Image:
    w, h = 4032, 3024
    noise = Image.effect_noise((w // 8, h // 8), 60).resize((w, h))
    return Image.merge("RGB", (noise, Image.linear_gradient("L").resize((w, h)), noise))


def test_busy_photo_is_proved_non_uniform_from_its_first_quarter(monkeypatch):
    from fhirbridge.media import photo as ph

    def no_full_decode(*_a, **_k):
        raise AssertionError("the full 1/8-scale decode should not be needed")

    monkeypatch.setattr(ph, "_jpeg_luma_stddev", no_full_decode)
    p = prepare_photo(_jpeg_12mp(_busy_12mp()), "image/jpeg")
    assert not p.derived and p.rows == 3024


def test_busy_photo_is_proved_from_its_first_sixteenth(monkeypatch):
    from fhirbridge.media import photo as ph

    def no_full_decode(*_a, **_k):
        raise AssertionError("the full 1/8-scale decode should not be needed")

    monkeypatch.setattr(ph, "_jpeg_luma_stddev", no_full_decode)
    monkeypatch.setattr(ph, "_EARLY_TIERS", ph._EARLY_TIERS[:1])  # 1/16 of the bytes only
    assert prepare_photo(_jpeg_12mp(_busy_12mp()), "image/jpeg").rows == 3024


def test_flat_top_falls_back_to_the_full_check():
    w, h = 4032, 3024
    im = _busy_12mp()
    im.paste((120, 170, 230), (0, 0, w, h // 3))  # sky
    assert prepare_photo(_jpeg_12mp(im), "image/jpeg").rows == h
    flat = Image.new("RGB", (w, h), (200, 200, 200))
    flat.paste((203, 203, 203), (0, 0, w, h // 40))  # a faint band at the top only
    with pytest.raises(MediaError) as e:
        prepare_photo(_jpeg_12mp(flat), "image/jpeg")
    assert e.value.code == "uniform-image"
