"""The CapabilityStatement (FHIR R4) of what fhirbridge accepts and emits.

`profiles/CapabilityStatement.json` is this, written out; tests keep the two and the routes equal.
"""

from __future__ import annotations

from typing import Any

from fhirbridge import __version__


SECURITY_SERVICE = "http://terminology.hl7.org/CodeSystem/restful-security-service"
OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"


def security(oauth: dict[str, str] | None = None) -> dict[str, Any]:
    """`rest.security` (SMART App Launch 2.0 "Conformance": the SMART-on-FHIR service and, when
    token auth is configured, the oauth-uris extension with the token/authorize endpoints)."""
    out: dict[str, Any] = {
        "service": [{"coding": [{"system": SECURITY_SERVICE, "code": "SMART-on-FHIR",
                                 "display": "SMART-on-FHIR"}],
                     "text": "OAuth2 bearer JWTs (SMART on FHIR)"}],
        "description": "With [auth] configured, every /fhir interaction but metadata and "
                       ".well-known/smart-configuration needs a bearer JWT from the configured "
                       "issuer with SMART v2 scopes (system/, user/ or patient/ Media.c, "
                       "DocumentReference.c, Binary.c and .r, Task.rs, ImagingStudy.rs, "
                       "AuditEvent.rs; v1 .read/.write/* count as their v2 equivalents). "
                       "patient/ scopes limit the token to its patient claim. Without [auth], "
                       "/fhir answers clients on the same machine only.",
    }
    if oauth:
        out["extension"] = [{"url": OAUTH_URIS, "extension": [
            {"url": key, "valueUri": oauth[key]} for key in ("token", "authorize")
            if oauth.get(key)]}]
    return out


def capability_statement(oauth: dict[str, str] | None = None) -> dict[str, Any]:
    """`oauth`: {"token": url, "authorize": url} of the configured issuer, or None (the
    published profile)."""
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
            "security": security(oauth),
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
                {
                    "type": "AuditEvent",
                    "documentation": "IHE BALP records of every create, read, search, operator "
                                     "action and ADT-driven patient change (SMART scope "
                                     "AuditEvent.rs).",
                    "interaction": [{"code": "read"}, {"code": "search-type"}],
                    "searchParam": [
                        {"name": "patient", "type": "reference"},
                        {"name": "date", "type": "date"},
                        {"name": "agent", "type": "reference"},
                        {"name": "entity", "type": "reference"},
                        {"name": "type", "type": "token"},
                        {"name": "subtype", "type": "token"},
                        {"name": "outcome", "type": "token"},
                        {"name": "action", "type": "token"},
                    ],
                },
            ],
        }],
    }
