"""FHIR R4 OperationOutcome for errors returned to clients.

Texts say what is wrong with the request's structure; they never echo PHI or payload values.
"""

from __future__ import annotations

from typing import Any


class FhirError(Exception):
    """An error to answer with an OperationOutcome (FHIR R4 3.1.0.1.7)."""

    def __init__(self, status: int, code: str, text: str, *, expression: str = "") -> None:
        super().__init__(text)
        self.status = status
        self.code = code  # IssueType value set: invalid, not-found, too-long, not-supported…
        self.text = text
        self.expression = expression


def operation_outcome(code: str, text: str, *, severity: str = "error",
                      expression: str = "") -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": text}
    if expression:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}
