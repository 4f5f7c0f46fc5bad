"""Issue 11 point 2 below the service: one time zone per object, CodeMeaning from the SNOMED
display (service and `fhirbridge dicomize` alike), unknown anatomy left out of ImagingStudy."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pydicom

from fhirbridge.dicom.context import CodedConcept, PatientDemographics, StudyContext
from fhirbridge.dicom.io import read_dataset, write_dataset
from fhirbridge.dicom.photo import build_vl_photographic
from fhirbridge.dicom.uids import uid_from
from fhirbridge.media.photo import prepare_photo

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "samples" / "photo.jpg"  # EXIF DateTimeOriginal 2024-05-01 14:30:05+02:00
CET = timezone(timedelta(hours=1))
NOW = datetime(2024, 5, 2, 7, 0, 0, tzinfo=timezone.utc)


def ctx(key: str, **kw) -> StudyContext:
    return StudyContext(uid_from("study", key), uid_from("series", key), uid_from("sop", key),
                        **kw)


def test_exif_capture_time_is_written_in_the_objects_zone(dciodvfy_check):
    """createdDateTime +01:00, EXIF +02:00: TimezoneOffsetFromUTC is +0100 and every DT
    (acquisition, contribution) is written in +0100 too: the same instant, one zone."""
    photo = prepare_photo(SAMPLE.read_bytes(), "image/jpeg")
    assert photo.exif.datetime_original.utcoffset() == timedelta(hours=2)
    c = ctx("tz", content_datetime=datetime(2024, 5, 1, 15, 0, 0, tzinfo=CET))
    ds = read_dataset(write_dataset(build_vl_photographic(
        photo, PatientDemographics("X1", "HOSP"), c, now=NOW)))
    assert ds.TimezoneOffsetFromUTC == "+0100"
    assert (ds.ContentDate, ds.ContentTime) == ("20240501", "150000")
    assert str(ds.AcquisitionDateTime) == "20240501133005.250000+0100"
    assert str(ds.ContributingEquipmentSequence[0].ContributionDateTime) == "20240502080000+0100"
    assert (ds.InstanceCreationDate, ds.InstanceCreationTime) == ("20240502", "080000")
    dciodvfy_check(ds)


def test_code_meaning_is_the_snomed_display_not_the_code():
    """A bodySite coding without display: CodeMeaning is the SNOMED CT display."""
    photo = prepare_photo(SAMPLE.read_bytes(), "image/jpeg")
    c = ctx("cm", anatomic_region=CodedConcept("40983000", "SCT", "40983000"))
    ds = build_vl_photographic(photo, PatientDemographics("X1", "HOSP"), c, now=NOW)
    assert ds.AnatomicRegionSequence[0].CodeMeaning == "Upper arm structure"
    c = ctx("cm2", anatomic_region=CodedConcept("40983000", "SCT", "Right upper arm"))
    ds = build_vl_photographic(photo, PatientDemographics("X1", "HOSP"), c, now=NOW)
    assert ds.AnatomicRegionSequence[0].CodeMeaning == "Right upper arm"  # as the EHR said


def test_dicomize_writes_the_display_as_code_meaning(tmp_path, dciodvfy_check):
    out = tmp_path / "photo.dcm"
    r = subprocess.run([sys.executable, "-m", "fhirbridge.cli", "dicomize", str(SAMPLE),
                        "-o", str(out), "--patient-id", "MRN1", "--issuer", "HOSP",
                        "--body-site", "40983000"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    item = pydicom.dcmread(out).AnatomicRegionSequence[0]
    assert (item.CodeValue, item.CodeMeaning) == ("40983000", "Upper arm structure")
    dciodvfy_check(out)


def test_unspecified_anatomy_is_not_a_body_site():
    from fhirbridge.fhir.imagingstudy import InstanceSummary, imaging_study

    def summary(code: str, uid: str) -> InstanceSummary:
        return InstanceSummary("1.2.3", f"1.2.3.{uid}", f"1.2.3.{uid}.1",
                               "1.2.840.10008.5.1.4.1.1.77.1.4.1", "XC", int(uid), 1,
                               body_site=CodedConcept(code, "SCT", "x"))

    study = imaging_study([summary("123037004", "1"), summary("40983000", "2")],
                          subject={"reference": "Patient/p"})
    first, second = study["series"]
    assert "bodySite" not in first
    assert second["bodySite"]["code"] == "40983000"
