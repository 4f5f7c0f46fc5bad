"""Every accepted format through `fhirbridge serve` into Orthanc, by C-STORE and by STOW-RS:
the right SOP class and transfer syntax, the PDF's bytes unchanged, the video's frames and
size right, no GPS anywhere; bad media refused at the door with its reason."""

from __future__ import annotations

import io
import struct
import zlib

import av
import pydicom
import pytest
from PIL import Image

from tests.integration.test_documents_and_bundles import (
    attachment, document, done, media, post, stored, task_count, tiny_pdf,
)
from tests.media.test_pdf_video import make_video
from tests.support.service import FhirbridgeService

VIDEO_PHOTO = "1.2.840.10008.5.1.4.1.1.77.1.4.1"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
VL_PHOTO = "1.2.840.10008.5.1.4.1.1.77.1.4"
MPEG4_HP41 = "1.2.840.10008.1.2.4.102"


@pytest.fixture(scope="module", params=["c-store", "stow-rs"])
def svc(request, tmp_path_factory, orthanc, fhir_server):
    url = orthanc.dicom_url if request.param == "c-store" else orthanc.dicomweb_url
    service = FhirbridgeService(tmp_path_factory.mktemp(f"fb-{request.param}"), pacs_url=url,
                                ehr_url=fhir_server.base_url)
    yield service.start()
    service.stop()


def gps_jpeg() -> bytes:
    """A photo whose EXIF carries GPS, a camera serial number and an owner name."""
    im = Image.new("RGB", (640, 480), (120, 60, 30))
    for x in range(0, 640, 16):
        im.paste((x % 255, 200, 90), (x, 0, x + 8, 480))
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"
    exif[0x0110] = "Model X"
    sub = exif.get_ifd(0x8769)
    sub[0xA431] = "SERIAL-123456"  # BodySerialNumber
    sub[0xA430] = "Owner Person"  # CameraOwnerName
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = "N", (52.0, 22.0, 1.0)
    gps[3], gps[4] = "E", (4.0, 53.0, 2.0)
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif, quality=90)
    return buf.getvalue()


def test_video_becomes_video_photographic(svc, orthanc, patient):
    mp4 = make_video("libx264", options={"profile": "high", "level": "4.1"}, frames=30,
                     audio=True)
    r = post(svc, "/fhir/Media", media(patient, b"") | {"content": attachment(mp4, "video/mp4")})
    assert r.status_code == 201, r.text
    _, study = done(svc, f"Media/{r.json()['id']}")
    ds = stored(orthanc, study["series"][0]["instance"][0]["uid"])
    assert ds.SOPClassUID == VIDEO_PHOTO and ds.file_meta.TransferSyntaxUID == MPEG4_HP41
    assert (ds.Rows, ds.Columns, int(ds.NumberOfFrames)) == (240, 320, 30)
    frames = pydicom.encaps.generate_fragmented_frames(ds.PixelData)
    stream = b"".join(b"".join(f) for f in frames)
    with av.open(io.BytesIO(stream)) as container:
        assert [s.type for s in container.streams] == ["video"]  # the audio is gone
        assert sum(1 for _ in container.decode(video=0)) == 30


def test_pdf_round_trips_unchanged(svc, orthanc, patient):
    pdf = tiny_pdf()
    r = post(svc, "/fhir/DocumentReference", document(patient, attachment(pdf,
                                                                          "application/pdf")))
    assert r.status_code == 201, r.text
    _, study = done(svc, f"DocumentReference/{r.json()['id']}")
    ds = stored(orthanc, study["series"][0]["instance"][0]["uid"])
    assert ds.SOPClassUID == ENCAPSULATED_PDF
    assert int(ds.EncapsulatedDocumentLength) == len(pdf)
    assert bytes(ds.EncapsulatedDocument)[:len(pdf)] == pdf


def test_no_gps_serial_or_owner_reaches_the_pacs(svc, orthanc, patient):
    r = post(svc, "/fhir/Media", media(patient, gps_jpeg()))
    assert r.status_code == 201, r.text
    _, study = done(svc, f"Media/{r.json()['id']}")
    uid = study["series"][0]["instance"][0]["uid"]
    raw = orthanc.instance_file(orthanc.find_instances(uid)[0])
    for secret in (b"SERIAL-123456", b"Owner Person", b"GPS", b"Exif\x00\x00"):
        assert secret not in raw
    ds = pydicom.dcmread(io.BytesIO(raw))
    assert ds.SOPClassUID == VL_PHOTO and ds.Manufacturer == "PhoneMaker"
    assert "VLPhotographicGeolocation" not in str(ds) and "Latitude" not in str(ds)


def png_bomb_header() -> bytes:
    """A PNG whose IHDR claims 50,000 × 50,000 pixels (and nothing else)."""
    ihdr = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    chunk += struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    idat = zlib.compress(b"\0" * 64)
    chunk += struct.pack(">I", len(idat)) + b"IDAT" + idat
    chunk += struct.pack(">I", zlib.crc32(b"IDAT" + idat) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk + b"\0\0\0\0IEND\xaeB`\x82"


@pytest.mark.parametrize("case", ["pdf-as-jpeg", "png-bomb", "mp4-unsupported-codec",
                                  "truncated-mp4", "gif"])
def test_bad_media_is_refused_at_the_door(svc, patient, case):
    if case == "pdf-as-jpeg":
        att, status, words = attachment(tiny_pdf(), "image/jpeg"), 415, "application/pdf"
    elif case == "png-bomb":
        att, status, words = attachment(png_bomb_header(), "image/png"), 422, "pixels"
    elif case == "mp4-unsupported-codec":
        att, status, words = attachment(make_video("mpeg4", frames=10), "video/mp4"), 415, \
            "codec"
    elif case == "truncated-mp4":
        mp4 = make_video("libx264", options={"profile": "high", "level": "4.1"}, frames=10)
        att, status, words = attachment(mp4[: len(mp4) // 3], "video/mp4"), 422, ""
    else:
        att, status, words = attachment(b"GIF89a" + b"\0" * 64, "image/gif"), 415, "image/png"
    before = task_count(svc)
    r = post(svc, "/fhir/Media", media(patient, b"") | {"content": att})
    assert r.status_code == status, r.text
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert words in outcome["issue"][0]["diagnostics"]
    assert task_count(svc) == before


def test_video_posted_as_binary_then_referenced(svc, orthanc, patient):
    mp4 = make_video("libx264", options={"profile": "high", "level": "4.1"}, frames=20)
    r = svc.client.post("/fhir/Binary", content=mp4, headers={"Content-Type": "video/mp4"})
    assert r.status_code == 201, r.text
    m = media(patient, b"") | {"content": {"contentType": "video/mp4",
                                           "url": f"Binary/{r.json()['id']}"}}
    created = post(svc, "/fhir/Media", m)
    assert created.status_code == 201, created.text
    _, study = done(svc, f"Media/{created.json()['id']}")
    ds = stored(orthanc, study["series"][0]["instance"][0]["uid"])
    assert ds.SOPClassUID == VIDEO_PHOTO and int(ds.NumberOfFrames) == 20


def test_unsupported_codec_posted_as_binary_is_refused_when_referenced(svc, patient):
    r = svc.client.post("/fhir/Binary", content=make_video("mpeg4", frames=5),
                        headers={"Content-Type": "video/mp4"})
    assert r.status_code == 201, r.text
    m = media(patient, b"") | {"content": {"contentType": "video/mp4",
                                           "url": f"Binary/{r.json()['id']}"}}
    refused = post(svc, "/fhir/Media", m)
    assert refused.status_code == 415 and "codec" in refused.text


def asymmetric(w: int = 320, h: int = 240) -> Image.Image:
    """Grey noise-free gradient with a red block in the top-left corner (upright)."""
    im = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    im.paste((220, 20, 20), (0, 0, w // 4, h // 4))
    return im


def landed_upright(ds: pydicom.Dataset, w: int, h: int) -> bool:
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    out = Image.open(io.BytesIO(frame)).convert("RGB")
    r, g, b = out.getpixel((w // 8, h // 8))
    return out.size == (w, h) and r > 150 and g < 90


@pytest.mark.parametrize("kind", ["png", "heic"])
def test_png_and_rotated_heic_land_upright(svc, orthanc, patient, kind):
    upright = asymmetric()
    if kind == "png":
        rgba = upright.convert("RGBA")
        buf = io.BytesIO()
        rgba.save(buf, "PNG")
        data, ctype = buf.getvalue(), "image/png"
    else:
        import pillow_heif

        stored_pixels = upright.transpose(Image.Transpose.ROTATE_90)  # as a phone stores it
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90° clockwise to display
        heif = pillow_heif.from_pillow(stored_pixels)
        buf = io.BytesIO()
        heif.save(buf, quality=90, exif=exif.tobytes())
        data, ctype = buf.getvalue(), "image/heic"
    r = post(svc, "/fhir/Media", media(patient, b"") | {"content": attachment(data, ctype)})
    assert r.status_code == 201, r.text
    _, study = done(svc, f"Media/{r.json()['id']}")
    ds = stored(orthanc, study["series"][0]["instance"][0]["uid"])
    assert ds.SOPClassUID == VL_PHOTO and ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert ds.PhotometricInterpretation == "YBR_FULL_422" and ds.ImageType[0] == "DERIVED"
    assert landed_upright(ds, 320, 240)
