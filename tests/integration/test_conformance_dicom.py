"""Conformance of what reaches the PACS and the ImagingStudy (issue 11, points 1, 2, 16),
through `fhirbridge serve` against real Orthanc and the real test FHIR server."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from tests.integration.test_documents_and_bundles import (
    attachment, document, done, entry, focus_of, media, post, stored, tiny_pdf)
from tests.integration.test_photo_end_to_end import unique_photo
from tests.support.service import FhirbridgeService


@pytest.fixture(scope="module")
def svc(tmp_path_factory, orthanc, fhir_server):
    service = FhirbridgeService(
        tmp_path_factory.mktemp("fb-conf-dicom"), pacs_url=orthanc.dicom_url,
        ehr_url=fhir_server.base_url, wado_rs_url=orthanc.dicomweb_url)
    yield service.start()
    service.stop()


def instance_uids(study: dict[str, Any]) -> list[str]:
    return [i["uid"] for s in study.get("series", []) for i in s.get("instance", [])]


def all_studies(svc: FhirbridgeService) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    url: str | None = "/fhir/ImagingStudy"
    while url:
        page = svc.client.get(url).json()
        found += [e["resource"] for e in page.get("entry", [])]
        url = next((link["url"] for link in page.get("link", [])
                    if link["relation"] == "next"), None)
    return found


def test_same_bytes_in_a_batch_point_at_the_existing_study(svc, orthanc, patient):
    """Point 1: photo + PDF posted singly, then the same bytes for the same patient in a
    batch Bundle: each SOP Instance UID is in Orthanc once, under one study, and no two
    ImagingStudies list it; the repeats' Tasks say `duplicate` and point at that study."""
    photo, pdf = unique_photo(), tiny_pdf()
    single = [post(svc, "/fhir/Media", media(patient, photo)),
              post(svc, "/fhir/DocumentReference",
                   document(patient, attachment(pdf, "application/pdf")))]
    assert [r.status_code for r in single] == [201, 201], [r.text for r in single]
    first = [done(svc, f"{r.json()['resourceType']}/{r.json()['id']}") for r in single]
    uids = [instance_uids(study)[0] for _, study in first]

    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        entry(media(patient, photo)),
        entry(document(patient, attachment(pdf, "application/pdf")))]}
    r = post(svc, "/fhir", bundle)
    assert r.status_code == 200, r.text
    for e, (task1, study1) in zip(r.json()["entry"], first):
        assert e["response"]["status"] == "201 Created", e
        task, study = done(svc, focus_of(e["response"]["location"]))
        assert task["statusReason"]["coding"][0]["code"] == "duplicate", task
        assert study["id"] == study1["id"]
        assert instance_uids(study) == instance_uids(study1)

    for uid, (_, study1) in zip(uids, first):
        ds = stored(orthanc, uid)  # exactly one copy in the PACS
        assert ds.StudyInstanceUID == study1["identifier"][0]["value"].removeprefix("urn:oid:")
    listed = Counter(u for s in all_studies(svc) for u in instance_uids(s))
    assert all(listed[u] == 1 for u in uids), listed


def test_transaction_with_the_same_bytes_twice_is_one_instance(svc, orthanc, patient):
    """Point 1: the same photo twice in one transaction is one SOP Instance in one study."""
    photo = unique_photo()
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        entry(media(patient, photo)), entry(media(patient, photo)),
        entry(media(patient, unique_photo()))]}
    r = post(svc, "/fhir", bundle)
    assert r.status_code == 200, r.text
    results = [done(svc, focus_of(e["response"]["location"])) for e in r.json()["entry"]]
    assert len({study["id"] for _, study in results}) == 1
    _, last = done(svc, focus_of(r.json()["entry"][-1]["response"]["location"]))
    uids = instance_uids(last)
    assert len(uids) == len(set(uids)) == 2, last
    for uid in uids:
        stored(orthanc, uid)
    listed = Counter(u for s in all_studies(svc) for u in instance_uids(s))
    assert all(listed[u] == 1 for u in uids), listed


def test_missing_staged_bytes_give_a_plain_reason(tmp_path, patient, fhir_server):
    """Point 16: an upload whose staged bytes vanished (a wiped disk, another node) fails
    with a reason a person can read: no file-system path, no exception text."""
    import hashlib

    from fhirbridge.adapters.blobs import _rel
    from tests.support.service import free_port

    closed_pacs = f"dicom://ORTHANC@127.0.0.1:{free_port()}"  # every C-STORE attempt fails
    service = FhirbridgeService(tmp_path / "fb", pacs_url=closed_pacs,
                                ehr_url=fhir_server.base_url).start()
    try:
        photo = unique_photo()
        r = service.post_media(media(patient, photo))
        assert r.status_code == 201, r.text
        blob = service.data_dir / "blobs" / _rel(hashlib.sha256(photo).hexdigest())
        blob.unlink()
        task = service.wait_task(f"Media/{r.json()['id']}", until=("failed",), timeout=90)
        reason = task["statusReason"]["text"]
        assert reason == "the staged bytes of this upload are missing on this node", task
        assert "/" not in reason and "Errno" not in reason
    finally:
        service.stop()


def test_video_without_body_site_has_no_body_site_in_the_imaging_study(svc, orthanc, patient):
    """Point 2: a video posted without bodySite: the DICOM object must name some anatomy
    (SCT 123037004 "Body structure", required for Video Photographic), but the ImagingStudy
    says nothing it does not know: no series.bodySite."""
    from tests.media.test_pdf_video import make_video

    mp4 = make_video("libx264", options={"profile": "high", "level": "4.1"}, frames=10)
    r = post(svc, "/fhir/Media", media(patient, b"") | {"content": attachment(mp4, "video/mp4")})
    assert r.status_code == 201, r.text
    _, study = done(svc, f"Media/{r.json()['id']}")
    (series,) = study["series"]
    assert "bodySite" not in series and "laterality" not in series, series
    ds = stored(orthanc, series["instance"][0]["uid"])
    assert ds.AnatomicRegionSequence[0].CodeValue == "123037004"


def test_sample_photo_dates_speak_of_one_zone(svc, orthanc, patient, dciodvfy_check):
    """Point 2: the README's sample (EXIF capture time +02:00, createdDateTime the same
    moment): every date and time of the object is in the one offset TimezoneOffsetFromUTC
    names, and acquisition and content agree."""
    import json
    from pathlib import Path

    sample = json.loads((Path(__file__).resolve().parents[2] / "samples"
                         / "media-photo.json").read_text())
    sample["subject"] = {"reference": f"Patient/{patient['id']}"}
    for own in ("identifier", "contained"):  # this module's patient, not the sample's
        sample.pop(own, None)
    r = post(svc, "/fhir/Media", sample)
    assert r.status_code in (200, 201), r.text
    _, study = done(svc, f"Media/{r.json()['id']}")
    ds = stored(orthanc, instance_uids(study)[0])
    assert ds.TimezoneOffsetFromUTC == "+0200"
    assert str(ds.AcquisitionDateTime).startswith(f"{ds.ContentDate}{ds.ContentTime[:6]}")
    assert str(ds.AcquisitionDateTime).endswith("+0200")
    contribution = str(ds.ContributingEquipmentSequence[0].ContributionDateTime)
    assert contribution.endswith("+0200")
    assert ds.AnatomicRegionSequence[0].CodeMeaning == "Upper arm structure"
    dciodvfy_check(ds)
