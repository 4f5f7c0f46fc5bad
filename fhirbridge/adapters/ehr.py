"""The EHR adapter: a FHIR R4 REST client for Patient look-ups and ImagingStudy write-back.

FHIR R4 RESTful API (read, search, conditional update); IHE PDQm ITI-78 identifier search;
PIXm/FHIR merge semantics (Patient.link type `replaced-by`).
"""

from __future__ import annotations

from typing import Any

import httpx

FHIR_JSON = "application/fhir+json"


class EhrUnavailable(Exception):
    """The EHR could not be asked (network, 5xx, 429): retry later, never hold."""


class EhrRefused(Exception):
    """The EHR answered with a definite refusal (4xx other than 404/410)."""


class FhirEhr:
    def __init__(self, base_url: str, *, timeout: float = 15.0, auth: httpx.Auth | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        """`auth`: the EHR's credentials (`fhirbridge.adapters.smart_backend`: bearer or SMART
        Backend Services), shared with the attachment fetcher; it adds them only to URLs under
        the EHR base. Redirects are not followed, so every request passes through it."""
        self.base = base_url.rstrip("/")
        self.client = httpx.Client(base_url=self.base, timeout=timeout,
                                   headers={"Accept": FHIR_JSON}, auth=auth,
                                   follow_redirects=False, transport=transport)

    def _request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        try:
            r = self.client.request(method, url, **kw)
        except httpx.HTTPError as exc:
            raise EhrUnavailable(f"EHR request failed: {type(exc).__name__}") from exc
        if r.status_code >= 500 or r.status_code == 429:
            raise EhrUnavailable(f"EHR answered HTTP {r.status_code}")
        return r

    def read_patient(self, ref: str) -> dict[str, Any] | None:
        """Read `Patient/{id}`; None when the EHR says it does not exist (404/410)."""
        r = self._request("GET", ref)
        if r.status_code in (404, 410):
            return None
        if r.status_code != 200:
            raise EhrRefused(f"Patient read answered HTTP {r.status_code}")
        body = r.json()
        return body if body.get("resourceType") == "Patient" else None

    def search_patients(self, system: str, value: str) -> list[dict[str, Any]]:
        """`Patient?identifier=system|value` (PDQm ITI-78); follows paging links."""
        out: list[dict[str, Any]] = []
        r = self._request("GET", "Patient", params={"identifier": f"{system}|{value}",
                                                     "_count": "50"})
        while True:
            if r.status_code != 200:
                raise EhrRefused(f"Patient search answered HTTP {r.status_code}")
            bundle = r.json()
            for entry in bundle.get("entry", []) or []:
                res = entry.get("resource") or {}
                if res.get("resourceType") == "Patient" and (
                    (entry.get("search") or {}).get("mode", "match") == "match"
                ):
                    out.append(res)
            nxt = next((ln["url"] for ln in bundle.get("link", []) if ln.get("relation") == "next"),
                       None)
            if not nxt or len(out) > 500:
                return out
            r = self._request("GET", nxt)

    def upsert_imaging_study(self, resource: dict[str, Any], identifier: str) -> str:
        """Conditional update `PUT ImagingStudy?identifier=…`: a repeat updates, never
        duplicates (FHIR R4 3.1.0.4.3). Returns the EHR's logical id."""
        body = {k: v for k, v in resource.items() if k != "id"}
        r = self._request("PUT", "ImagingStudy", params={"identifier": identifier},
                          json=body, headers={"Content-Type": FHIR_JSON})
        if r.status_code == 412:
            raise EhrRefused("several ImagingStudy resources share the study identifier")
        if r.status_code not in (200, 201):
            raise EhrRefused(f"ImagingStudy update answered HTTP {r.status_code}")
        try:
            rid = r.json().get("id", "")
        except ValueError:
            rid = ""
        if not rid:
            loc = r.headers.get("Location") or r.headers.get("Content-Location") or ""
            parts = loc.split("/")
            if "ImagingStudy" in parts:
                rid = parts[parts.index("ImagingStudy") + 1]
        return str(rid)

    def ping(self) -> bool:
        try:
            return self._request("GET", "metadata").status_code == 200
        except (EhrUnavailable, EhrRefused):  # EhrRefused: the token endpoint said no
            return False

    def close(self) -> None:
        self.client.close()
        close_auth = getattr(self.client.auth, "close", None)  # SMART: its token client
        if callable(close_auth):
            close_auth()
