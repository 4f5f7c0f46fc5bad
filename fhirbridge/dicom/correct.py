"""Patient corrections to objects already stored: new Patient Module values, the old ones
kept in Original Attributes Sequence (PS3.3 C.12.1.1.9; IHE Import Reconciliation / PIR).

The SOP Instance UID is kept (the object is the same image, re-identified).
"""

from __future__ import annotations

import copy
from datetime import datetime, timezone

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from fhirbridge.dicom.context import PatientDemographics

PATIENT_KEYWORDS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
                    "PatientSex", "OtherPatientIDsSequence")
MODIFYING_SYSTEM = "fhirbridge"


def patient_values(demographics: PatientDemographics) -> dict[str, object]:
    """Patient Module values as built for new objects (see fhirbridge.dicom.photo)."""
    others = Sequence()
    for value, issuer in demographics.other_ids:
        item = Dataset()
        item.PatientID = value
        item.IssuerOfPatientID = issuer
        item.TypeOfPatientID = "TEXT"
        others.append(item)
    return {
        "PatientName": demographics.dicom_name,
        "PatientID": demographics.patient_id,
        "IssuerOfPatientID": demographics.issuer_of_patient_id,
        "PatientBirthDate": demographics.birth_date,
        "PatientSex": demographics.sex,
        "OtherPatientIDsSequence": others,
    }


def differs(ds: Dataset, demographics: PatientDemographics) -> bool:
    new = patient_values(demographics)
    for kw in PATIENT_KEYWORDS:
        old = ds.get(kw)
        if kw == "OtherPatientIDsSequence":
            old_pairs = [(str(i.get("PatientID", "")), str(i.get("IssuerOfPatientID", "")))
                         for i in (old or [])]
            if old_pairs != list(demographics.other_ids):
                return True
        elif str(old if old is not None else "") != str(new[kw]):
            return True
    return False


def correct_patient(ds: Dataset, demographics: PatientDemographics, *, reason: str,
                    source: str, when: datetime | None = None) -> Dataset:
    """A copy of `ds` with the Patient Module replaced; the replaced values are appended to
    Original Attributes Sequence with reason `CORRECT` (PS3.3 Table C.12-1 defined terms)."""
    out = copy.deepcopy(ds)
    when = when or datetime.now(timezone.utc)
    modified = Dataset()
    for kw in PATIENT_KEYWORDS:
        if kw in ds:
            setattr(modified, kw, copy.deepcopy(ds[kw].value))
    item = Dataset()
    item.ModifiedAttributesSequence = Sequence([modified])
    item.AttributeModificationDateTime = when.strftime("%Y%m%d%H%M%S%z")
    item.ModifyingSystem = f"{MODIFYING_SYSTEM} ({reason})"[:64]  # e.g. "fhirbridge (ADT A40)"
    item.SourceOfPreviousValues = source[:64]
    item.ReasonForTheAttributeModification = "CORRECT"
    # Nonconforming Modified Attributes Sequence is required when any removed value was
    # nonconforming; ours were written by us, so they conform and it is absent.
    history = list(out.get("OriginalAttributesSequence", []) or [])
    history.append(item)
    out.OriginalAttributesSequence = Sequence(history)
    for kw, value in patient_values(demographics).items():
        if kw == "OtherPatientIDsSequence" and not value:
            if kw in out:
                del out[kw]
            continue
        setattr(out, kw, value)
    if "SpecificCharacterSet" not in out:
        out.SpecificCharacterSet = "ISO_IR 192"
    return out
