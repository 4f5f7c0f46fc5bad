"""The real components the integration tests lean on really work: Orthanc answers and stores
what DCMTK's storescu sends, the FHIR server behaves like an EHR, dciodvfy judges objects."""

from __future__ import annotations

import io
import shutil
import subprocess
import uuid
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.support.servers import dciodvfy

FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
MRN_SYSTEM = "urn:oid:2.16.840.1.113883.3.7777"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def small_dataset(patient_id: str) -> pydicom.Dataset:
    """An 8x8 MONOCHROME2 Secondary Capture image, UTF-8, with the SC module's type 1/2."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^José"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19840307"
    ds.PatientSex = "M"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate, ds.StudyTime = "20261120", "091500"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "OT", 1, 1
    ds.Laterality = ""  # type 2C: dciodvfy cannot judge the condition, so wants it present
    ds.ConversionType = "WSD"
    ds.PatientOrientation = ""
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = 8, 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(range(64))
    return ds


def test_orthanc_answers(orthanc):
    system = httpx.get(f"{orthanc.http_url}/system", timeout=10).json()
    assert system["Name"].startswith("fhirbridge-test-")
    assert system["DicomAet"] == orthanc.aet == "ORTHANC"
    assert system["DicomPort"] == orthanc.dicom_port
    assert orthanc.dicom_url == f"dicom://ORTHANC@127.0.0.1:{orthanc.dicom_port}"
    # DICOMweb plugin loaded under /dicom-web
    r = httpx.get(f"{orthanc.dicomweb_url}/studies", timeout=10,
                  headers={"Accept": "application/dicom+json"})
    assert r.status_code == 200, r.text
    # DCMTK C-ECHO as the fhirbridge AE
    subprocess.run(["echoscu", "-aet", "FHIRBRIDGE", "-aec", orthanc.aet, "127.0.0.1",
                    str(orthanc.dicom_port)], check=True, timeout=30, stdin=subprocess.DEVNULL)


def test_storescu_c_store_lands_in_orthanc(orthanc, tmp_path: Path, dciodvfy_check):
    patient_id = f"INFRA-{uuid.uuid4().hex[:8]}"
    ds = small_dataset(patient_id)
    path = tmp_path / "sc.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    dciodvfy_check(path)
    before = set(orthanc.instances())
    subprocess.run(["storescu", "-aet", "FHIRBRIDGE", "-aec", orthanc.aet, "127.0.0.1",
                    str(orthanc.dicom_port), str(path)], check=True, timeout=30,
                   stdin=subprocess.DEVNULL)
    new = set(orthanc.instances()) - before
    assert len(new) == 1
    assert orthanc.find_instances(ds.SOPInstanceUID) == list(new)
    assert patient_id in orthanc.patients_ids()
    stored = pydicom.dcmread(io.BytesIO(orthanc.instance_file(new.pop())))
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert str(stored.PatientName) == "Müller^José"
    orthanc.reset()
    assert orthanc.instances() == []
    assert orthanc.find_instances(ds.SOPInstanceUID) == []


def test_dciodvfy_reports_errors(tmp_path: Path, dciodvfy_check):
    ds = small_dataset("INFRA-BAD")
    del ds.Rows  # type 1 in Image Pixel: an Error
    ok, errors, output = dciodvfy(_write(tmp_path / "bad.dcm", ds))
    assert not ok and errors and "Error" in output
    with pytest.raises(AssertionError, match="dciodvfy found"):
        dciodvfy_check(ds)
    assert shutil.which("dciodvfy")


def _write(path: Path, ds: pydicom.Dataset) -> Path:
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def test_fhir_server_as_ehr(fhir_server):
    client = httpx.Client(base_url=fhir_server.base_url, headers=FHIR_JSON, timeout=10)
    meta = client.get("/metadata")
    assert meta.status_code == 200
    assert meta.headers["content-type"].startswith("application/fhir+json")
    assert meta.json()["fhirVersion"] == "4.0.1"

    mrn = f"MRN-{uuid.uuid4().hex[:8]}"
    patient = {"resourceType": "Patient", "identifier": [{"system": MRN_SYSTEM, "value": mrn}],
               "name": [{"family": "Müller", "given": ["José"]}], "birthDate": "1984-03-07",
               "gender": "male"}
    r = client.post("/Patient", json=patient)
    assert r.status_code == 201, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    pid = r.json()["id"]
    assert r.headers["location"].startswith(f"{fhir_server.base_url}/Patient/{pid}")
    assert client.get(f"/Patient/{pid}").json()["name"][0]["family"] == "Müller"

    found = client.get("/Patient", params={"identifier": f"{MRN_SYSTEM}|{mrn}"}).json()
    assert found["resourceType"] == "Bundle" and found["total"] == 1
    assert found["entry"][0]["resource"]["id"] == pid

    # conditional create finds the existing one
    r = client.post("/Patient", json=patient,
                    headers={"If-None-Exist": f"identifier={MRN_SYSTEM}|{mrn}"})
    assert r.status_code == 200 and r.json()["id"] == pid

    # conditional update on the study UID: created once, then updated in place
    study_uid = generate_uid()
    ident = {"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}
    codes = []
    for n in (1, 2):
        r = client.put("/ImagingStudy", params={"identifier": f"urn:dicom:uid|urn:oid:{study_uid}"},
                       json={"resourceType": "ImagingStudy", "status": "available",
                             "identifier": [ident], "subject": {"reference": f"Patient/{pid}"},
                             "numberOfInstances": n})
        assert r.status_code in (200, 201), r.text
        codes.append(r.status_code)
    assert codes == [201, 200]
    studies = client.get("/ImagingStudy", params={"patient": f"Patient/{pid}"}).json()
    assert studies["total"] == 1
    assert studies["entry"][0]["resource"]["numberOfInstances"] == 2

    # transaction with urn:uuid references
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:6f1c7d3e-8a4b-4c55-9d1e-0b2a3c4d5e6f",
         "resource": {"resourceType": "Patient", "name": [{"family": "Tx"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "ImagingStudy", "status": "available",
                      "subject": {"reference": "urn:uuid:6f1c7d3e-8a4b-4c55-9d1e-0b2a3c4d5e6f"}},
         "request": {"method": "POST", "url": "ImagingStudy"}}]}
    r = client.post("", json=tx)
    assert r.status_code == 200, r.text
    entries = r.json()["entry"]
    assert [e["response"]["status"] for e in entries] == ["201", "201"]
    tx_pid = entries[0]["resource"]["id"]
    assert entries[1]["resource"]["subject"]["reference"] == f"Patient/{tx_pid}"

    # invalid resources are refused with an OperationOutcome
    for bad in ({"resourceType": "Patient", "birthDate": "07.03.1984"},
                {"resourceType": "ImagingStudy", "status": "available"}):
        r = client.post(f"/{bad['resourceType']}", json=bad)
        assert r.status_code == 400, r.text
        assert r.json()["resourceType"] == "OperationOutcome"
    assert client.get("/Patient/does-not-exist").status_code == 404
