"""FHIR R4 Task reporting an upload's progress (Task.status, statusReason, focus, output)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from fhirbridge.store.models import Task

REASON_SYSTEM = "https://fhirbridge.dev/CodeSystem/task-reason"


def task_resource(task: Task) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "Task",
        "id": task.id,
        "meta": {"lastUpdated": _instant(task.last_modified)},
        "status": task.status,
        "intent": "order",
        "code": {"text": "Import patient-generated media into the PACS"},
        "focus": {"reference": task.focus},
        "authoredOn": _instant(task.authored_on),
        "lastModified": _instant(task.last_modified),
    }
    if task.reason_code:
        concept = {"coding": [{"system": REASON_SYSTEM, "code": task.reason_code}],
                   "text": task.reason_text or task.reason_code}
        res["statusReason"] = concept  # once: a copy in businessStatus read as a repeat
    if task.candidates_json:
        cands = json.loads(task.candidates_json)
        if cands:
            res["note"] = [{"text": f"{len(cands)} candidate patient(s) for review"}]
    if task.output_ref:
        res["output"] = [{
            "type": {"text": "ImagingStudy"},
            "valueReference": {"reference": task.output_ref},
        }]
    return res


def _instant(dt: datetime | None) -> str:
    if dt is None:
        dt = datetime.now(timezone.utc)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def searchset(resources: list[dict[str, Any]], self_url: str,
              total: int | None = None, base: str = "") -> dict[str, Any]:
    """FHIR R4 searchset Bundle; `total` is the number of matches (entries may be fewer);
    `fullUrl` absolute under `base` (R4 bundle.html bdl-7: the server's base URL)."""
    prefix = f"{base.rstrip('/')}/" if base else ""
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources) if total is None else total,
        "link": [{"relation": "self", "url": self_url}],
        "entry": [{"fullUrl": f"{prefix}{r['resourceType']}/{r['id']}", "resource": r,
                   "search": {"mode": "match"}} for r in resources],
    }
