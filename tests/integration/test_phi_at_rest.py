"""PHI at rest kept small, through `fhirbridge serve` as users run it: no staged bytes or built
DICOM copy left once the PACS holds the object, private file modes, the stored resource
stripped of what the patient typed, the retention purge, and corrections after the copies are
gone (the object comes back from Orthanc by REST, WADO-RS or C-GET)."""

from __future__ import annotations

import io
import stat
import uuid
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from tests.integration.test_identity_feed import adt, send, wait_for
from tests.integration.test_photo_end_to_end import MRN_SYSTEM, unique_photo, with_photo
from tests.support.service import FhirbridgeService


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def assert_private(data_dir: Path) -> None:
    """Every directory under data_dir (and itself) 0700, every file 0600."""
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700, oct(data_dir.stat().st_mode)
    seen = 0
    for p in data_dir.rglob("*"):
        mode = stat.S_IMODE(p.lstat().st_mode)
        if p.is_dir():
            assert mode == 0o700, f"{p.relative_to(data_dir)} is {oct(mode)}"
        else:
            assert mode == 0o600, f"{p.relative_to(data_dir)} is {oct(mode)}"
        seen += 1
    assert seen, "nothing under data_dir"


def typed_media(patient: dict[str, Any], photo: bytes) -> dict[str, Any]:
    """A Media as a portal sends it: the patient's own details (contained), a display name on
    the subject and a free-text note."""
    name = patient["name"][0]
    media = with_photo({
        "resourceType": "Media", "status": "completed",
        "identifier": [{"system": "https://portal.example.org/uploads",
                        "value": uuid.uuid4().hex}],
        "contained": [{"resourceType": "Patient", "id": "self", "name": [name],
                       "birthDate": patient["birthDate"], "gender": patient["gender"]}],
        "subject": {"reference": f"Patient/{patient['id']}",
                    "display": f"{name['given'][0]} {name['family']}"},
        "createdDateTime": "2026-11-20T09:15:00+01:00",
        "note": [{"text": f"Sore knee since the fall, {name['given'][0]} says"}],
    }, photo)
    return media


def upload(svc: FhirbridgeService, media: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    r = svc.post_media(media)
    assert r.status_code == 201, r.text
    media_id = r.json()["id"]
    return media_id, svc.wait_task(f"Media/{media_id}")


def wait_gone(svc: FhirbridgeService, *folders: str) -> None:
    """The files go just after the Task shows completed (a retry before it still needs them)."""
    wait_for(lambda: all(files_under(svc.data_dir / f) == [] for f in folders), timeout=10,
             what=f"no file left in {', '.join(folders)}")


@pytest.fixture()
def folder_service(tmp_path, fhir_server):
    """Embedded PACS (a folder under data_dir), the test EHR; data_dir made 0755 beforehand."""
    (tmp_path / "fb" / "var").mkdir(parents=True)
    (tmp_path / "fb" / "var").chmod(0o755)
    svc = FhirbridgeService(tmp_path / "fb", ehr_url=fhir_server.base_url).start()
    yield svc
    svc.stop()


def test_completed_upload_leaves_no_copy_and_nothing_readable_by_others(folder_service,
                                                                        patient):
    svc = folder_service
    media_id, task = upload(svc, typed_media(patient, unique_photo()))
    assert task["status"] == "completed", task

    # the PACS (here the folder) holds the object; fhirbridge's own copies are gone
    assert len(files_under(svc.data_dir / "dicom")) == 1
    wait_gone(svc, "blobs", "instances")
    assert_private(svc.data_dir)
    assert "open to other users" in svc.log_text()  # the 0755 data_dir was closed, and said

    # what the patient typed about themselves is no longer stored
    stored = svc.client.get(f"/fhir/Media/{media_id}").json()
    assert "contained" not in stored and "note" not in stored, stored
    assert stored["subject"] == {"reference": f"Patient/{patient['id']}"}
    assert stored["identifier"] and stored["content"]["contentType"] == "image/jpeg"


def test_held_upload_keeps_its_bytes_for_the_reviewer(folder_service):
    svc = folder_service
    media = with_photo({"resourceType": "Media", "status": "completed",
                        "subject": {"identifier": {"system": MRN_SYSTEM,
                                                   "value": f"NOPE-{uuid.uuid4().hex[:8]}"}},
                        "content": {}}, unique_photo())
    media_id, task = upload(svc, media)
    assert task["status"] == "on-hold", task
    assert len(files_under(svc.data_dir / "blobs")) == 1
    assert_private(svc.data_dir)


def test_keep_files_keeps_staged_bytes_and_built_copy(tmp_path, fhir_server, patient):
    svc = FhirbridgeService(tmp_path / "fb", ehr_url=fhir_server.base_url,
                            extra="[retention]\nkeep_files = true\n").start()
    try:
        _, task = upload(svc, typed_media(patient, unique_photo()))
        assert task["status"] == "completed", task
        assert len(files_under(svc.data_dir / "blobs")) == 1
        assert len(files_under(svc.data_dir / "instances")) == 1
        assert_private(svc.data_dir)
    finally:
        svc.stop()


def test_purge_removes_completed_uploads_and_leaves_held_ones(tmp_path, fhir_server, patient):
    svc = FhirbridgeService(tmp_path / "fb", ehr_url=fhir_server.base_url,
                            extra="[retention]\nkeep_files = true\nretention_days = 0.00002\n"
                            ).start()
    try:
        done_id, task = upload(svc, typed_media(patient, unique_photo()))
        assert task["status"] == "completed", task
        held_media = with_photo({"resourceType": "Media", "status": "completed",
                                 "subject": {"identifier": {
                                     "system": MRN_SYSTEM,
                                     "value": f"NOPE-{uuid.uuid4().hex[:8]}"}},
                                 "content": {}}, unique_photo())
        held_id, held = upload(svc, held_media)
        assert held["status"] == "on-hold", held
        study_ref = task["output"][0]["valueReference"]["reference"]

        wait_for(lambda: svc.client.get(f"/fhir/Media/{done_id}").status_code == 404,
                 timeout=20, what="the completed upload to be purged")
        tasks = svc.client.get("/fhir/Task", params={"focus": f"Media/{done_id}"}).json()
        assert tasks["total"] == 0, tasks
        # its leftover files (keep_files) went with it; the held upload is untouched
        assert len(files_under(svc.data_dir / "instances")) == 0
        assert len(files_under(svc.data_dir / "blobs")) == 1
        assert svc.client.get(f"/fhir/Media/{held_id}").status_code == 200
        assert svc.wait_task(f"Media/{held_id}")["status"] == "on-hold"
        assert svc.client.get("/review").json()  # still in the review queue
        # the ImagingStudy (and the PACS object) stay
        assert svc.client.get(f"/fhir/{study_ref}").status_code == 200
        assert len(files_under(svc.data_dir / "dicom")) == 1
    finally:
        svc.stop()


# --- corrections once fhirbridge's copy is gone ----------------------------------------------

CONFIGS = {
    # DIMSE C-STORE, corrections through Orthanc's REST API (the object read back by REST)
    "dimse-orthanc-rest": lambda o: dict(pacs_url=o.dicom_url, pacs_options={
        "correction": "orthanc", "orthanc_url": o.http_url}),
    # STOW-RS; the object read back by WADO-RS
    "dicomweb": lambda o: dict(pacs_url=o.dicomweb_url),
    # DIMSE C-STORE; the object read back by C-GET
    "dimse-c-get": lambda o: dict(pacs_url=o.dicom_url),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_merge_after_the_copy_is_gone_still_corrects_the_pacs(config, tmp_path, orthanc,
                                                              fhir_server):
    svc = FhirbridgeService(tmp_path / "fb", ehr_url=fhir_server.base_url,
                            **CONFIGS[config](orthanc)).start()
    try:
        ehr = httpx.Client(base_url=fhir_server.base_url, timeout=10,
                           headers={"Content-Type": "application/fhir+json"})
        tag = uuid.uuid4().hex[:6].upper()
        old_mrn, new_mrn = f"ROLD{tag}", f"RNEW{tag}"
        old = ehr.post("/Patient", json={"resourceType": "Patient", "identifier": [
            {"system": MRN_SYSTEM, "value": old_mrn}], "name": [{"family": "Ní Bhriain",
            "given": ["Aoife"]}], "birthDate": "1979-08-14", "gender": "female"}).json()
        new = ehr.post("/Patient", json={"resourceType": "Patient", "identifier": [
            {"system": MRN_SYSTEM, "value": new_mrn}], "name": [{"family": "Ní Bhriain-Walsh",
            "given": ["Aoife"]}], "birthDate": "1979-08-14", "gender": "female"}).json()
        acks = send(svc, tmp_path,
                    adt("A04", f"PID|1||{old_mrn}^^^HOSP^MR||Ní Bhriain^Aoife||19790814|F"),
                    adt("A04", f"PID|1||{new_mrn}^^^HOSP^MR||Ní Bhriain-Walsh^Aoife||"
                        "19790814|F"))
        assert acks.count("MSA|AA") == 2, acks

        media_id, task = upload(svc, typed_media(old, unique_photo()))
        assert task["status"] == "completed", task
        study = svc.client.get(f"/fhir/{task['output'][0]['valueReference']['reference']}"
                               ).json()
        sop = study["series"][0]["instance"][0]["uid"]
        wait_gone(svc, "blobs", "instances")  # our copies are gone

        merged = dict(old, active=False, link=[{"other": {"reference": f"Patient/{new['id']}"},
                                                "type": "replaced-by"}])
        assert ehr.put(f"/Patient/{old['id']}", json=merged).status_code == 200
        acks = send(svc, tmp_path, adt(
            "A40", f"PID|1||{new_mrn}^^^HOSP^MR||Ní Bhriain-Walsh^Aoife||19790814|F",
            mrg=f"MRG|{old_mrn}^^^HOSP^MR", when="20261121110000", structure="ADT_A39"))
        assert "MSA|AA" in acks

        def corrected() -> pydicom.Dataset | None:
            for oid in orthanc.find_instances(sop):
                try:
                    ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(oid)))
                except Exception:  # replaced between the look-up and the download
                    continue
                if ds.PatientID == new_mrn:
                    return ds
            return None

        wait_for(lambda: corrected() is not None, timeout=30,
                 what="the object in Orthanc under the survivor's PatientID")
        ds = corrected()
        assert ds is not None and str(ds.PatientName) == "Ní Bhriain-Walsh^Aoife"
        assert ds.OriginalAttributesSequence[-1].ModifiedAttributesSequence[0].PatientID \
            == old_mrn
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"  # not transcoded
        if config == "dimse-orthanc-rest":
            wait_for(lambda: old_mrn not in orthanc.patients_ids(), timeout=30,
                     what="the copy under the retired PatientID to go")
        jobs = svc.client.get("/fhir/Task", params={"focus": f"Media/{media_id}"}).json()
        assert jobs["entry"][0]["resource"]["status"] == "completed"
        assert files_under(svc.data_dir / "instances") == []
    finally:
        svc.stop()
