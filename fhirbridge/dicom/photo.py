"""A VL Photographic Image (PS3.3 A.32.4) from a prepared JPEG, the EHR's patient and the
submission's context. No decoding: the JPEG goes into encapsulated Pixel Data as it is.

Modules written: Patient, General Study, General Series, General Equipment (these four and
SOP Common come from modules.py, shared with the PDF and video builders), General Image,
Image Pixel, Acquisition Context (empty), VL Image, ICC Profile (when the photo has one),
VL Photographic Acquisition (exposure time, f-number, focal length from EXIF), SOP Common
(with a Contributing Equipment item naming us and the source). Nothing of EXIF goes in beyond
those three numbers, the camera make/model and the capture time; never GPS.

Dates and times: when the content datetime is timezone-aware, TimezoneOffsetFromUTC is set to
its offset and every date and time in the object (DA/TM and DT, the EXIF capture time
included) is written in that offset, as PS3.3 C.12.1.1.8 requires (modules.py).
"""

from __future__ import annotations

import struct
from datetime import datetime, timezone

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import JPEGBaseline8Bit

from fhirbridge.dicom.context import PatientDemographics, StudyContext
from fhirbridge.dicom.modules import (
    IMPLEMENTATION_VERSION_NAME,
    SOFTWARE_VERSION,
    _ds,
    _dt_in,
    _lt,
    add_anatomy,
    add_camera_image,
    add_content_datetime,
    add_contributing_equipment,
    add_general_equipment,
    add_general_series,
    add_general_study,
    add_patient,
    add_sop_common,
    new_dataset,
    object_zone,
)
from fhirbridge.media.photo import PreparedPhoto

__all__ = ["VL_PHOTOGRAPHIC_IMAGE_STORAGE", "IMPLEMENTATION_VERSION_NAME", "SOFTWARE_VERSION",
           "build_vl_photographic"]

VL_PHOTOGRAPHIC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.4"


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
    zone = object_zone(ctx)
    ds = new_dataset(VL_PHOTOGRAPHIC_IMAGE_STORAGE, ctx, JPEGBaseline8Bit)

    # General Image; SOP Common; General Study; General Series (modules.py)
    ds.ImageType = ["DERIVED" if photo.derived else "ORIGINAL", "PRIMARY"]
    add_sop_common(ds, VL_PHOTOGRAPHIC_IMAGE_STORAGE, ctx, now=now, zone=zone)
    add_general_study(ds, ctx, zone=zone)
    add_general_series(ds, ctx, "XC")

    # General Image / VL Image
    ds.InstanceNumber = ctx.instance_number
    ds.PatientOrientation = ""
    add_content_datetime(ds, ctx, zone=zone)
    acquired = photo.exif.datetime_original or ctx.content_datetime
    if acquired is not None:
        ds.AcquisitionDateTime = _dt_in(acquired, zone)
    if photo.derived and photo.derivation_description:
        ds.DerivationDescription = _lt(photo.derivation_description, 1024)
    add_camera_image(ds, ctx)
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
    add_general_equipment(ds, make, model)

    add_patient(ds, patient)
    add_anatomy(ds, ctx)

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
    add_contributing_equipment(ds, ctx, now=now, zone=zone)

    ds.PixelData = _encapsulate(photo.jpeg)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds
