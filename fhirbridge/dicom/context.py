"""What a DICOM object is built from, apart from the media bytes.

Patient demographics come from the EHR (never from the upload); study context from the
submission. PS3.3 C.7.1.1 Patient Module, C.7.2.1 General Study Module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class PatientDemographics:
    """The patient as the EHR knows them, ready for the DICOM Patient Module."""

    patient_id: str  # (0010,0020), the identifier value in the configured domain
    issuer_of_patient_id: str  # (0010,0021), the domain's DICOM issuer
    family: str = ""
    given: tuple[str, ...] = ()
    prefix: str = ""
    suffix: str = ""
    birth_date: str = ""  # YYYYMMDD or ""
    sex: str = ""  # M, F, O or ""
    other_ids: tuple[tuple[str, str], ...] = ()  # (value, issuer) pairs, (0010,1002)

    @property
    def dicom_name(self) -> str:
        """PS3.5 6.2 PN: family^given^middle^prefix^suffix. Within a component, PN's own
        delimiters (^ components, = groups, \\ values) and control characters become spaces."""
        given = self.given[0] if self.given else ""
        middle = " ".join(self.given[1:])
        parts = [_pn_component(p) for p in
                 (self.family, given, middle, self.prefix, self.suffix)]
        while parts and not parts[-1]:
            parts.pop()
        # PS3.5 Table 6.2-1: at most 64 characters per component group
        return "^".join(parts)[:64].rstrip("^ ")


def _pn_component(value: str) -> str:
    cleaned = "".join(" " if ch in "^=\\" or ord(ch) < 32 or ord(ch) == 127 else ch
                      for ch in value or "")
    return " ".join(cleaned.split())


@dataclass(frozen=True)
class CodedConcept:
    """A code triplet (PS3.3 8.8): SNOMED CT uses scheme designator SCT."""

    code: str
    scheme: str = "SCT"
    meaning: str = ""


@dataclass(frozen=True)
class StudyContext:
    """UIDs and descriptive context of one object; UIDs are deterministic per submission."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    content_datetime: datetime | None = None  # Media.createdDateTime (timezone-aware if given)
    study_datetime: datetime | None = None  # defaults to content_datetime
    study_id: str = "1"
    accession_number: str = ""
    series_number: int = 1
    instance_number: int = 1
    study_description: str = ""
    series_description: str = ""
    anatomic_region: CodedConcept | None = None  # FHIR bodySite -> (0008,2218)
    laterality: str = ""  # L, R, B, U -> ImageLaterality (0020,0062)
    manufacturer: str = ""  # Media.device / EXIF Make
    manufacturer_model_name: str = ""
    comments: tuple[str, ...] = ()  # Media.note -> ImageComments
    document_title: str = ""  # Encapsulated PDF DocumentTitle
    source_description: str = ""  # e.g. "Patient portal upload", for Original Attributes
    extra: dict[str, str] = field(default_factory=dict)
