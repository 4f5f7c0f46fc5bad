"""Regenerate samples/photo.jpg: a small photo-like baseline JPEG (320x240, 4:2:0) carrying
the metadata a phone photo carries — EXIF (Make, Model, Orientation 1, DateTimeOriginal with
OffsetTimeOriginal, exposure, f-number, focal length), a GPS IFD, an XMP packet, an sRGB ICC
profile and a comment — so tests can check what is kept and what is stripped.

Deterministic: a seeded PRNG, fixed metadata, an ICC profile with a fixed date; the bytes
depend only on the Pillow/libjpeg/LittleCMS versions. Run: .venv/bin/python samples/make_samples.py
"""

from __future__ import annotations

import io
import random
import struct
import sys
from pathlib import Path

from PIL import Image, ImageCms, ImageDraw, ImageFilter, TiffImagePlugin

HERE = Path(__file__).resolve().parent
WIDTH, HEIGHT = 320, 240
XMP = (b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?>'
       b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
       b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       b'<rdf:Description xmlns:xmp="http://ns.adobe.com/xap/1.0/" '
       b'xmp:CreatorTool="fhirbridge sample"/></rdf:RDF></x:xmpmeta>'
       b'<?xpacket end="w"?>')


def _rational(value: float) -> TiffImagePlugin.IFDRational:
    return TiffImagePlugin.IFDRational(value)


def srgb_profile() -> bytes:
    """LittleCMS's sRGB profile with a fixed creation date (header bytes 24-35) and no profile
    ID (bytes 84-99 zero: "not computed"), so the bytes do not depend on the clock."""
    icc = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    icc[24:36] = struct.pack(">6H", 2024, 1, 1, 0, 0, 0)
    icc[84:100] = bytes(16)
    return bytes(icc)


def photo_image(seed: int = 20240501) -> Image.Image:
    """A soft, photo-like scene: a sky gradient, a skin-toned area, a few blurred shapes."""
    rnd = random.Random(seed)
    im = Image.new("RGB", (WIDTH, HEIGHT))
    px = im.load()
    for y in range(HEIGHT):
        for x in range(WIDTH):
            t = y / HEIGHT
            px[x, y] = (int(90 + 80 * t + 20 * x / WIDTH), int(130 + 60 * t), int(200 - 70 * t))
    draw = ImageDraw.Draw(im)
    draw.ellipse((70, 60, 260, 220), fill=(214, 160, 130))  # "skin"
    draw.ellipse((140, 110, 190, 150), fill=(170, 70, 70))  # "wound"
    for _ in range(25):
        x, y, r = rnd.randrange(WIDTH), rnd.randrange(HEIGHT), rnd.randrange(3, 14)
        shade = tuple(rnd.randrange(60, 230) for _ in range(3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=shade)
    im = im.filter(ImageFilter.GaussianBlur(1.2))
    # Fine grain, as a camera sensor gives.
    px = im.load()
    for y in range(HEIGHT):
        for x in range(WIDTH):
            n = rnd.randrange(-6, 7)
            r, g, b = px[x, y]
            px[x, y] = (max(0, min(255, r + n)), max(0, min(255, g + n)), max(0, min(255, b + n)))
    return im


def photo_exif(orientation: int = 1) -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "FhirbridgeCam"  # Make
    exif[0x0110] = "Model 7 Pro"  # Model
    exif[0x0112] = orientation
    exif[0x0131] = "SampleOS 1.0"  # Software
    exif[0x0132] = "2024:05:01 14:30:05"  # DateTime
    exif[0x8769] = {  # Exif IFD
        0x9003: "2024:05:01 14:30:05",  # DateTimeOriginal
        0x9011: "+02:00",  # OffsetTimeOriginal
        0x9291: "25",  # SubSecTimeOriginal
        0x829A: _rational(1 / 120),  # ExposureTime
        0x829D: _rational(1.8),  # FNumber
        0x920A: _rational(4.25),  # FocalLength
        0x8827: 100,  # ISOSpeedRatings
    }
    exif[0x8825] = {  # GPS IFD
        0x0000: b"\x02\x02\x00\x00",  # GPSVersionID
        0x0001: "N",
        0x0002: (_rational(52), _rational(22), _rational(30.5)),
        0x0003: "E",
        0x0004: (_rational(4), _rational(53), _rational(12.25)),
        0x0012: "WGS-84",  # GPSMapDatum
        0x001B: b"ASCII\x00\x00\x00GPS",  # GPSProcessingMethod
    }
    return exif


def photo_jpeg(image: Image.Image | None = None, *, orientation: int = 1, quality: int = 85,
               icc: bool = True, xmp: bool = True, comment: bool = True, **save) -> bytes:
    """The sample's JPEG encoding, reusable by tests for other pixel content/orientations."""
    im = image if image is not None else photo_image()
    params = dict(quality=quality, subsampling=2, exif=photo_exif(orientation).tobytes())
    if icc:
        params["icc_profile"] = srgb_profile()
    if xmp:
        params["xmp"] = XMP
    if comment:
        params["comment"] = b"sample comment: not for DICOM"
    params.update(save)
    buf = io.BytesIO()
    im.save(buf, "JPEG", **params)
    return buf.getvalue()


def main() -> int:
    data = photo_jpeg()
    out = HERE / "photo.jpg"
    out.write_bytes(data)
    print(f"{out}: {len(data)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
