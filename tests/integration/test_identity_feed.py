"""Identity through the running service: ADT over MLLP (python-hl7's `mllp_send`, an
independent client) feeds the index; an A40 merge and an A08 rename after images are stored
correct them in Orthanc and move the ImagingStudy at the FHIR server."""

from __future__ import annotations

import io
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pydicom
import pytest

from tests.integration.test_photo_end_to_end import (
    MRN_SYSTEM,
    completed,
    ehr_search,
    media_for,
    sample_media,
    unique_photo,
    with_photo,
)
from tests.support.phi import seed_hl7
from tests.support.service import FhirbridgeService

MLLP_SEND = Path(sys.executable).parent / "mllp_send"


def adt(event: str, pid: str, *, mrg: str = "", when: str = "20261121100000",
        structure: str = "ADT_A01") -> str:
    control = uuid.uuid4().hex[:20]
    segs = [f"MSH|^~\\&|ADT|HOSP|FHIRBRIDGE|HOSP|{when}||ADT^{event}^{structure}|{control}|P|2.5.1"
            "||||||UNICODE UTF-8",
            f"EVN|{event}|{when}", pid]
    if mrg:
        segs.append(mrg)
    message = "\r".join(segs) + "\r"
    seed_hl7(message)  # the session's log scan looks for these names and identifiers
    return message


def send(svc: FhirbridgeService, tmp_path: Path, *messages: str) -> str:
    f = tmp_path / f"{uuid.uuid4().hex}.hl7"
    f.write_bytes("\n".join(messages).encode())  # mllp_send splits on MSH
    out = subprocess.run([str(MLLP_SEND), "--loose", "-f", str(f), "-p", str(svc.mllp_port),
                          "127.0.0.1"], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout.decode("utf-8", errors="replace")


def wait_for(predicate, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture()
def service(tmp_path, orthanc, fhir_server):
    svc = FhirbridgeService(tmp_path / "fb", pacs_url=orthanc.dicom_url,
                            ehr_url=fhir_server.base_url,
                            pacs_options={"correction": "orthanc",
                                          "orthanc_url": orthanc.http_url}).start()
    yield svc
    svc.stop()


def test_merge_and_rename_after_storage(service, tmp_path, orthanc, fhir_server):
    ehr = httpx.Client(base_url=fhir_server.base_url, timeout=10,
                       headers={"Content-Type": "application/fhir+json"})
    tag = uuid.uuid4().hex[:6].upper()
    old_mrn, new_mrn = f"OLD{tag}", f"NEW{tag}"
    old = ehr.post("/Patient", json={"resourceType": "Patient", "identifier": [
        {"system": MRN_SYSTEM, "value": old_mrn}], "name": [{"family": "O'Brien",
        "given": ["Siobhán"]}], "birthDate": "1975-05-04", "gender": "female"}).json()
    new = ehr.post("/Patient", json={"resourceType": "Patient", "identifier": [
        {"system": MRN_SYSTEM, "value": new_mrn}], "name": [{"family": "O'Brien-Kelly",
        "given": ["Siobhán"]}], "birthDate": "1975-05-04", "gender": "female"}).json()

    acks = send(service, tmp_path,
                adt("A04", f"PID|1||{old_mrn}^^^HOSP^MR||O'Brien^Siobhán||19750504|F"),
                adt("A04", f"PID|1||{new_mrn}^^^HOSP^MR||O'Brien-Kelly^Siobhán||19750504|F"))
    assert acks.count("MSA|AA") == 2, acks

    studies = []
    for _ in range(2):
        _, study = completed(service, service.post_media(media_for(old, unique_photo())))
        studies.append(study)
    sops = [s["series"][0]["instance"][0]["uid"] for s in studies]
    assert old_mrn in orthanc.patients_ids()

    # the EHR merges (PIXm: subsumed inactive, replaced-by survivor), the ADT feed says so
    old_merged = dict(old, active=False, link=[{"other": {"reference": f"Patient/{new['id']}"},
                                                "type": "replaced-by"}])
    assert ehr.put(f"/Patient/{old['id']}", json=old_merged).status_code == 200
    a40 = adt("A40", f"PID|1||{new_mrn}^^^HOSP^MR||O'Brien-Kelly^Siobhán||19750504|F",
              mrg=f"MRG|{old_mrn}^^^HOSP^MR", when="20261121110000", structure="ADT_A39")
    acks = send(service, tmp_path, a40, a40)  # a repeated A40 is acknowledged and applied once
    assert acks.count("MSA|AA") == 2, acks

    def moved() -> bool:
        ids = orthanc.patients_ids()
        return new_mrn in ids and old_mrn not in ids and all(
            len(orthanc.find_instances(s)) == 1 for s in sops)

    wait_for(moved, what="Orthanc to list the images under the survivor only")
    for sop in sops:
        ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(orthanc.find_instances(sop)[0])))
        assert ds.PatientID == new_mrn and str(ds.PatientName) == "O'Brien-Kelly^Siobhán"
        original = ds.OriginalAttributesSequence[-1]
        assert original.ModifiedAttributesSequence[0].PatientID == old_mrn
        assert original.ReasonForTheAttributeModification == "CORRECT"
    for study in studies:
        uid = study["identifier"][0]["value"].removeprefix("urn:oid:")
        wait_for(lambda: ehr_search(fhir_server, "ImagingStudy?identifier=urn:dicom:uid|"
                                    f"urn:oid:{uid}")[0]["subject"]["reference"]
                 == f"Patient/{new['id']}", what="ImagingStudy.subject to move")
    assert ehr_search(fhir_server, f"ImagingStudy?patient=Patient/{old['id']}") == []

    # A08: the EHR renames the patient; the feed's A08 makes the PACS follow
    renamed = dict(new, name=[{"family": "Kelly", "given": ["Siobhán"]}])
    assert ehr.put(f"/Patient/{new['id']}", json=renamed).status_code == 200
    acks = send(service, tmp_path, adt("A08", f"PID|1||{new_mrn}^^^HOSP^MR||Kelly^Siobhán||"
                                       "19750504|F", when="20261121120000"))
    assert "MSA|AA" in acks

    def renamed_in_pacs() -> bool:
        ds = stored_copy(orthanc, sops[0])
        return ds is not None and str(ds.PatientName) == "Kelly^Siobhán"

    wait_for(renamed_in_pacs, what="the A08 name change in Orthanc")


def test_without_ehr_a_patient_known_from_adt_matches(tmp_path):
    svc = FhirbridgeService(tmp_path / "fb").start()  # embedded defaults: folder PACS, no EHR
    try:
        mrn = f"ADT{uuid.uuid4().hex[:8]}"
        media = with_photo(sample_media(), unique_photo())
        media["subject"] = {"identifier": {"system": MRN_SYSTEM, "value": mrn}}
        r = svc.post_media(media)
        held = svc.wait_task(f"Media/{r.json()['id']}")
        assert held["status"] == "on-hold"  # unknown locally: held, not guessed
        acks = send(svc, tmp_path, adt("A04", f"PID|1||{mrn}^^^HOSP^MR||Müller^José||19840307|M"))
        assert "MSA|AA" in acks
        r = svc.post_media(media)
        task = svc.wait_task(f"Media/{r.json()['id']}")
        assert task["status"] == "completed", task
        files = list((svc.data_dir / "dicom").rglob("*.dcm"))
        ds = pydicom.dcmread(files[0])
        assert ds.PatientID == mrn and str(ds.PatientName) == "Müller^José"
        # the held one is in the review queue; a reviewer confirms the index patient
        queue = svc.client.get("/review").json()
        assert len(queue) == 1 and queue[0]["reason"] == "no-match"
        index_ref = svc.client.get("/fhir/ImagingStudy", params={
            "patient:identifier": f"{MRN_SYSTEM}|{mrn}"}).json()["total"]
        assert index_ref == 1
    finally:
        svc.stop()


def test_listener_survives_garbage(service, tmp_path):
    with socket.create_connection(("127.0.0.1", service.mllp_port), timeout=5) as s:
        s.sendall(b"\x0b\x00\xff garbage \x1c\r")
        reply = s.recv(4096)
        assert b"MSA|AR" in reply
    acks = send(service, tmp_path, adt("A08", "PID|1||X1^^^HOSP^MR||Doe^Jane||19800101|F"))
    assert "MSA|AA" in acks


def stored_copy(orthanc, sop: str) -> pydicom.Dataset | None:
    """The one copy of `sop` in Orthanc, or None (none, or two, while a correction runs)."""
    ids = orthanc.find_instances(sop)
    if len(ids) != 1:
        return None
    try:
        return pydicom.dcmread(io.BytesIO(orthanc.instance_file(ids[0])))
    except Exception:  # deleted between the look-up and the download
        return None


def test_merge_made_only_at_the_ehr_reaches_the_pacs(service, orthanc, fhir_server):
    """No ADT at all: the EHR links the subsumed Patient `replaced-by` the survivor, and
    later renames the survivor; the recheck moves and renames what was stored."""
    ehr = httpx.Client(base_url=fhir_server.base_url, timeout=10,
                       headers={"Content-Type": "application/fhir+json"})
    tag = uuid.uuid4().hex[:6].upper()
    old_mrn, new_mrn = f"EOLD{tag}", f"ENEW{tag}"
    old = ehr.post("/Patient", json={"resourceType": "Patient", "identifier": [
        {"system": MRN_SYSTEM, "value": old_mrn}], "name": [{"family": "Nakamura",
        "given": ["Yūki"]}], "birthDate": "1988-02-29", "gender": "other"}).json()
    new = ehr.post("/Patient", json={"resourceType": "Patient", "identifier": [
        {"system": MRN_SYSTEM, "value": new_mrn}], "name": [{"family": "Nakamura",
        "given": ["Yuki"]}], "birthDate": "1988-02-29", "gender": "other"}).json()
    _, study = completed(service, service.post_media(media_for(old, unique_photo())))
    sop = study["series"][0]["instance"][0]["uid"]
    uid = study["identifier"][0]["value"].removeprefix("urn:oid:")

    old_merged = dict(old, active=False, link=[{"other": {"reference": f"Patient/{new['id']}"},
                                                "type": "replaced-by"}])
    assert ehr.put(f"/Patient/{old['id']}", json=old_merged).status_code == 200
    assert service.client.post("/admin/ehr-recheck").status_code == 202

    def moved() -> bool:
        ids = orthanc.find_instances(sop)
        if len(ids) != 1:
            return False
        ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(ids[0])))
        return ds.PatientID == new_mrn and old_mrn not in orthanc.patients_ids()

    wait_for(moved, what="Orthanc to list the image under the EHR's survivor")
    wait_for(lambda: ehr_search(fhir_server, "ImagingStudy?identifier=urn:dicom:uid|"
                                f"urn:oid:{uid}")[0]["subject"]["reference"]
             == f"Patient/{new['id']}", what="ImagingStudy.subject to move")

    renamed = dict(new, name=[{"family": "Nakamura-Berg", "given": ["Yuki"]}])
    assert ehr.put(f"/Patient/{new['id']}", json=renamed).status_code == 200
    assert service.client.post("/admin/ehr-recheck").status_code == 202

    def renamed_in_pacs() -> bool:
        ds = stored_copy(orthanc, sop)  # None while Orthanc swaps the copies
        return ds is not None and str(ds.PatientName) == "Nakamura-Berg^Yuki"

    wait_for(renamed_in_pacs, what="the EHR's name change in Orthanc")


def test_upload_through_a_merged_reference_moves_earlier_images(service, orthanc,
                                                                  fhir_server):
    """A later upload names the subsumed Patient: it is stored under the survivor, and the
    earlier images stored under the subsumed Patient follow without waiting for a recheck."""
    ehr = httpx.Client(base_url=fhir_server.base_url, timeout=10,
                       headers={"Content-Type": "application/fhir+json"})
    tag = uuid.uuid4().hex[:6].upper()
    old = ehr.post("/Patient", json={"resourceType": "Patient", "identifier": [
        {"system": MRN_SYSTEM, "value": f"UOLD{tag}"}], "name": [{"family": "Dupont",
        "given": ["Léa"]}], "birthDate": "2001-11-09", "gender": "female"}).json()
    new = ehr.post("/Patient", json={"resourceType": "Patient", "identifier": [
        {"system": MRN_SYSTEM, "value": f"UNEW{tag}"}], "name": [{"family": "Dupont",
        "given": ["Léa"]}], "birthDate": "2001-11-09", "gender": "female"}).json()
    _, first = completed(service, service.post_media(media_for(old, unique_photo())))
    sop = first["series"][0]["instance"][0]["uid"]
    old_merged = dict(old, active=False, link=[{"other": {"reference": f"Patient/{new['id']}"},
                                                "type": "replaced-by"}])
    assert ehr.put(f"/Patient/{old['id']}", json=old_merged).status_code == 200
    _, second = completed(service, service.post_media(media_for(old, unique_photo())))
    assert second["subject"]["reference"] == f"Patient/{new['id']}"

    def moved() -> bool:
        ds = stored_copy(orthanc, sop)
        return ds is not None and ds.PatientID == f"UNEW{tag}"

    wait_for(moved, what="the earlier image to follow the merge")


def test_acknowledgments_as_hl7_v251_says(tmp_path):
    """HL7 v2.5.1 §2.9 through `fhirbridge serve` and an independent client (`mllp_send`):
    a content error is AE with an ERR segment (not AR, "resend later"); an event fhirbridge
    does not apply is AE 201 by default, AA with a note when `[mllp] unsupported_events` (here
    from the environment) says so; MSH-15 AL gets a commit ACK (CA)."""
    default = FhirbridgeService(tmp_path / "ae").start()  # folder PACS, no EHR
    noted = FhirbridgeService(tmp_path / "aa",
                              env={"FHIRBRIDGE_MLLP__UNSUPPORTED_EVENTS": "AA"}).start()
    try:
        mrn = f"ACK{uuid.uuid4().hex[:8]}"
        bad_date = adt("A08", f"PID|1||{mrn}^^^HOSP^MR||Müller^José||20231345|M")
        a02 = adt("A02", f"PID|1||{mrn}^^^HOSP^MR||Müller^José||19840307|M")
        enhanced = adt("A08", f"PID|1||{mrn}^^^HOSP^MR||Müller^José||19840307|M").replace(
            "|P|2.5.1||||||", "|P|2.5.1|||AL|NE||", 1)
        acks = re.split(r"[\r\n\x0b\x1c]+", send(default, tmp_path, bad_date, a02, enhanced))
        msa = [line for line in acks if line.startswith("MSA|")]
        err = [line for line in acks if line.startswith("ERR|")]
        assert [m.split("|")[1] for m in msa] == ["AE", "AE", "CA"], acks
        assert err[0].startswith("ERR||PID^1^7|102^") and err[1].startswith("ERR||MSH^1^9|201^")
        for line in acks:
            assert "Müller" not in line and mrn not in line and "2023" not in line
        noted_acks = send(noted, tmp_path, adt("A03", f"PID|1||{mrn}^^^HOSP^MR||Doe^J"))
        assert "MSA|AA|" in noted_acks and "not applied: event not supported" in noted_acks
        assert "ERR|" not in noted_acks
    finally:
        default.stop()
        noted.stop()
