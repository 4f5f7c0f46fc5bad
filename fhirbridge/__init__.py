"""fhirbridge: patient-generated images from FHIR into DICOM PACS, with ImagingStudy write-back."""

__version__ = "0.3.0"
