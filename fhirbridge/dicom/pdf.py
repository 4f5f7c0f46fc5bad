"""An Encapsulated PDF object (PS3.3 A.45.1) from a prepared PDF, the EHR's patient and the
submission's context. The PDF bytes go in unchanged.

Modules (A.45.1-1): Patient, General Study, General Equipment and SOP Common (modules.py, the
same as every fhirbridge object); Encapsulated Document Series (C.24.1): Modality DOC,
SeriesNumber (Type 1 here); SC Equipment (C.8.6.1); Encapsulated Document (C.24.2).

Choices:
- ConversionType (0008,0064), SC Equipment Module C.8.6.1, Type 1. Defined terms include
  DV (digitized video), DI (digital interface), DF (digitized film), WSD (workstation),
  SD (scanned document), SI (scanned image), DRW (drawing), SYN (synthetic image). We choose
  **WSD**: the PDF reaches us as a finished digital document from the patient's device or
  portal; we do not know that it is a scan (SD would claim so) and nothing is digitized
  here. It is also what DCMTK's pdf2dcm/dcmencap and Orthanc's /tools/create-dicom write,
  so archives that index ConversionType see the usual value.
- Modality DOC (C.7.3.1.1.1 "Document"), as the Encapsulated Document Series asks.
- DocumentTitle (0042,0010), Type 2: ctx.document_title (the submission's title), empty when
  none. The PDF's own /Title is NOT used: it is free text written by whatever produced the
  file and may hold PHI that the EHR never vetted.
- ConceptNameCodeSequence (0040,A043), Type 2: empty (we have no coded document type).
- BurnedInAnnotation YES: a patient document names the patient on the page.
- EncapsulatedDocument (0042,0011) OB: the PDF padded to even length with one 0x00;
  EncapsulatedDocumentLength (0042,0015) is the unpadded length, so readers can strip it.
- Transfer syntax Explicit VR Little Endian (no pixel data to compress).
"""

from __future__ import annotations

from datetime import datetime, timezone

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from fhirbridge.dicom.context import PatientDemographics, StudyContext
from fhirbridge.dicom.modules import (
    SOFTWARE_VERSION,
    _da,
    _dt_in,
    _in_zone,
    _lo,
    _tm,
    add_contributing_equipment,
    add_general_equipment,
    add_general_series,
    add_general_study,
    add_patient,
    add_sop_common,
    new_dataset,
    object_zone,
)
from fhirbridge.media.pdf import PreparedPdf

__all__ = ["ENCAPSULATED_PDF_STORAGE", "CONVERSION_TYPE", "build_encapsulated_pdf"]

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
CONVERSION_TYPE = "WSD"  # see the module docstring


def build_encapsulated_pdf(pdf: PreparedPdf, patient: PatientDemographics, ctx: StudyContext,
                           *, now: datetime | None = None) -> Dataset:
    """The Encapsulated PDF object (with file_meta, Explicit VR Little Endian).

    `now` (default: the current local time) is the instance creation time. Raises ValueError
    when an identifier does not fit its DICOM value representation or the series number is
    not positive (Type 1 in the Encapsulated Document Series)."""
    now = now or datetime.now(timezone.utc).astimezone()
    if ctx.series_number is None or int(ctx.series_number) < 1:
        raise ValueError("SeriesNumber must be a positive integer for an Encapsulated PDF")
    zone = object_zone(ctx)
    ds = new_dataset(ENCAPSULATED_PDF_STORAGE, ctx, ExplicitVRLittleEndian)

    add_sop_common(ds, ENCAPSULATED_PDF_STORAGE, ctx, now=now, zone=zone)
    add_general_study(ds, ctx, zone=zone)
    add_patient(ds, patient)

    # Encapsulated Document Series (C.24.1): Modality, SeriesInstanceUID, SeriesNumber (1),
    # SeriesDescription; the same values the General Series would get.
    add_general_series(ds, ctx, "DOC")

    # General Equipment (Type 2 Manufacturer: the submitting device if named, else empty)
    add_general_equipment(ds, ctx.manufacturer, ctx.manufacturer_model_name)

    # SC Equipment (C.8.6.1)
    ds.ConversionType = CONVERSION_TYPE
    ds.SecondaryCaptureDeviceManufacturer = "fhirbridge"
    ds.SecondaryCaptureDeviceSoftwareVersions = SOFTWARE_VERSION

    # Encapsulated Document (C.24.2)
    ds.InstanceNumber = ctx.instance_number
    if ctx.content_datetime is not None:
        c = _in_zone(ctx.content_datetime, zone)
        ds.ContentDate, ds.ContentTime = _da(c), _tm(c)
        ds.AcquisitionDateTime = _dt_in(ctx.content_datetime, zone)
    else:
        ds.ContentDate, ds.ContentTime = "", ""
        ds.AcquisitionDateTime = ""
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = _lo(ctx.document_title)  # ST, but one line is what viewers show
    ds.ConceptNameCodeSequence = Sequence([])
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    data = pdf.data
    ds.EncapsulatedDocument = data + b"\x00" if len(data) % 2 else data
    ds.EncapsulatedDocumentLength = len(data)

    add_contributing_equipment(ds, ctx, now=now, zone=zone)
    return ds
