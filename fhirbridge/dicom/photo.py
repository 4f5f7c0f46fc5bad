"""A VL Photographic Image (PS3.3 A.32.4) from a prepared JPEG, the EHR's patient and the
submission's context. No decoding: the JPEG goes into encapsulated Pixel Data as it is.

Modules written: Patient, General Study, General Series, General Equipment, General Image,
Image Pixel, Acquisition Context (empty), VL Image, ICC Profile (when the photo has one),
VL Photographic Acquisition (exposure time, f-number, focal length from EXIF), SOP Common
(with a Contributing Equipment item naming us and the source). Nothing of EXIF goes in beyond
those three numbers, the camera make/model and the capture time; never GPS.

Dates and times: when the content datetime is timezone-aware, TimezoneOffsetFromUTC is set to
its offset and every DA/TM in the object (study, series, content, instance creation) is
written in that offset, as PS3.3 C.12.1.1.8 requires.
"""

from __future__ import annotations

import re
import struct
from datetime import datetime, timedelta, timezone, tzinfo

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import JPEGBaseline8Bit

from fhirbridge.dicom.context import CodedConcept, PatientDemographics, StudyContext
from fhirbridge.dicom.uids import IMPLEMENTATION_CLASS_UID
from fhirbridge.media.photo import PreparedPhoto

__all__ = ["VL_PHOTOGRAPHIC_IMAGE_STORAGE", "IMPLEMENTATION_VERSION_NAME", "SOFTWARE_VERSION",
           "build_vl_photographic"]

VL_PHOTOGRAPHIC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.4"
IMPLEMENTATION_VERSION_NAME = "fhirbridge 0.1"
SOFTWARE_VERSION = "fhirbridge 0.1"
_LATERALITY = frozenset({"L", "R", "B", "U"})
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
    item.CodeMeaning = _lo(code.meaning or value)
    return item


def _encapsulate(frame: bytes) -> bytes:
    """PS3.5 A.4: a Basic Offset Table item (one offset, 0), then the frame as one even-length
    item — what pydicom.encaps.encapsulate([frame]) gives, with one copy instead of three."""
    pad = b"\x00" if len(frame) % 2 else b""
    return b"".join((b"\xfe\xff\x00\xe0\x04\x00\x00\x00\x00\x00\x00\x00",
                     b"\xfe\xff\x00\xe0" + struct.pack("<I", len(frame) + len(pad)), frame, pad))


# -- builder ---------------------------------------------------------------------------------

def build_vl_photographic(photo: PreparedPhoto, patient: PatientDemographics,
                          ctx: StudyContext, *, now: datetime | None = None) -> Dataset:
    """The VL Photographic Image object (with file_meta, JPEG Baseline transfer syntax).

    `now` (default: the current local time) is the instance creation time. Raises ValueError
    when an identifier does not fit its DICOM value representation or ImageLaterality is not
    one of L, R, B, U."""
    now = now or datetime.now(timezone.utc).astimezone()
    content = ctx.content_datetime
    study = ctx.study_datetime or content
    zone: tzinfo | None = None
    for candidate in (content, study):
        if candidate is not None and candidate.utcoffset() is not None:
            zone = timezone(candidate.utcoffset())
            break

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = VL_PHOTOGRAPHIC_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = ctx.sop_instance_uid
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"

    # General Image (ImageType first: it is (0008,0008)); SOP Common
    ds.ImageType = ["DERIVED" if photo.derived else "ORIGINAL", "PRIMARY"]
    created = _in_zone(now, zone)
    ds.InstanceCreationDate = _da(created)
    ds.InstanceCreationTime = _tm(created)
    ds.SOPClassUID = VL_PHOTOGRAPHIC_IMAGE_STORAGE
    ds.SOPInstanceUID = ctx.sop_instance_uid
    ds.InstanceOriginStatus = "IMPORTED"  # made outside the organisation (IHE IRWF.b)
    if zone is not None:
        ds.TimezoneOffsetFromUTC = _offset(zone.utcoffset(None))

    # General Study
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

    # General Series
    ds.Modality = "XC"
    ds.SeriesInstanceUID = ctx.series_instance_uid
    ds.SeriesNumber = ctx.series_number
    if ctx.series_description:
        ds.SeriesDescription = _lo(ctx.series_description)

    # General Image / VL Image
    ds.InstanceNumber = ctx.instance_number
    ds.PatientOrientation = ""
    if content is not None:
        c = _in_zone(content, zone)
        ds.ContentDate, ds.ContentTime = _da(c), _tm(c)
        ds.SeriesDate, ds.SeriesTime = _da(c), _tm(c)
    acquired = photo.exif.datetime_original or content
    if acquired is not None:
        ds.AcquisitionDateTime = _dt(acquired)
    if photo.derived and photo.derivation_description:
        ds.DerivationDescription = _lt(photo.derivation_description, 1024)
    comments = "\n".join(c for c in ctx.comments if c)
    if comments:
        ds.ImageComments = _lt(comments)
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "YES"
    ds.LossyImageCompression = "01"
    if photo.lossy_ratios:
        ds.LossyImageCompressionRatio = list(photo.lossy_ratios)
        ds.LossyImageCompressionMethod = ["ISO_10918_1"] * len(photo.lossy_ratios)
    else:
        ds.LossyImageCompressionMethod = "ISO_10918_1"

    # General Equipment: the submission's device when it names one, else the camera's EXIF
    # make and model (as a pair, never mixed).
    if ctx.manufacturer or ctx.manufacturer_model_name:
        make, model = ctx.manufacturer, ctx.manufacturer_model_name
    else:
        make, model = photo.exif.make, photo.exif.model
    ds.Manufacturer = _lo(make)
    model = _lo(model)
    if model:
        ds.ManufacturerModelName = model

    # Patient
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

    # Anatomy
    if ctx.anatomic_region is not None and ctx.anatomic_region.code:
        ds.AnatomicRegionSequence = Sequence([_code_item(ctx.anatomic_region)])
    laterality = (ctx.laterality or "").strip().upper()
    if laterality:
        if laterality not in _LATERALITY:
            raise ValueError("ImageLaterality must be one of L, R, B, U")
        ds.ImageLaterality = laterality
    else:
        # Unknown. ImageLaterality has no "unknown" value (U means unpaired), and the series
        # Laterality is Type 2C — required, possibly empty, when the part may be paired and no
        # ImageLaterality is sent. Empty says "unknown" (dciodvfy: a warning, not an error).
        ds.Laterality = ""

    # Image Pixel
    ds.SamplesPerPixel = photo.samples_per_pixel
    ds.PhotometricInterpretation = photo.photometric
    if photo.samples_per_pixel > 1:
        ds.PlanarConfiguration = 0
    ds.Rows = photo.rows
    ds.Columns = photo.columns
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if photo.icc_profile:
        ds.ICCProfile = photo.icc_profile

    # Acquisition Context (Type 2 sequence, empty)
    ds.AcquisitionContextSequence = Sequence([])

    # VL Photographic Acquisition (EXIF equivalents)
    if photo.exif.exposure_time is not None:
        ds.ExposureTimeInSeconds = _ds(photo.exif.exposure_time)
    if photo.exif.f_number is not None:
        ds.FNumber = _ds(photo.exif.f_number)
    if photo.exif.focal_length is not None:
        ds.FocalLength = _ds(photo.exif.focal_length)

    # SOP Common: who made this object, from what
    equipment = Dataset()
    equipment.PurposeOfReferenceCodeSequence = Sequence([_code_item(
        CodedConcept("109102", "DCM", "Processing Equipment"))])
    equipment.Manufacturer = "fhirbridge"
    equipment.SoftwareVersions = SOFTWARE_VERSION
    equipment.ContributionDateTime = _dt(now)
    if ctx.source_description:
        equipment.ContributionDescription = _lt(ctx.source_description, 1024)
    ds.ContributingEquipmentSequence = Sequence([equipment])

    ds.PixelData = _encapsulate(photo.jpeg)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds
