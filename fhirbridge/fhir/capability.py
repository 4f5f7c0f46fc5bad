"""The CapabilityStatement (FHIR R4) of what fhirbridge accepts and emits.

`profiles/CapabilityStatement.json` is this, written out; tests keep the two and the routes equal.
"""

from __future__ import annotations

from typing import Any

from fhirbridge import __version__


SECURITY_SERVICE = "http://terminology.hl7.org/CodeSystem/restful-security-service"
OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
# R4 search.html 3.1.1.5: unknown parameters are refused unless the client asks for lenient
# handling (medplum's choice; strict is the safer default for a PHI search)
SEARCH_RULES = ("Search: any parameter not listed is refused with 400 (Prefer: handling=strict, "
                "the default); with Prefer: handling=lenient it is ignored and left out of the "
                "self link. Also _count (default 100, at most 1000; 0 or _summary=count gives "
                "the total only), _format; next/previous links page on a stable key (no "
                "repeat, no gap while resources are added). _lastUpdated takes the prefixes "
                "eq, ne, gt, lt, ge, le; a comma is OR, a repeated parameter AND.")

# Media / DocumentReference (R4 http.html): one version each ("1", meta.versionId, ETag), read
# at the create's Location (vread); If-None-Exist with identifier=system|value (a portal's
# safe retry): one match → 200 with it, several → 412
UPLOAD_REST: dict[str, Any] = {
    "interaction": [{"code": "create"}, {"code": "read"}, {"code": "vread"}],
    "versioning": "versioned",
    "readHistory": False,
    "conditionalCreate": True,
}


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


DEFAULT_BASE = "http://127.0.0.1:8080/fhir"  # the published profile's (default settings)


def capability_statement(oauth: dict[str, str] | None = None,
                         base: str = DEFAULT_BASE) -> dict[str, Any]:
    """`oauth`: {"token": url, "authorize": url} of the configured issuer, or None (the
    published profile). `base`: the public FHIR base of this instance (Settings.fhir_base_url)."""
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
        # R4 cpb-14: kind = instance needs `implementation` (this installation, at its base)
        "implementation": {"description": "fhirbridge: patient photos, videos and documents "
                                          "into DICOM", "url": base},
        "fhirVersion": "4.0.1",
        # JSON only: XML is answered 406 (R4 http.html#mime)
        "format": ["json", "application/fhir+json"],
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
                    **UPLOAD_REST,
                },
                {
                    "type": "DocumentReference",
                    "documentation": "content[].attachment as for Media, plus application/pdf "
                                     "(Encapsulated PDF); context.sourcePatientInfo is evidence "
                                     "only; relatesTo replaces supersedes an earlier upload.",
                    **UPLOAD_REST,
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
                    "documentation": SEARCH_RULES + " patient/subject: the patient the upload "
                                     "was made for with a patient-bound token or stored under "
                                     "after identity matching (not the unverified subject the "
                                     "upload named); an unknown patient matches nothing.",
                    "interaction": [{"code": "read"}, {"code": "search-type"}],
                    "searchParam": [
                        {"name": "_id", "type": "token"},
                        {"name": "_lastUpdated", "type": "date"},
                        {"name": "focus", "type": "reference"},
                        {"name": "patient", "type": "reference"},
                        {"name": "subject", "type": "reference"},
                        {"name": "status", "type": "token"},
                    ],
                },
                {
                    "type": "ImagingStudy",
                    "documentation": SEARCH_RULES + " patient:identifier / subject:identifier "
                                     "(system|value) find studies of a patient known from ADT "
                                     "only; identifier is the StudyInstanceUID "
                                     "(urn:dicom:uid|urn:oid:…).",
                    "interaction": [{"code": "read"}, {"code": "search-type"}],
                    "searchParam": [
                        {"name": "_id", "type": "token"},
                        {"name": "_lastUpdated", "type": "date"},
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
