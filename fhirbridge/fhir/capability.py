"""The CapabilityStatement (FHIR R4) of what fhirbridge accepts and emits.

`profiles/CapabilityStatement.json` is this, written out; tests keep the two and the routes equal.
"""

from __future__ import annotations

from typing import Any

from fhirbridge import __version__


def capability_statement() -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement",
        "id": "fhirbridge",
        "url": "https://fhirbridge.dev/fhir/CapabilityStatement/fhirbridge",
        "version": __version__,
        "name": "FhirbridgeCapabilityStatement",
        "title": "fhirbridge: patient-generated media into DICOM",
        "status": "active",
        "date": "2026-11-29",
        "publisher": "fhirbridge",
        "kind": "instance",
        "software": {"name": "fhirbridge", "version": __version__},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "documentation": "Uploads are accepted durably (201) and processed in the "
                             "background; a Task whose focus is the upload reports progress.",
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
            "resource": [
                {
                    "type": "Media",
                    "documentation": "A photo or a video: content.data base64 (strict) or "
                                     "content.url (Binary/{id}, or the EHR); contentType "
                                     "image/jpeg, image/png, image/heic, image/heif, image/webp, "
                                     "video/mp4, video/quicktime; subject = Patient reference or "
                                     "identifier.",
                    "interaction": [{"code": "create"}, {"code": "read"}],
                },
                {
                    "type": "DocumentReference",
                    "documentation": "content[].attachment as for Media, plus application/pdf "
                                     "(Encapsulated PDF); context.sourcePatientInfo is evidence "
                                     "only; relatesTo replaces supersedes an earlier upload.",
                    "interaction": [{"code": "create"}, {"code": "read"}],
                },
                {
                    "type": "Binary",
                    "documentation": "Raw bytes with their Content-Type (streamed to disk; no "
                                     "base64), or a Binary resource in JSON; then referenced "
                                     "from an attachment url as Binary/{id}. Read returns the "
                                     "raw content.",
                    "interaction": [{"code": "create"}, {"code": "read"}],
                },
                {
                    "type": "Task",
                    "interaction": [{"code": "read"}, {"code": "search-type"}],
                    "searchParam": [
                        {"name": "focus", "type": "reference"},
                        {"name": "status", "type": "token"},
                    ],
                },
                {
                    "type": "ImagingStudy",
                    "interaction": [{"code": "read"}, {"code": "search-type"}],
                    "searchParam": [
                        {"name": "patient", "type": "reference"},
                        {"name": "subject", "type": "reference"},
                        {"name": "identifier", "type": "token"},
                    ],
                },
            ],
        }],
    }
