"""What the bytes are, from their magic numbers (never from a declared type or a file name).

ISO base media files (HEIF/HEIC/AVIF, MP4, QuickTime, 3GPP) are told apart by the `ftyp` box:
the major brand first, then the compatible brands. Brand → type follows libheif's
`heif_get_file_mime_type` for the HEIF family (heic/heix/heim/heis → image/heic, hevc/hevx/
hevm/hevs → image/heic-sequence, mif1 → image/heif, msf1 → image/heif-sequence, avif/avis →
image/avif / image/avif-sequence).
"""

from __future__ import annotations

import struct

__all__ = ["sniff_content_type", "content_type_matches", "normalize_content_type"]

_HEIC = frozenset({b"heic", b"heix", b"heim", b"heis"})
_HEIC_SEQ = frozenset({b"hevc", b"hevx", b"hevm", b"hevs"})
_HEIF = frozenset({b"mif1", b"mif2"})
_HEIF_SEQ = frozenset({b"msf1"})
_AVIF = frozenset({b"avif"})
_AVIF_SEQ = frozenset({b"avis"})
_QUICKTIME = frozenset({b"qt  "})
_MP4 = frozenset({b"isom", b"iso2", b"iso3", b"iso4", b"iso5", b"iso6", b"iso7", b"iso8",
                  b"iso9", b"mp41", b"mp42", b"mp71", b"avc1", b"dash", b"M4V ", b"M4VH",
                  b"M4VP", b"f4v ", b"MSNV", b"NDAS", b"mmp4"})
_M4A = frozenset({b"M4A ", b"M4B ", b"M4P "})
_3GPP = frozenset({b"3gp4", b"3gp5", b"3gp6", b"3gp7", b"3gs7", b"3ge6", b"3ge7", b"3gg6"})
_3GPP2 = frozenset({b"3g2a", b"3g2b", b"3g2c"})
# QuickTime files written before the ftyp box existed start with one of these atoms.
_QT_ATOMS = frozenset({b"moov", b"mdat", b"wide", b"pnot", b"skip", b"free"})

_HEIF_FAMILY = frozenset({"image/heic", "image/heif", "image/heic-sequence",
                          "image/heif-sequence"})
_ALIASES = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "image/x-png": "image/png",
    "application/x-pdf": "application/pdf",
    "image/tif": "image/tiff",
    "image/x-tiff": "image/tiff",
    "video/x-m4v": "video/mp4",
    "image/x-ms-bmp": "image/bmp",
}


def _ftyp_type(data: bytes) -> str | None:
    size = struct.unpack(">I", data[0:4])[0]
    if size == 1 and len(data) >= 16:  # 64-bit largesize: absurd for ftyp, but legal
        size = struct.unpack(">Q", data[8:16])[0]
        start = 16
    else:
        start = 8
    if size == 0 or size > len(data):
        size = min(len(data), 4096)
    if size < start + 8:
        return None
    major = data[start:start + 4]
    compatible = [data[i:i + 4] for i in range(start + 8, size - 3, 4)]
    brands = [major, *compatible]

    def heif_family(bs: list[bytes]) -> str | None:
        found = set(bs)
        if found & _HEIC:
            return "image/heic"
        if found & _HEIC_SEQ:
            return "image/heic-sequence"
        if found & _AVIF:
            return "image/avif"
        if found & _AVIF_SEQ:
            return "image/avif-sequence"
        if found & _HEIF:
            return "image/heif"
        if found & _HEIF_SEQ:
            return "image/heif-sequence"
        return None

    def single(brand: bytes) -> str | None:
        if brand in _QUICKTIME:
            return "video/quicktime"
        if brand in _MP4:
            return "video/mp4"
        if brand in _M4A:
            return "audio/mp4"
        if brand in _3GPP:
            return "video/3gpp"
        if brand in _3GPP2:
            return "video/3gpp2"
        return None

    heif_brands = _HEIC | _HEIC_SEQ | _HEIF | _HEIF_SEQ | _AVIF | _AVIF_SEQ
    if major in heif_brands:
        return heif_family(brands)
    kind = single(major)
    if kind is not None:
        return kind
    # Unknown major brand: the compatible brands decide, image families first.
    kind = heif_family(compatible)
    if kind is not None:
        return kind
    for brand in compatible:
        kind = single(brand)
        if kind is not None:
            return kind
    return None


def sniff_content_type(data: bytes) -> str | None:
    """The media type the bytes' signature says, or None when unrecognised."""
    head = bytes(data[:64])
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if len(head) >= 12 and head[0:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "image/tiff"
    if head.startswith(b"%PDF-"):
        return "application/pdf"
    if len(head) >= 12 and head[4:8] == b"ftyp":
        return _ftyp_type(bytes(data[:4096]))
    if len(head) >= 8 and head[4:8] in _QT_ATOMS:
        return "video/quicktime"
    if head.startswith(b"BM") and len(head) >= 14:
        return "image/bmp"
    return None


def normalize_content_type(content_type: str | None) -> str:
    """Lower-case, parameters dropped, common aliases mapped (image/jpg → image/jpeg)."""
    if not content_type:
        return ""
    base = content_type.split(";", 1)[0].strip().lower()
    return _ALIASES.get(base, base)


def content_type_matches(declared: str | None, sniffed: str | None) -> bool:
    """Whether bytes sniffed as `sniffed` may be accepted under the declared type.

    Aliases are equal (image/jpg = image/jpeg); within the HEIF family (image/heic,
    image/heif and their -sequence forms) any declared member accepts any sniffed member.
    Unknown bytes (sniffed None) never match.
    """
    if not sniffed:
        return False
    d = normalize_content_type(declared)
    s = normalize_content_type(sniffed)
    if not d:
        return False
    if d == s:
        return True
    return d in _HEIF_FAMILY and s in _HEIF_FAMILY
