"""The modules every fhirbridge object carries, whatever its IOD, and the value helpers.

Shared by the VL Photographic Image (photo.py), Encapsulated PDF (pdf.py) and Video
Photographic Image (video.py) builders:

- Patient (PS3.3 C.7.1.1): demographics from the EHR, never from the upload.
- General Study (C.7.2.1), General Series (C.7.3.1), General Equipment (C.7.5.1).
- SOP Common (C.12.1) with a Contributing Equipment item naming us (Purpose of Reference
  109102 "Processing Equipment") and the source, Instance Origin Status IMPORTED (IHE IRWF.b).
- Anatomy: Anatomic Region Sequence and Image Laterality / series Laterality.

Dates and times, one rule (docs/decisions.md): when the content (or study) datetime is
timezone-aware, Timezone Offset From UTC is set to its offset and every date and time of the
object is written in that offset, as PS3.3 C.12.1.1.8 requires: DA/TM (study, series, content,
instance creation) and DT too (acquisition from EXIF, contribution), each DT with that same
offset as its suffix, so no two values of one object speak of different zones.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone, tzinfo

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

from fhirbridge import __version__
from fhirbridge.dicom.anatomy import SNOMED_ANATOMY
from fhirbridge.dicom.context import CodedConcept, PatientDemographics, StudyContext
from fhirbridge.dicom.uids import IMPLEMENTATION_CLASS_UID

__all__ = [
    "IMPLEMENTATION_VERSION_NAME", "SOFTWARE_VERSION", "LATERALITY_VALUES",
    "object_zone", "new_dataset", "add_sop_common", "add_general_study", "add_general_series",
    "add_content_datetime", "add_general_equipment", "add_patient", "add_anatomy",
    "add_contributing_equipment",
]

IMPLEMENTATION_VERSION_NAME = "fhirbridge 0.1"
SOFTWARE_VERSION = f"fhirbridge {__version__}"
LATERALITY_VALUES = frozenset({"L", "R", "B", "U"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")
_LT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


# -- value helpers ---------------------------------------------------------------------------

def _lo(value: str, limit: int = 64) -> str:
    """A single-line text value (LO, SH, ...): no control characters or backslashes."""
    return " ".join(_CONTROL.sub(" ", value or "").split())[:limit].rstrip()


def _lt(value: str, limit: int = 10240) -> str:
    return _LT_CONTROL.sub(" ", value or "")[:limit].rstrip()


def _identifier(value: str, limit: int, what: str) -> str:
    value = (value or "").strip()
    if len(value) > limit or _CONTROL.search(value):
        raise ValueError(f"{what} is not a valid DICOM value (at most {limit} characters, "
                         "no backslash or control characters)")
    return value


def _da(dt: datetime) -> str:
    return dt.strftime("%Y%m%d")


def _tm(dt: datetime) -> str:
    return dt.strftime("%H%M%S.%f" if dt.microsecond else "%H%M%S")


def _offset(tz_value: timedelta) -> str:
    minutes = int(tz_value.total_seconds() // 60)
    sign = "-" if minutes < 0 else "+"
    minutes = abs(minutes)
    return f"{sign}{minutes // 60:02d}{minutes % 60:02d}"


def _dt(dt: datetime) -> str:
    """DT value, with its own offset when aware (then independent of the global offset)."""
    text = dt.strftime("%Y%m%d%H%M%S") + (f".{dt.microsecond:06d}" if dt.microsecond else "")
    off = dt.utcoffset()
    return text + (_offset(off) if off is not None else "")


def _dt_in(dt: datetime, zone: tzinfo | None) -> str:
    """A DT value in the object's zone (an aware value converted, with the zone's offset as
    suffix); a naive value is already the object's local time (PS3.3 C.12.1.1.8)."""
    return _dt(_in_zone(dt, zone))


def _in_zone(dt: datetime, zone: tzinfo | None) -> datetime:
    if zone is not None and dt.tzinfo is not None:
        return dt.astimezone(zone)
    return dt


def _ds(value: float) -> str:
    """A DS string of at most 16 characters."""
    for digits in (6, 5, 4, 3, 2, 1, 0):
        text = f"{value:.{digits}f}".rstrip("0").rstrip(".") if digits else f"{value:.0f}"
        if len(text) <= 16:
            return text
    return f"{value:.6g}"[:16]


def _code_item(code: CodedConcept) -> Dataset:
    item = Dataset()
    value = (code.code or "").strip()
    if len(value) > 16:  # PS3.3 8.8: longer codes go in Long Code Value (UC)
        item.LongCodeValue = value
    else:
        item.CodeValue = value
    item.CodingSchemeDesignator = _lo(code.scheme or "SCT", 16)
    meaning = code.meaning if code.meaning and code.meaning != value else ""
    if not meaning and (code.scheme or "SCT") == "SCT":
        meaning = SNOMED_ANATOMY.get(value, "")  # the display, not the code (PS3.3 8.8)
    item.CodeMeaning = _lo(meaning or value)
    return item


# -- modules ---------------------------------------------------------------------------------

def object_zone(ctx: StudyContext) -> tzinfo | None:
    """The offset all DA/TM values are written in: the content datetime's, else the study's,
    else None (naive values written as given, no TimezoneOffsetFromUTC)."""
    study = ctx.study_datetime or ctx.content_datetime
    for candidate in (ctx.content_datetime, study):
        if candidate is not None and candidate.utcoffset() is not None:
            return timezone(candidate.utcoffset())
    return None


def new_dataset(sop_class_uid: str, ctx: StudyContext, transfer_syntax_uid: str) -> Dataset:
    """An empty dataset with its file meta (PS3.10 7.1) and SpecificCharacterSet ISO_IR 192:
    every text value may be UTF-8."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = ctx.sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax_uid
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def add_sop_common(ds: Dataset, sop_class_uid: str, ctx: StudyContext, *, now: datetime,
                   zone: tzinfo | None) -> None:
    """SOP Common (C.12.1): class, instance, creation date/time, origin, timezone offset."""
    created = _in_zone(now, zone)
    ds.InstanceCreationDate = _da(created)
    ds.InstanceCreationTime = _tm(created)
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = ctx.sop_instance_uid
    ds.InstanceOriginStatus = "IMPORTED"  # made outside the organisation (IHE IRWF.b)
    if zone is not None:
        ds.TimezoneOffsetFromUTC = _offset(zone.utcoffset(None))


def add_general_study(ds: Dataset, ctx: StudyContext, *, zone: tzinfo | None) -> None:
    """General Study (C.7.2.1). StudyDate/Time default to the content datetime."""
    study = ctx.study_datetime or ctx.content_datetime
    ds.StudyInstanceUID = ctx.study_instance_uid
    if study is not None:
        s = _in_zone(study, zone)
        ds.StudyDate, ds.StudyTime = _da(s), _tm(s)
    else:
        ds.StudyDate, ds.StudyTime = "", ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = _lo(ctx.study_id, 16)
    ds.AccessionNumber = _identifier(ctx.accession_number, 16, "AccessionNumber")
    if ctx.study_description:
        ds.StudyDescription = _lo(ctx.study_description)


def add_general_series(ds: Dataset, ctx: StudyContext, modality: str) -> None:
    """General Series (C.7.3.1) without dates (see add_content_datetime)."""
    ds.Modality = modality
    ds.SeriesInstanceUID = ctx.series_instance_uid
    ds.SeriesNumber = ctx.series_number
    if ctx.series_description:
        ds.SeriesDescription = _lo(ctx.series_description)


def add_content_datetime(ds: Dataset, ctx: StudyContext, *, zone: tzinfo | None) -> None:
    """ContentDate/Time and SeriesDate/Time from the content datetime, when there is one."""
    if ctx.content_datetime is not None:
        c = _in_zone(ctx.content_datetime, zone)
        ds.ContentDate, ds.ContentTime = _da(c), _tm(c)
        ds.SeriesDate, ds.SeriesTime = _da(c), _tm(c)


def add_camera_image(ds: Dataset, ctx: StudyContext) -> None:
    """General Image attributes of a patient's photo or video (PS3.3 C.7.6.1): the upload's
    notes as ImageComments, nothing burned in, a recognisable person, lossy compressed."""
    comments = "\n".join(c for c in ctx.comments if c)
    if comments:
        ds.ImageComments = _lt(comments)
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "YES"
    ds.LossyImageCompression = "01"


def add_general_equipment(ds: Dataset, make: str, model: str) -> None:
    """General Equipment (C.7.5.1): Manufacturer (Type 2) and ManufacturerModelName."""
    ds.Manufacturer = _lo(make)
    model = _lo(model)
    if model:
        ds.ManufacturerModelName = model


def add_patient(ds: Dataset, patient: PatientDemographics) -> None:
    """Patient (C.7.1.1), IssuerOfPatientID always with PatientID."""
    ds.PatientName = patient.dicom_name
    ds.PatientID = _identifier(patient.patient_id, 64, "PatientID")
    ds.IssuerOfPatientID = _identifier(patient.issuer_of_patient_id, 64, "IssuerOfPatientID")
    ds.PatientBirthDate = patient.birth_date or ""
    ds.PatientSex = patient.sex or ""
    if patient.other_ids:
        items = []
        for value, issuer in patient.other_ids:
            item = Dataset()
            item.PatientID = _identifier(value, 64, "other PatientID")
            if issuer:
                item.IssuerOfPatientID = _identifier(issuer, 64, "other IssuerOfPatientID")
            item.TypeOfPatientID = "TEXT"
            items.append(item)
        ds.OtherPatientIDsSequence = Sequence(items)


def add_anatomy(ds: Dataset, ctx: StudyContext) -> None:
    """AnatomicRegionSequence and ImageLaterality, or an empty series Laterality.

    Raises ValueError when the laterality is not one of L, R, B, U."""
    if ctx.anatomic_region is not None and ctx.anatomic_region.code:
        ds.AnatomicRegionSequence = Sequence([_code_item(ctx.anatomic_region)])
    laterality = (ctx.laterality or "").strip().upper()
    if laterality:
        if laterality not in LATERALITY_VALUES:
            raise ValueError("ImageLaterality must be one of L, R, B, U")
        ds.ImageLaterality = laterality
    else:
        # Unknown. ImageLaterality has no "unknown" value (U means unpaired), and the series
        # Laterality is Type 2C — required, possibly empty, when the part may be paired and no
        # ImageLaterality is sent. Empty says "unknown" (dciodvfy: a warning, not an error).
        ds.Laterality = ""


def add_contributing_equipment(ds: Dataset, ctx: StudyContext, *, now: datetime,
                               zone: tzinfo | None = None) -> None:
    """SOP Common Contributing Equipment Sequence: who made this object, from what."""
    equipment = Dataset()
    equipment.PurposeOfReferenceCodeSequence = Sequence([_code_item(
        CodedConcept("109102", "DCM", "Processing Equipment"))])
    equipment.Manufacturer = "fhirbridge"
    equipment.SoftwareVersions = SOFTWARE_VERSION
    equipment.ContributionDateTime = _dt_in(now, zone)
    if ctx.source_description:
        equipment.ContributionDescription = _lt(ctx.source_description, 1024)
    ds.ContributingEquipmentSequence = Sequence([equipment])
