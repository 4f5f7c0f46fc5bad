"""FHIR R4 Task as fhirbridge reports an upload: each reason once (issue: "several distinct
patients…; several distinct patients…; ambiguous; ambiguous" when statusReason and
businessStatus carried the same concept)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from fhirbridge.fhir.task import task_resource
from fhirbridge.store.models import Task


def test_a_held_tasks_reason_appears_once() -> None:
    now = datetime.now(timezone.utc)
    text = "several distinct patients have the subject identifier in the EHR"
    task = Task(id="t1", submission_id="s1", focus="Media/m1", status="on-hold",
                reason_code="ambiguous", reason_text=text, output_ref="",
                candidates_json="", authored_on=now, last_modified=now)
    resource = task_resource(task)
    raw = json.dumps(resource)
    assert raw.count(text) == 1 and raw.count('"ambiguous"') == 1
    assert resource["statusReason"]["coding"][0]["code"] == "ambiguous"
    assert "businessStatus" not in resource
