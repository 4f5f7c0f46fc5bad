"""FHIR R4 search through the running service (R4 search.html): no parameter is silently
ignored (400, or dropped from the self link with `Prefer: handling=lenient`), a query for one
patient answers with that patient's uploads only, `_count` pages with `next` links that neither
repeat nor skip while uploads keep arriving, `_summary=count`, absolute `fullUrl`."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.test_photo_end_to_end import completed, media_for, unique_photo
from tests.support.service import FhirbridgeService

LENIENT = {"Prefer": "handling=lenient"}


@pytest.fixture(scope="module")
def svc(tmp_path_factory, fhir_server):
    service = FhirbridgeService(tmp_path_factory.mktemp("fb-search"),
                                ehr_url=fhir_server.base_url).start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def uploads(svc, patient, other_patient) -> dict[str, list[dict[str, Any]]]:
    """Three completed uploads for `patient`, two for `other_patient`: their Tasks."""
    out: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
    for key, who, n in (("a", patient, 3), ("b", other_patient, 2)):
        for _ in range(n):
            task, _ = completed(svc, svc.post_media(media_for(who, unique_photo())))
            out[key].append(task)
    return out


def search(svc: FhirbridgeService, rtype: str, params: Any = None,
           headers: dict[str, str] | None = None, status: int = 200) -> dict[str, Any]:
    r = svc.client.get(f"/fhir/{rtype}", params=params, headers=headers)
    assert r.status_code == status, r.text
    return r.json()


def ids(bundle: dict[str, Any]) -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", [])}


def test_task_search_by_patient_returns_that_patients_uploads_only(svc, uploads, patient,
                                                                  other_patient):
    mine = {t["id"] for t in uploads["a"]}
    for name in ("patient", "subject"):
        for value in (f"Patient/{patient['id']}", patient["id"],
                      f"{svc.fhir}/Patient/{patient['id']}"):
            got = search(svc, "Task", {name: value})
            assert ids(got) == mine and got["total"] == 3
    assert ids(search(svc, "Task", {"patient": f"Patient/{other_patient['id']}"})) == \
        {t["id"] for t in uploads["b"]}
    unknown = search(svc, "Task", {"patient": "Patient/no-such-patient"})
    assert unknown["total"] == 0 and not unknown.get("entry")


def test_task_id_status_and_last_updated(svc, uploads):
    one = uploads["a"][0]["id"]
    assert ids(search(svc, "Task", {"_id": one})) == {one}
    assert search(svc, "Task", {"_lastUpdated": "gt2030-01-01"})["total"] == 0
    everything = {t["id"] for k in ("a", "b") for t in uploads[k]}
    assert everything <= ids(search(svc, "Task", {"_lastUpdated": "le2030-01-01"}))
    assert everything <= ids(search(svc, "Task", {"status": "completed"}))
    assert search(svc, "Task", {"status": "failed", "_id": one})["total"] == 0


def test_last_updated_prefixes_at_the_values_precision(svc, uploads):
    """R4 search.html 3.1.1.4.2.5: `gt` a Task's own meta.lastUpdated (milliseconds) leaves
    it out, `ge`/`eq`/`le` keep it, `ne` leaves it out."""
    task = svc.client.get(f"/fhir/Task/{uploads['a'][1]['id']}").json()
    stamp = task["meta"]["lastUpdated"]
    for prefix, found in (("gt", 0), ("ge", 1), ("eq", 1), ("", 1), ("le", 1), ("lt", 0),
                          ("ne", 0)):
        got = search(svc, "Task", {"_id": task["id"], "_lastUpdated": prefix + stamp})
        assert got["total"] == found, (prefix, stamp)
    search(svc, "Task", {"_lastUpdated": "gtyesterday"}, status=400)

@pytest.mark.parametrize("rtype", ["Task", "ImagingStudy", "AuditEvent"])
def test_unknown_parameter_is_400_unless_lenient(svc, uploads, rtype):
    outcome = search(svc, rtype, {"no-such-param": "x", "_count": "2"}, status=400)
    assert outcome["resourceType"] == "OperationOutcome"
    assert "no-such-param" in outcome["issue"][0]["diagnostics"]
    strict = {"Prefer": "handling=strict"}
    search(svc, rtype, {"no-such-param": "x"}, headers=strict, status=400)
    got = search(svc, rtype, {"no-such-param": "x", "_count": "2"}, headers=LENIENT)
    self_url = next(ln["url"] for ln in got["link"] if ln["relation"] == "self")
    assert "no-such-param" not in self_url and "_count=2" in self_url
    assert got["total"] >= 1


def test_task_owner_is_not_supported(svc, uploads):
    search(svc, "Task", {"owner": "Organization/1"}, status=400)


def test_summary_count_gives_the_total_only(svc, uploads):
    for rtype in ("Task", "ImagingStudy"):
        got = search(svc, rtype, {"_summary": "count"})
        assert got["total"] >= 5 and not got.get("entry")


def test_paging_neither_repeats_nor_skips_while_uploads_arrive(svc, uploads, patient):
    for rtype in ("Task", "ImagingStudy"):
        before = ids(search(svc, rtype, {"_count": "1000"}))
        seen: list[str] = []
        page = search(svc, rtype, {"_count": "2"})
        assert len(page["entry"]) == 2 and page["total"] == len(before)
        while True:
            seen += [e["resource"]["id"] for e in page.get("entry", [])]
            # an upload completes between page reads: it must not shift the pages
            completed(svc, svc.post_media(media_for(patient, unique_photo())))
            nxt = next((ln["url"] for ln in page["link"] if ln["relation"] == "next"), None)
            if nxt is None:
                break
            assert nxt.startswith(svc.fhir)
            r = svc.client.get(nxt)
            assert r.status_code == 200, r.text
            page = r.json()
        assert len(seen) == len(set(seen)), "a resource appeared on two pages"
        assert before <= set(seen), "a resource that existed at the first page was skipped"


def test_imaging_study_count_and_absolute_full_urls(svc, uploads, patient):
    got = search(svc, "ImagingStudy", {"patient": f"Patient/{patient['id']}", "_count": "1"})
    assert len(got["entry"]) == 1 and got["total"] >= 3
    entry = got["entry"][0]
    assert entry["fullUrl"] == f"{svc.fhir}/ImagingStudy/{entry['resource']['id']}"
    task = search(svc, "Task", {"_count": "1"})["entry"][0]
    assert task["fullUrl"] == f"{svc.fhir}/Task/{task['resource']['id']}"


def links(bundle: dict[str, Any]) -> dict[str, str]:
    return {ln["relation"]: ln["url"] for ln in bundle["link"]}


@pytest.mark.parametrize("rtype", ["Task", "ImagingStudy", "AuditEvent"])
def test_previous_link_returns_the_page_before(svc, uploads, rtype):
    first = search(svc, rtype, {"_count": "2"})
    assert "previous" not in links(first)
    second = svc.client.get(links(first)["next"]).json()
    back = svc.client.get(links(second)["previous"])
    assert back.status_code == 200, back.text
    # AuditEvents recorded by these very searches are newer: they do not shift the pages
    assert [e["resource"]["id"] for e in back.json()["entry"]] == \
        [e["resource"]["id"] for e in first["entry"]]
    again = svc.client.get(links(back.json())["next"]).json()
    assert [e["resource"]["id"] for e in again["entry"]] == \
        [e["resource"]["id"] for e in second["entry"]]


@pytest.mark.parametrize("rtype", ["Task", "ImagingStudy", "AuditEvent"])
def test_a_cursor_the_server_did_not_give_is_400(svc, rtype):
    outcome = search(svc, rtype, {"_cursor": "not-a-cursor"}, status=400)
    assert outcome["resourceType"] == "OperationOutcome"


def test_parameters_are_anded_and_a_patient_query_never_widens(svc, uploads, patient):
    """`patient` and `_id` of another patient's Task: nothing (R4 search.html 3.1.1.4: AND)."""
    got = search(svc, "Task", {"patient": f"Patient/{patient['id']}",
                               "_id": uploads["b"][0]["id"]})
    assert got["total"] == 0 and not got.get("entry")
    both = search(svc, "Task", {"_id": f"{uploads['a'][0]['id']},{uploads['b'][0]['id']}"})
    assert both["total"] == 2
