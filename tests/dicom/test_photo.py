"""fhirbridge.dicom: deterministic UIDs and the VL Photographic Image object, checked with
dicom3tools' dciodvfy (required: these tests fail, not skip, without it)."""

from __future__ import annotations

import importlib.util
import io
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.uid import UID, JPEGBaseline8Bit

from fhirbridge.dicom.context import CodedConcept, PatientDemographics, StudyContext
from fhirbridge.dicom.io import read_dataset, write_dataset
from fhirbridge.dicom.photo import (
    IMPLEMENTATION_VERSION_NAME, VL_PHOTOGRAPHIC_IMAGE_STORAGE, build_vl_photographic,
)
from fhirbridge.dicom.uids import IMPLEMENTATION_CLASS_UID, uid_from
from fhirbridge.media import jpeg as jp
from fhirbridge.media.photo import prepare_photo

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "samples" / "photo.jpg"
_spec = importlib.util.spec_from_file_location("make_samples", ROOT / "samples" / "make_samples.py")
make_samples = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_samples)

CEST = timezone(timedelta(hours=2))
NOW = datetime(2024, 5, 2, 7, 0, 0, tzinfo=timezone.utc)


@pytest.fixture(autouse=True)
def strict_pydicom():
    settings = pydicom.config.settings
    before = settings.writing_validation_mode
    settings.writing_validation_mode = pydicom.config.RAISE
    yield
    settings.writing_validation_mode = before


def patient(**kw) -> PatientDemographics:
    base = dict(patient_id="MRN-000123", issuer_of_patient_id="HOSP-MRN", family="Müller",
                given=("José",), birth_date="19800214", sex="M",
                other_ids=(("987654", "NATIONAL"),))
    base.update(kw)
    return PatientDemographics(**base)


def context(**kw) -> StudyContext:
    key = kw.pop("key", "submission-1")
    base = dict(
        study_instance_uid=uid_from("study", key), series_instance_uid=uid_from("series", key),
        sop_instance_uid=uid_from("sop", key),
        content_datetime=datetime(2024, 5, 1, 14, 30, 5, tzinfo=CEST),
        study_id="1", accession_number="", study_description="Patient-generated photo",
        series_description="Patient portal photo",
        anatomic_region=CodedConcept("40983000", "SCT", "Upper arm structure"),
        laterality="L", comments=("Wound on the left arm, day 3", "Taken by spouse"),
        source_description="Patient portal upload")
    base.update(kw)
    return StudyContext(**base)


def dciodvfy(tmp_path: Path, data: bytes, name: str = "object.dcm") -> str:
    exe = shutil.which("dciodvfy")
    assert exe, "dciodvfy (dicom3tools) is required for these tests"
    path = tmp_path / name
    path.write_bytes(data)
    run = subprocess.run([exe, str(path)], stdin=subprocess.DEVNULL, capture_output=True,
                         timeout=60)
    out = (run.stdout + run.stderr).decode("utf-8", "replace")
    errors = [line for line in out.splitlines() if line.startswith("Error")]
    assert run.returncode == 0 and not errors, out
    return out


def frames(ds) -> list[bytes]:
    return list(generate_frames(ds.PixelData, number_of_frames=1))


@pytest.fixture(scope="module")
def sample() -> bytes:
    return SAMPLE.read_bytes()


# -- UIDs ------------------------------------------------------------------------------------

def test_uid_from():
    a = uid_from("study", "key-1")
    assert a == uid_from("study", "key-1")
    assert a.startswith("2.25.") and len(a) <= 64 and UID(a).is_valid
    assert a != uid_from("series", "key-1") != uid_from("study", "key-2")
    assert uid_from("a|b", "c") != uid_from("a", "b|c")
    assert uid_from("a", "b") != uid_from("a|b")
    # Parts without "|" or "\" hash "|".join(parts) unchanged (stable, documented scheme).
    import uuid

    from fhirbridge.dicom.uids import FHIRBRIDGE_UID_NAMESPACE
    assert uid_from("x", "y") == f"2.25.{uuid.uuid5(FHIRBRIDGE_UID_NAMESPACE, 'x|y').int}"
    for n in range(200):
        u = uid_from("sop", str(n))
        assert UID(u).is_valid and len(u) <= 64
    with pytest.raises(ValueError):
        uid_from()
    assert UID(IMPLEMENTATION_CLASS_UID).is_valid


# -- the object ------------------------------------------------------------------------------

@pytest.mark.parametrize("name_parts", [
    dict(family="Müller", given=("José",)),
    dict(family="Yamada^Tarou=山田^太郎=やまだ^たろう"),
])
def test_vl_photographic_passes_dciodvfy_and_round_trips(tmp_path, sample, name_parts):
    pat = patient(**name_parts)
    expected_name = pat.dicom_name
    photo = prepare_photo(sample, "image/jpeg")
    ds = build_vl_photographic(photo, pat, context(), now=NOW)
    data = write_dataset(ds)
    out = dciodvfy(tmp_path, data)
    assert "VLPhotographicImage" in out

    back = read_dataset(data)
    assert str(back.PatientName) == expected_name
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert expected_name.encode("utf-8") in data
    fm = back.file_meta
    assert fm.TransferSyntaxUID == JPEGBaseline8Bit
    assert fm.MediaStorageSOPClassUID == VL_PHOTOGRAPHIC_IMAGE_STORAGE
    assert fm.MediaStorageSOPInstanceUID == back.SOPInstanceUID
    assert fm.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert fm.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    assert back.SOPClassUID == VL_PHOTOGRAPHIC_IMAGE_STORAGE
    assert back.Modality == "XC"
    assert list(back.ImageType) == ["ORIGINAL", "PRIMARY"]
    assert (back.PatientID, back.IssuerOfPatientID) == ("MRN-000123", "HOSP-MRN")
    assert back.PatientBirthDate == "19800214" and back.PatientSex == "M"
    other = back.OtherPatientIDsSequence[0]
    assert (other.PatientID, other.IssuerOfPatientID, other.TypeOfPatientID) == \
        ("987654", "NATIONAL", "TEXT")
    assert (back.Rows, back.Columns, back.SamplesPerPixel) == (240, 320, 3)
    assert back.PhotometricInterpretation == "YBR_FULL_422" and back.PlanarConfiguration == 0
    assert (back.BitsAllocated, back.BitsStored, back.HighBit, back.PixelRepresentation) == \
        (8, 8, 7, 0)
    assert back.LossyImageCompression == "01"
    assert back.LossyImageCompressionMethod == "ISO_10918_1"
    assert back.BurnedInAnnotation == "NO" and back.RecognizableVisualFeatures == "YES"
    assert back.ImageLaterality == "L" and "Laterality" not in back
    region = back.AnatomicRegionSequence[0]
    assert (region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning) == \
        ("40983000", "SCT", "Upper arm structure")
    assert back.AcquisitionContextSequence == []
    assert back.ImageComments == "Wound on the left arm, day 3\nTaken by spouse"
    assert back.InstanceOriginStatus == "IMPORTED"
    equipment = back.ContributingEquipmentSequence[0]
    assert equipment.ContributionDescription == "Patient portal upload"
    # The pixels are the prepared JPEG, its scan bytes those of the upload.
    (frame,) = frames(back)
    assert frame.rstrip(b"\x00") == photo.jpeg.rstrip(b"\x00")
    assert jp.scan_data(frame) == jp.scan_data(sample)


def test_no_exif_gps_xmp_in_the_object(sample):
    ds = build_vl_photographic(prepare_photo(sample, "image/jpeg"), patient(), context(),
                               now=NOW)
    data = write_dataset(ds)
    assert b"GPS" in sample and b"Exif" in sample  # the upload has them
    for needle in (b"Exif", b"GPS", b"WGS-84", b"http://ns.adobe.com/xap", b"ICC_PROFILE",
                   b"SampleOS", b"sample comment"):
        assert needle not in data, needle
    assert "GPSLatitude" not in read_dataset(data)


def test_icc_profile_kept(sample):
    icc = jp.icc_profile(sample)
    assert icc
    back = read_dataset(write_dataset(build_vl_photographic(
        prepare_photo(sample, "image/jpeg"), patient(), context(), now=NOW)))
    assert back.ICCProfile == icc


def test_photographic_acquisition_and_equipment_from_exif(sample):
    back = read_dataset(write_dataset(build_vl_photographic(
        prepare_photo(sample, "image/jpeg"), patient(), context(), now=NOW)))
    assert float(back.ExposureTimeInSeconds) == pytest.approx(1 / 120, rel=1e-3)
    assert float(back.FNumber) == pytest.approx(1.8)
    assert float(back.FocalLength) == pytest.approx(4.25)
    assert back.Manufacturer == "FhirbridgeCam" and back.ManufacturerModelName == "Model 7 Pro"
    assert back.AcquisitionDateTime == "20240501143005.250000+0200"
    # The submission's device wins over EXIF.
    back = read_dataset(write_dataset(build_vl_photographic(
        prepare_photo(sample, "image/jpeg"), patient(),
        context(manufacturer="Portal App", manufacturer_model_name="Web"), now=NOW)))
    assert back.Manufacturer == "Portal App" and back.ManufacturerModelName == "Web"
    back = read_dataset(write_dataset(build_vl_photographic(
        prepare_photo(sample, "image/jpeg"), patient(), context(manufacturer="Portal App"),
        now=NOW)))
    assert back.Manufacturer == "Portal App" and "ManufacturerModelName" not in back


def test_dates_in_the_content_offset(sample):
    back = read_dataset(write_dataset(build_vl_photographic(
        prepare_photo(sample, "image/jpeg"), patient(), context(), now=NOW)))
    assert back.TimezoneOffsetFromUTC == "+0200"
    assert (back.StudyDate, back.StudyTime) == ("20240501", "143005")
    assert (back.ContentDate, back.ContentTime) == ("20240501", "143005")
    # 07:00 UTC written in the object's offset
    assert (back.InstanceCreationDate, back.InstanceCreationTime) == ("20240502", "090000")
    ctx = context(study_datetime=datetime(2024, 4, 30, 22, 0, tzinfo=timezone.utc))
    back = read_dataset(write_dataset(build_vl_photographic(
        prepare_photo(sample, "image/jpeg"), patient(), ctx, now=NOW)))
    assert (back.StudyDate, back.StudyTime) == ("20240501", "000000")


def test_minimal_context_still_valid(tmp_path, sample):
    """No dates, no anatomy, no laterality, no EXIF, empty demographics."""
    data = make_samples.photo_jpeg(icc=False, xmp=False, comment=False)
    stripped_exif = jp.strip_app_segments(data)  # a JPEG without any EXIF
    photo = prepare_photo(stripped_exif, "image/jpeg")
    ctx = StudyContext(uid_from("study", "m"), uid_from("series", "m"), uid_from("sop", "m"))
    pat = PatientDemographics(patient_id="X1", issuer_of_patient_id="HOSP")
    ds = build_vl_photographic(photo, pat, ctx, now=NOW)
    data = write_dataset(ds)
    out = dciodvfy(tmp_path, data)
    back = read_dataset(data)
    assert back.StudyDate == "" and back.Manufacturer == "" and back.PatientName == ""
    assert "TimezoneOffsetFromUTC" not in back and "ContentDate" not in back
    assert "ICCProfile" not in back and "ImageLaterality" not in back
    # Unknown laterality: the series Laterality present and empty, dciodvfy only warns.
    assert back.Laterality == ""
    assert "Laterality" in out


def test_naive_content_datetime(sample):
    ctx = context(content_datetime=datetime(2024, 5, 1, 14, 30, 5))
    back = read_dataset(write_dataset(build_vl_photographic(
        prepare_photo(sample, "image/jpeg"), patient(), ctx, now=NOW)))
    assert "TimezoneOffsetFromUTC" not in back
    assert (back.ContentDate, back.ContentTime) == ("20240501", "143005")


def test_long_snomed_code(tmp_path, sample):
    ctx = context(anatomic_region=CodedConcept("1234567891000123108", "SCT", "Extension code"))
    data = write_dataset(build_vl_photographic(prepare_photo(sample, "image/jpeg"), patient(),
                                               ctx, now=NOW))
    dciodvfy(tmp_path, data)
    item = read_dataset(data).AnatomicRegionSequence[0]
    assert item.LongCodeValue == "1234567891000123108" and "CodeValue" not in item


def test_bad_laterality_and_identifiers(sample):
    photo = prepare_photo(sample, "image/jpeg")
    with pytest.raises(ValueError):
        build_vl_photographic(photo, patient(), context(laterality="left"), now=NOW)
    with pytest.raises(ValueError):
        build_vl_photographic(photo, patient(patient_id="x" * 65), context(), now=NOW)
    with pytest.raises(ValueError):
        build_vl_photographic(photo, patient(patient_id="a\\b"), context(), now=NOW)


def test_descriptions_are_sanitised(tmp_path, sample):
    ctx = context(study_description="back\\slash\nand newline " + "x" * 80,
                  comments=("line 1\x00\x07", "line 2"))
    data = write_dataset(build_vl_photographic(prepare_photo(sample, "image/jpeg"), patient(),
                                               ctx, now=NOW))
    dciodvfy(tmp_path, data)
    back = read_dataset(data)
    assert "\\" not in back.StudyDescription and len(back.StudyDescription) <= 64


def test_derived_object(tmp_path):
    data = make_samples.photo_jpeg(orientation=8, progressive=True)
    photo = prepare_photo(data, "image/jpeg")
    out = write_dataset(build_vl_photographic(photo, patient(), context(), now=NOW))
    dciodvfy(tmp_path, out)
    back = read_dataset(out)
    assert list(back.ImageType) == ["DERIVED", "PRIMARY"]
    assert "orientation 8" in back.DerivationDescription
    assert "progressive" in back.DerivationDescription
    assert list(back.LossyImageCompressionMethod) == ["ISO_10918_1", "ISO_10918_1"]
    assert len(back.LossyImageCompressionRatio) == 2
    assert (back.Rows, back.Columns) == (320, 240)  # stored 320x240, turned upright
    (frame,) = frames(back)
    assert jp.read_sof(frame).sof_marker == jp.SOF0


def test_greyscale_object(tmp_path):
    buf = io.BytesIO()
    make_samples.photo_image().convert("L").save(buf, "JPEG", quality=90)
    photo = prepare_photo(buf.getvalue(), "image/jpeg")
    data = write_dataset(build_vl_photographic(photo, patient(), context(), now=NOW))
    dciodvfy(tmp_path, data)
    back = read_dataset(data)
    assert back.SamplesPerPixel == 1 and back.PhotometricInterpretation == "MONOCHROME2"
    assert "PlanarConfiguration" not in back


def test_object_is_deterministic(sample):
    a = write_dataset(build_vl_photographic(prepare_photo(sample, "image/jpeg"), patient(),
                                            context(), now=NOW))
    b = write_dataset(build_vl_photographic(prepare_photo(sample, "image/jpeg"), patient(),
                                            context(), now=NOW))
    assert a == b


# -- orientation -----------------------------------------------------------------------------

RED, BLUE, GREEN, BLACK, WHITE = (255, 0, 0), (0, 0, 255), (0, 160, 0), (0, 0, 0), (255, 255, 255)
W, H, B = 64, 48, 16  # display size and corner block (multiples of the 16x16 MCU)


def _display_pixel(x: int, y: int) -> tuple[int, int, int]:
    """The correctly oriented picture: red top-left, blue top-right, green bottom-left,
    black bottom-right, white elsewhere."""
    left, right, top, bottom = x < B, x >= W - B, y < B, y >= H - B
    if top and left:
        return RED
    if top and right:
        return BLUE
    if bottom and left:
        return GREEN
    if bottom and right:
        return BLACK
    return WHITE


# EXIF 2.3 Orientation: where the stored 0th row and 0th column lie in the visual image.
_ROW0_COL0 = {1: ("top", "left"), 2: ("top", "right"), 3: ("bottom", "right"),
              4: ("bottom", "left"), 5: ("left", "top"), 6: ("right", "top"),
              7: ("right", "bottom"), 8: ("left", "bottom")}


def _stored_image(orientation: int) -> Image.Image:
    """The pixels a camera stores for the display image above, tagged `orientation`; built
    from the EXIF definition, not from Pillow's transposes."""
    row0, col0 = _ROW0_COL0[orientation]
    if row0 in ("top", "bottom"):
        size = (W, H)  # stored columns, rows

        def to_display(c: int, r: int) -> tuple[int, int]:
            return (c if col0 == "left" else W - 1 - c), (r if row0 == "top" else H - 1 - r)
    else:
        size = (H, W)

        def to_display(c: int, r: int) -> tuple[int, int]:
            return (r if row0 == "left" else W - 1 - r), (c if col0 == "top" else H - 1 - c)
    im = Image.new("RGB", size)
    px = im.load()
    for r in range(size[1]):
        for c in range(size[0]):
            px[c, r] = _display_pixel(*to_display(c, r))
    return im


def _close(actual, expected, tolerance: int = 48) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_lands_upright(tmp_path, orientation):
    data = make_samples.photo_jpeg(_stored_image(orientation), orientation=orientation,
                                   quality=95)
    photo = prepare_photo(data, "image/jpeg")
    assert photo.derived is (orientation != 1)
    out = write_dataset(build_vl_photographic(photo, patient(), context(), now=NOW))
    back = read_dataset(out)
    assert (back.Columns, back.Rows) == (W, H)
    (frame,) = frames(back)
    with Image.open(io.BytesIO(frame)) as im:
        im = im.convert("RGB")
        assert im.size == (W, H)
        probes = {(4, 4): RED, (W - 5, 4): BLUE, (4, H - 5): GREEN, (W - 5, H - 5): BLACK,
                  (W // 2, H // 2): WHITE}
        for xy, colour in probes.items():
            assert _close(im.getpixel(xy), colour), (orientation, xy, im.getpixel(xy))
    if orientation in (1, 6):
        dciodvfy(tmp_path, out, f"o{orientation}.dcm")


def test_person_name_delimiters_inside_a_name_do_not_break_the_pn():
    from fhirbridge.dicom.context import PatientDemographics

    p = PatientDemographics("1", "H", family="O^Brien=Smith\\Jr", given=("Mary\x07Jo", "Ann"))
    assert p.dicom_name == "O Brien Smith Jr^Mary Jo^Ann"
    long = PatientDemographics("1", "H", family="X" * 50, given=("Y" * 30,))
    assert len(long.dicom_name) == 64 and long.dicom_name.startswith("X" * 50 + "^")
