"""SNOMED CT body structures a patient photo shows, code -> display (CodeMeaning).
One table for the service (a bodySite coding without display) and `fhirbridge dicomize`."""

from __future__ import annotations

# SNOMED CT preferred terms of body structures (the concepts of DICOM PS3.16 CID 4031
# "Common Anatomic Regions" a portal offers), used as CodeMeaning (PS3.3 8.8) when the
# submission gives only the code. A code not listed keeps the code itself as its meaning.
SNOMED_ANATOMY: dict[str, str] = {
    "123037004": "Body structure",
    "69536005": "Head structure",
    "89545001": "Face structure",
    "81745001": "Eye structure",
    "117590005": "Ear structure",
    "45206002": "Nasal structure",
    "123851003": "Mouth region structure",
    "45048000": "Neck structure",
    "22943007": "Trunk structure",
    "51185008": "Thoracic structure",
    "76752008": "Breast structure",
    "113345001": "Abdominal structure",
    "46862004": "Buttock structure",
    "16982005": "Shoulder region structure",
    "40983000": "Upper arm structure",
    "14975008": "Forearm structure",
    "8205005": "Wrist region structure",
    "85562004": "Hand structure",
    "7569003": "Finger structure",
    "68367000": "Thigh structure",
    "72696002": "Knee region structure",
    "30021000": "Lower leg structure",
    "56459004": "Foot structure",
    "29707007": "Toe structure",
    "39937001": "Skin structure",
}


def anatomy_display(code: str) -> str:
    """The display of a SNOMED CT body structure code, or the code itself when not listed."""
    return SNOMED_ANATOMY.get(code, code)
