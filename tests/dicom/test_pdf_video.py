"""Encapsulated PDF and Video Photographic Image objects, checked with dicom3tools' dciodvfy
(the `dciodvfy_check` fixture fails the test on any Error) and read back with pydicom.

The installed dicom3tools (1.00~20220618) does not know the HEVC transfer syntaxes
(1.2.840.10008.1.2.4.107/.108): it then parses the encapsulated Pixel Data as native and
fails. The HEVC objects are therefore checked as IODs on a copy whose transfer syntax reads
.102 (every attribute unchanged), and their transfer syntax is asserted separately. For a
10-bit HEVC Main 10 stream PS3.5 8.2.11 requires Bits Allocated/Stored/High Bit 16/10/9,
which dicom3tools' VL Image Module tables (8 bits only) report as its only three errors."""

from __future__ import annotations

import io
from datetime import datetime, timedelta, timezone

import av
import pydicom
import pytest
from pydicom.encaps import generate_fragments
from pydicom.uid import ExplicitVRLittleEndian

from fhirbridge.dicom.context import CodedConcept, PatientDemographics, StudyContext
from fhirbridge.dicom.io import read_dataset, write_dataset
from fhirbridge.dicom.pdf import (
    CONVERSION_TYPE, ENCAPSULATED_PDF_STORAGE, build_encapsulated_pdf,
)
from fhirbridge.dicom.uids import uid_from
from fhirbridge.dicom.video import VIDEO_PHOTOGRAPHIC_IMAGE_STORAGE, build_video_photographic
from fhirbridge.media.pdf import prepare_pdf
from fhirbridge.media.video import HEVC_M10P51, HEVC_MP51, MPEG4_HP41, prepare_video
from tests.media.test_pdf_video import make_pdf, videos  # noqa: F401 - session fixture
from tests.support.servers import dciodvfy

CEST = timezone(timedelta(hours=2))
NOW = datetime(2024, 5, 2, 7, 0, 0, tzinfo=timezone.utc)


@pytest.fixture(autouse=True)
def strict_pydicom():
    settings = pydicom.config.settings
    old = settings.writing_validation_mode
    settings.writing_validation_mode = pydicom.config.RAISE
    yield
    settings.writing_validation_mode = old


def patient(**kw) -> PatientDemographics:
    base = dict(patient_id="MRN12345", issuer_of_patient_id="HOSP", family="Müller",
                given=("José", "Maria"), birth_date="19840307", sex="M")
    base.update(kw)
    return PatientDemographics(**base)


def context(key: str = "a", **kw) -> StudyContext:
    base = dict(study_instance_uid=uid_from("study", key),
                series_instance_uid=uid_from("series", key),
                sop_instance_uid=uid_from("sop", key),
                content_datetime=datetime(2024, 5, 1, 9, 30, tzinfo=CEST),
                accession_number="ACC1", series_number=2, instance_number=1,
                study_description="Patient upload", source_description="Patient portal upload")
    base.update(kw)
    return StudyContext(**base)


# -- Encapsulated PDF ------------------------------------------------------------------------

@pytest.mark.parametrize("pages", [1, 2])
def test_encapsulated_pdf_passes_dciodvfy_and_round_trips(dciodvfy_check, pages):
    data = make_pdf(pages, title="Jane Doe lab results")
    ds = build_encapsulated_pdf(prepare_pdf(data), patient(), context(
        document_title="Laborbefund"), now=NOW)
    out = write_dataset(ds)
    report = dciodvfy_check(out)
    assert "EncapsulatedPDF" in report
    back = read_dataset(out)
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.SOPClassUID == ENCAPSULATED_PDF_STORAGE == back.file_meta.MediaStorageSOPClassUID
    assert back.Modality == "DOC"
    assert back.ConversionType == CONVERSION_TYPE == "WSD"
    assert back.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert back.BurnedInAnnotation == "YES"
    assert back.DocumentTitle == "Laborbefund"  # from the submission, not the PDF's /Title
    assert "Jane" not in out.decode("latin-1").split("%PDF-")[0]
    assert back.ConceptNameCodeSequence == []
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert str(back.PatientName) == "Müller^José^Maria"
    assert back.ContentDate == "20240501" and back.ContentTime == "093000"
    assert back.AcquisitionDateTime == "20240501093000+0200"
    assert back.TimezoneOffsetFromUTC == "+0200"
    assert back.InstanceNumber == 1 and back.SeriesNumber == 2
    # the PDF bytes, unchanged
    doc = back.EncapsulatedDocument
    assert len(doc) % 2 == 0
    assert back.EncapsulatedDocumentLength == len(data)
    assert doc[: back.EncapsulatedDocumentLength] == data
    assert doc[len(data):] in (b"", b"\x00")


def test_odd_and_even_length_pdfs():
    base = make_pdf()
    for data in (base, base + b"\n"):  # one of the two is odd
        back = read_dataset(write_dataset(build_encapsulated_pdf(
            prepare_pdf(data), patient(), context(), now=NOW)))
        assert back.EncapsulatedDocumentLength == len(data)
        expected = data + (b"\x00" if len(data) % 2 else b"")
        assert back.EncapsulatedDocument == expected


def test_minimal_pdf_object_still_valid(dciodvfy_check):
    """No dates, no title, empty demographics: the Type 2 attributes present and empty."""
    ctx = StudyContext(uid_from("study", "m"), uid_from("series", "m"), uid_from("sop", "m"))
    out = write_dataset(build_encapsulated_pdf(prepare_pdf(make_pdf()), PatientDemographics(
        patient_id="X1", issuer_of_patient_id="HOSP"), ctx, now=NOW))
    dciodvfy_check(out)
    back = read_dataset(out)
    assert back.DocumentTitle == "" and back.ContentDate == "" and back.ContentTime == ""
    assert back.AcquisitionDateTime == ""
    assert "TimezoneOffsetFromUTC" not in back


def test_pdf_object_is_deterministic():
    pdf = prepare_pdf(make_pdf())
    a = write_dataset(build_encapsulated_pdf(pdf, patient(), context(), now=NOW))
    b = write_dataset(build_encapsulated_pdf(pdf, patient(), context(), now=NOW))
    assert a == b


def test_pdf_bad_values():
    pdf = prepare_pdf(make_pdf())
    with pytest.raises(ValueError):
        build_encapsulated_pdf(pdf, patient(patient_id="a\\b"), context(), now=NOW)
    with pytest.raises(ValueError):
        build_encapsulated_pdf(pdf, patient(), context(series_number=0), now=NOW)


# -- Video Photographic Image ----------------------------------------------------------------

def _fragments(ds) -> list[bytes]:
    """The data fragments after the Basic Offset Table item (which must be empty)."""
    items = list(generate_fragments(ds.PixelData))
    assert items[0] == b"", "the Basic Offset Table must be empty"
    return items[1:]


def _decoded_frames(data: bytes) -> int:
    """Frames decoded from a Pixel Data fragment (an MP4, possibly with one pad byte)."""
    with av.open(io.BytesIO(data), format="mp4") as c:
        assert not c.streams.audio
        return sum(1 for _ in c.decode(video=0))


def test_h264_video_object(dciodvfy_check, videos):  # noqa: F811
    video = prepare_video(videos["h264"])
    ds = build_video_photographic(video, patient(), context(
        "v", anatomic_region=CodedConcept("40983000", "SCT", "Upper arm"), laterality="R",
        comments=("Wound, day 3",)), now=NOW)
    out = write_dataset(ds)
    report = dciodvfy_check(out)
    assert "VideoPhotographicImage" in report
    back = read_dataset(out)
    assert back.file_meta.TransferSyntaxUID == MPEG4_HP41
    assert back.SOPClassUID == VIDEO_PHOTOGRAPHIC_IMAGE_STORAGE
    assert back.Modality == "XC"
    assert back.NumberOfFrames == 50
    assert back.FrameIncrementPointer == pydicom.tag.Tag("FrameTime")
    assert float(back.FrameTime) == pytest.approx(40.0)
    assert back.CineRate == 25
    assert (back.Rows, back.Columns) == (240, 320)
    assert back.PhotometricInterpretation == "YBR_PARTIAL_420"
    assert (back.SamplesPerPixel, back.PlanarConfiguration) == (3, 0)
    assert (back.BitsAllocated, back.BitsStored, back.HighBit) == (8, 8, 7)
    assert back.LossyImageCompression == "01"
    assert back.LossyImageCompressionMethod == "ISO_14496_10"
    assert back.ImageLaterality == "R"
    assert back.AnatomicRegionSequence[0].CodeValue == "40983000"
    assert back.ImageComments == "Wound, day 3"
    # Pixel Data: empty Basic Offset Table, the whole MP4 in one fragment
    assert back.PixelData[:8] == b"\xfe\xff\x00\xe0\x00\x00\x00\x00"  # empty BOT item
    fragments = _fragments(back)
    assert len(fragments) == 1
    fragment = fragments[0]
    assert fragment[: len(video.mp4)] == video.mp4
    assert fragment[len(video.mp4):] in (b"", b"\x00")
    assert fragment[4:8] == b"ftyp"
    assert _decoded_frames(fragment) == 50


@pytest.mark.parametrize("name, ts", [("hevc", HEVC_MP51), ("hevc10", HEVC_M10P51)])
def test_hevc_video_object(dciodvfy_check, videos, name, ts, tmp_path):  # noqa: F811
    video = prepare_video(videos[name])
    out = write_dataset(build_video_photographic(video, patient(), context(name), now=NOW))
    back = read_dataset(out)
    assert back.file_meta.TransferSyntaxUID == ts
    assert back.LossyImageCompressionMethod == "ISO_23008_2"
    assert back.NumberOfFrames == 50
    bits = (16, 10, 9) if name == "hevc10" else (8, 8, 7)  # PS3.5 8.2.11 for Main 10
    assert (back.BitsAllocated, back.BitsStored, back.HighBit) == bits
    fragments = _fragments(back)
    assert len(fragments) == 1 and _decoded_frames(fragments[0]) == 50
    # dicom3tools 2022 lacks the HEVC transfer syntaxes: check the IOD under .102
    back.file_meta.TransferSyntaxUID = MPEG4_HP41
    if name == "hevc":
        assert "VideoPhotographicImage" in dciodvfy_check(back)
    else:
        # ... where its VL Image Module tables allow 8 bits only: the Main 10 values that
        # PS3.5 8.2.11 requires are its only complaints.
        path = tmp_path / "hevc10.dcm"
        pydicom.dcmwrite(path, back, enforce_file_format=True)
        ok, errors, _ = dciodvfy(path)
        assert not ok and len(errors) == 3
        assert all("Unrecognized enumerated value" in e and any(
            f"<{a}>" in e for a in ("Bits Allocated", "Bits Stored", "High Bit"))
            for e in errors), errors


def test_video_without_anatomy_gets_an_unspecific_region(dciodvfy_check, videos):  # noqa: F811
    """The VL Image Module's Anatomic Region Sequence is required for this IOD; with no body
    site we say "Body structure" (SCT 123037004) and leave laterality unknown."""
    ctx = StudyContext(uid_from("study", "n"), uid_from("series", "n"), uid_from("sop", "n"))
    out = write_dataset(build_video_photographic(prepare_video(videos["h264_main_mov"]),
                                                 PatientDemographics("X1", "HOSP"), ctx,
                                                 now=NOW))
    dciodvfy_check(out)
    back = read_dataset(out)
    assert back.AnatomicRegionSequence[0].CodeValue == "123037004"
    assert back.Laterality == ""
    assert "ContentDate" not in back and back.StudyDate == ""


def test_video_with_audio_carries_only_video(dciodvfy_check, videos):  # noqa: F811
    out = write_dataset(build_video_photographic(prepare_video(videos["h264_audio"]),
                                                 patient(), context("au"), now=NOW))
    dciodvfy_check(out)
    assert _decoded_frames(_fragments(read_dataset(out))[0]) == 50


def test_video_object_is_deterministic(videos):  # noqa: F811
    video = prepare_video(videos["h264"])
    a = write_dataset(build_video_photographic(video, patient(), context(), now=NOW))
    b = write_dataset(build_video_photographic(video, patient(), context(), now=NOW))
    assert a == b


# -- round trip through a real PACS (Orthanc, tests/support/servers.py) ----------------------

def test_pdf_and_video_objects_round_trip_through_orthanc(orthanc, videos):  # noqa: F811
    pdf_bytes = make_pdf(2)
    objects = {
        "pdf": build_encapsulated_pdf(prepare_pdf(pdf_bytes), patient(), context("op"),
                                      now=NOW),
        "h264": build_video_photographic(prepare_video(videos["h264"]), patient(),
                                         context("oh"), now=NOW),
        "hevc": build_video_photographic(prepare_video(videos["hevc"]), patient(),
                                         context("oe"), now=NOW),
    }
    for name, ds in objects.items():
        data = write_dataset(ds)
        reply = orthanc.client.post("/instances", content=data)
        assert reply.status_code == 200, (name, reply.text)
        instance = reply.json()["ID"]
        assert orthanc.instance_file(instance) == data, name
        tags = orthanc.client.get(f"/instances/{instance}/simplified-tags").json()
        assert tags["SOPInstanceUID"] == ds.SOPInstanceUID
        if name == "pdf":
            assert tags["Modality"] == "DOC"
            pdf = orthanc.client.get(f"/instances/{instance}/pdf")
            assert pdf.status_code == 200 and pdf.content.rstrip(b"\x00") == pdf_bytes
        else:
            assert tags["NumberOfFrames"] == "50"
            raw = orthanc.client.get(f"/instances/{instance}/frames/0/raw")
            assert raw.status_code == 200, (name, raw.text)
            assert _decoded_frames(raw.content) == 50
