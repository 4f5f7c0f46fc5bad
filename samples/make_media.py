"""Regenerate samples/media-photo.json from samples/photo.jpg (the README's curl posts it)."""

import base64
import hashlib
import json
from pathlib import Path

here = Path(__file__).parent
photo = (here / "photo.jpg").read_bytes()
media = {
    "resourceType": "Media",
    "status": "completed",
    "identifier": [{"system": "https://portal.example.org/uploads", "value": "b3c1f0de-sample-0001"}],
    "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/media-type",
                         "code": "image", "display": "Image"}]},
    "contained": [{
        "resourceType": "Patient", "id": "self",
        "name": [{"family": "Müller", "given": ["José"]}],
        "birthDate": "1984-03-07", "gender": "male",
    }],
    "subject": {"type": "Patient", "identifier": {
        "system": "urn:oid:2.16.840.1.113883.3.7777", "value": "MRN12345"}},
    "createdDateTime": "2024-05-01T14:30:05+02:00",  # the photo's EXIF capture time
    "bodySite": {
        "coding": [{"system": "http://snomed.info/sct", "code": "40983000",
                    "display": "Upper arm structure"}],
        "extension": [{"url": "http://fhirbridge.dev/StructureDefinition/laterality",
                       "valueCodeableConcept": {"coding": [{
                           "system": "http://snomed.info/sct", "code": "24028007",
                           "display": "Right"}]}}],
        "text": "Right upper arm",
    },
    "deviceName": "Patient portal app",
    "note": [{"text": "Wound on the right upper arm, day 3"}],
    "content": {
        "contentType": "image/jpeg",
        "data": base64.b64encode(photo).decode(),
        "size": len(photo),
        "hash": base64.b64encode(hashlib.sha1(photo).digest()).decode(),
        "title": "wound.jpg",
    },
}
(here / "media-photo.json").write_text(json.dumps(media, indent=2, ensure_ascii=False) + "\n")
