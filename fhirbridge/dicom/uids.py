"""Deterministic DICOM UIDs: the same inputs always give the same UID (idempotent retries,
re-sends after a crash), different inputs give different UIDs.

PS3.5 B.2: a UUID may be turned into a UID under the root "2.25" as its unsigned integer
value. We use name-based UUIDs (version 5) in a namespace of our own.
"""

from __future__ import annotations

import uuid

__all__ = ["FHIRBRIDGE_UID_NAMESPACE", "uid_from", "IMPLEMENTATION_CLASS_UID"]

# Fixed forever: uuid5(NAMESPACE_URL, "urn:fhirbridge:dicom-uid"). Changing it changes every
# UID we have ever generated.
FHIRBRIDGE_UID_NAMESPACE = uuid.UUID("73a1865e-1884-5923-ae06-a8aec32a30ca")


def _escape(part: str) -> str:
    # "a|b", "c" and "a", "b|c" must not collide; parts without "\" or "|" are unchanged.
    return part.replace("\\", "\\\\").replace("|", "\\|")


def uid_from(*parts: str) -> str:
    """"2.25." + the integer of uuid5(namespace, "|".join(parts)); at most 44 characters."""
    if not parts:
        raise ValueError("uid_from needs at least one part")
    for part in parts:
        if not isinstance(part, str):
            raise TypeError("uid_from parts must be str")
    name = "|".join(_escape(p) for p in parts)
    return f"2.25.{uuid.uuid5(FHIRBRIDGE_UID_NAMESPACE, name).int}"


# Our implementation class UID (PS3.7 D.3.3.2), written in every file meta header.
IMPLEMENTATION_CLASS_UID = uid_from("fhirbridge", "implementation-class", "0.1")
