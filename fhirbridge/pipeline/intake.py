"""Accept an upload: bytes staged durably, then submission + Task + job in one transaction.

Only after that commit does the client get 201 (durable before acknowledged).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass

from fhirbridge.adapters.blobs import BlobStore
from fhirbridge.fhir.media import InboundMedia
from fhirbridge.pipeline.queue import enqueue
from fhirbridge.store.db import Database
from fhirbridge.store.models import Submission, Task

UPLOAD_JOB = "upload"


@dataclass(frozen=True)
class Accepted:
    resource_type: str
    resource_id: str
    task_id: str


def idempotency_key(inbound: InboundMedia, content_sha256: str) -> str:
    """Same patient claim + same business identifiers + same bytes = the same DICOM object."""
    claim = inbound.claim
    parts = {
        "ref": claim.reference or "",
        "ident": [claim.identifier.system, claim.identifier.value] if claim.identifier else [],
        "ids": sorted(list(i) for i in inbound.identifiers),
        "sha256": content_sha256,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def accept_media(db: Database, blobs: BlobStore, inbound: InboundMedia,
                 resource_type: str = "Media") -> Accepted:
    rel, digest = blobs.put(inbound.data)
    resource_id = str(uuid.uuid4())
    task_id = str(uuid.uuid4())
    resource = dict(inbound.resource)
    resource["id"] = resource_id
    with db.transaction() as s:
        s.add(Submission(
            id=resource_id,
            resource_type=resource_type,
            resource_json=json.dumps(resource),
            content_type=inbound.content_type,
            blob_path=rel,
            blob_sha256=digest,
            blob_size=len(inbound.data),
            idempotency_key=idempotency_key(inbound, digest),
        ))
        s.flush()
        s.add(Task(id=task_id, submission_id=resource_id, focus=f"{resource_type}/{resource_id}",
                   status="requested"))
        enqueue(s, UPLOAD_JOB, resource_id)
    return Accepted(resource_type, resource_id, task_id)
