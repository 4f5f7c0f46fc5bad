"""Benchmark: portal photos through fhirbridge into Orthanc over C-STORE, against the pipe's
limit (DCMTK `storescu -xy` of the same objects) and Orthanc's own `/tools/create-dicom`.

Prints figures; not a test. Usage: .venv/bin/python bench/photo_pipeline.py [--n 200]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.servers import FhirServer, OrthancServer, require_tools  # noqa: E402
from tests.support.service import FhirbridgeService  # noqa: E402

MRN_SYSTEM = "urn:oid:2.16.840.1.113883.3.7777"


def make_photo(target_bytes: int = 2_000_000) -> bytes:
    """A 4032×3024 baseline JPEG of about 2 MB (gradients plus blocky texture, like a photo)."""
    w, h = 4032, 3024
    grad = Image.merge("RGB", [Image.linear_gradient("L").resize((w, h)),
                               Image.linear_gradient("L").rotate(90).resize((w, h)),
                               Image.radial_gradient("L").resize((w, h))])
    noise = Image.merge("RGB", [Image.effect_noise((w // 6, h // 6), 60 + 10 * i)
                                .resize((w, h), Image.Resampling.NEAREST) for i in range(3)])
    im = Image.blend(grad, noise, 0.35)
    best = b""
    for q in (60, 70, 80, 85, 90, 95):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=q, subsampling=2)
        best = buf.getvalue()
        if len(best) >= target_bytes:
            break
    return best


def unique(photo: bytes, n: int) -> bytes:
    note = f"bench-{n}".encode()
    return photo[:2] + b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note + photo[2:]


def media(photo: bytes, patient_id: str) -> bytes:
    subject = ({"identifier": {"system": MRN_SYSTEM, "value": "BENCH1"}} if patient_id == ""
               else {"reference": f"Patient/{patient_id}"})
    return json.dumps({
        "resourceType": "Media", "status": "completed",
        "subject": subject,
        "createdDateTime": "2026-11-20T09:15:00+01:00",
        "content": {"contentType": "image/jpeg", "data": base64.b64encode(photo).decode(),
                    "size": len(photo),
                    "hash": base64.b64encode(hashlib.sha1(photo).digest()).decode()},
    }).encode()


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a live process has used, from /proc/{pid}/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a live process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _machine_cpu() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return sum(ticks) - idle, sum(ticks)


def cpu_snapshot(roles: dict[str, list[int]]) -> dict[str, tuple[float, float]]:
    snap = {}
    for role, pids in roles.items():
        user = sys_ = 0.0
        for pid in pids:
            try:
                u, s = _cpu_seconds(pid)
            except OSError:
                continue
            user, sys_ = user + u, sys_ + s
        snap[role] = (user, sys_)
    return snap


def register_by_adt(svc: FhirbridgeService) -> None:
    """The bench patient through the ADT feed (no EHR): one A04 over MLLP, AA expected."""
    import socket

    msg = ("MSH|^~\\&|ADT|HOSP|FHIRBRIDGE|HOSP|20261120090000||ADT^A04^ADT_A01|BENCH-A04|P|2.5\r"
           "EVN|A04|20261120090000\r"
           "PID|1||BENCH1^^^HOSP^MR||Bench^Mark||19700101|F\r")
    with socket.create_connection(("127.0.0.1", svc.mllp_port), timeout=10) as sock:
        sock.sendall(b"\x0b" + msg.encode() + b"\x1c\r")
        ack = sock.recv(4096)
    assert b"MSA|AA" in ack, ack


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2, help="worker threads per process")
    ap.add_argument("--worker-processes", type=int, default=0,
                    help="more `fhirbridge worker` processes on the same database (besides "
                    "the ones `serve` starts: pipeline.worker_processes = 2)")
    ap.add_argument("--worker-threads", type=int, default=0,
                    help="threads in each --worker-processes process (default: --workers)")
    ap.add_argument("--py-spy", default="", help="record the service (GIL holders) with "
                    "py-spy during phase 1 into this collapsed-stack file (pip install py-spy)")
    ap.add_argument("--ehr", choices=["fhir", "none"], default="fhir",
                    help="fhir: the test FHIR server is the EHR (its conditional update slows "
                    "down as ImagingStudies accumulate); none: the patient comes from an ADT "
                    "A04 and no ImagingStudy is written to an EHR (fhirbridge's own rate)")
    ap.add_argument("--create-dicom-n", type=int, default=40)
    args = ap.parse_args()
    require_tools()
    photo = make_photo()
    print(f"photo: 4032x3024 baseline JPEG, {len(photo) / 1e6:.2f} MB; N={args.n}")
    with tempfile.TemporaryDirectory() as tmp:
        orthanc = OrthancServer(Path(tmp) / "orthanc")
        fhir = FhirServer(Path(tmp) / "fhir")
        svc = None
        try:
            r = httpx.post(f"{fhir.base_url}/Patient", json={
                "resourceType": "Patient", "identifier": [{"system": MRN_SYSTEM,
                                                           "value": "BENCH1"}],
                "name": [{"family": "Bench", "given": ["Mark"]}], "birthDate": "1970-01-01",
                "gender": "female"}, headers={"Content-Type": "application/fhir+json"})
            patient_id = r.json()["id"]
            svc = FhirbridgeService(Path(tmp) / "fb", pacs_url=orthanc.dicom_url,
                                    ehr_url=fhir.base_url if args.ehr == "fhir" else "",
                                    workers=args.workers).start()
            if args.ehr == "none":
                register_by_adt(svc)
                patient_id = ""
            extra = [subprocess.Popen([str(ROOT / ".venv/bin/fhirbridge"), "worker", "--config",
                                       str(svc.config)], cwd=svc.workdir,
                                      env={**os.environ, "FHIRBRIDGE_PIPELINE__WORKERS":
                                           str(args.worker_threads or args.workers)},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for _ in range(args.worker_processes)]
            bodies = [media(unique(photo, i), patient_id) for i in range(args.n)]

            # 1. fhirbridge: first POST to last Task completed
            spy = None
            if args.py_spy:
                spy = subprocess.Popen([str(ROOT / ".venv/bin/py-spy"), "record", "--pid",
                                        str(svc.proc.pid), "--rate", "250", "--format", "raw",
                                        "--gil", "-o", args.py_spy, "--nonblocking"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
            client = httpx.Client(base_url=svc.base, timeout=60)
            roles = {"serve (HTTP, MLLP)": [svc.proc.pid],
                     "worker processes": svc.worker_pids() + [p.pid for p in extra],
                     "Orthanc": [orthanc.pid], "bench client": [os.getpid()]}
            cpu0 = cpu_snapshot(roles)
            machine0 = _machine_cpu()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                codes = list(pool.map(lambda b: client.post(
                    "/fhir/Media", content=b,
                    headers={"Content-Type": "application/fhir+json"}).status_code, bodies))
            t_posted = time.perf_counter() - t0
            assert codes.count(201) == args.n, codes
            while True:
                done = client.get("/fhir/Task", params={"status": "completed,failed,on-hold",
                                                        "_count": 0}).json()["total"]
                if done >= args.n:
                    break
                time.sleep(0.1)
            t_fb = time.perf_counter() - t0
            cpu1 = cpu_snapshot(roles)
            machine1 = _machine_cpu()
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
            failed = client.get("/fhir/Task", params={"status": "failed,on-hold"}).json()["total"]
            rate_fb = args.n / t_fb
            print(f"fhirbridge  : {rate_fb:6.1f} images/s  ({args.n} in {t_fb:.1f} s; all POSTs "
                  f"answered 201 after {t_posted:.1f} s; failed/held {failed})")
            print("  CPU in that time (user + system s, ms per image):")
            for role in roles:
                u = cpu1[role][0] - cpu0[role][0]
                s_ = cpu1[role][1] - cpu0[role][1]
                print(f"    {role:32s} {u:5.1f} + {s_:4.1f} s  {(u + s_) / args.n * 1000:5.1f} ms")
            for role in ("serve (HTTP, MLLP)", "worker processes"):
                peaks = [_peak_rss_mb(pid) for pid in roles[role]]
                print(f"    {role:32s} peak RSS " + ", ".join(f"{p:.0f}" for p in peaks) + " MB")
            busy, total = (b - a for a, b in zip(machine0, machine1))
            print(f"    whole machine: {busy / total * 100:.0f} % of {os.cpu_count()} CPUs busy "
                  f"({busy / os.sysconf('SC_CLK_TCK') / args.n * 1000:.1f} ms per image)")

            # 2. storescu -xy of the objects fhirbridge built (the pipe's limit)
            # fhirbridge keeps no copy once the PACS holds an object ([retention] keep_files):
            # the same objects, as Orthanc stored them
            objects = Path(tmp) / "objects"
            objects.mkdir()
            for n, iid in enumerate(orthanc.instances()):
                (objects / f"{n}.dcm").write_bytes(orthanc.instance_file(iid))
            files = sorted(str(p) for p in objects.glob("*.dcm"))
            orthanc.reset()
            t0 = time.perf_counter()
            subprocess.run(["storescu", "-xy", "-aet", "FHIRBRIDGE", "-aec", orthanc.aet,
                            "127.0.0.1", str(orthanc.dicom_port), *files], check=True)
            t_scu = time.perf_counter() - t0
            rate_scu = len(files) / t_scu
            print(f"storescu -xy: {rate_scu:6.1f} images/s  ({len(files)} in {t_scu:.1f} s)")

            # 3. Orthanc's /tools/create-dicom with the same JPEG
            orthanc.reset()
            content = "data:image/jpeg;base64," + base64.b64encode(photo).decode()
            http = httpx.Client(base_url=orthanc.http_url, timeout=120)
            t0 = time.perf_counter()
            for i in range(args.create_dicom_n):
                http.post("/tools/create-dicom", json={
                    "Tags": {"PatientID": "BENCH1", "PatientName": "Bench^Mark",
                             "Modality": "XC", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.77.1.4"},
                    "Content": content}).raise_for_status()
            t_cd = time.perf_counter() - t0
            rate_cd = args.create_dicom_n / t_cd
            print(f"create-dicom: {rate_cd:6.1f} images/s  ({args.create_dicom_n} in {t_cd:.1f} s)")
            print(f"ratios: fhirbridge/storescu = {rate_fb / rate_scu:.2f} (target >= 0.33); "
                  f"fhirbridge/create-dicom = {rate_fb / rate_cd:.1f} (target >= 10)")
        finally:
            for proc in locals().get("extra", []):
                proc.terminate()
                proc.wait()
            if svc is not None:
                svc.stop()
            orthanc.stop()
            fhir.stop()


if __name__ == "__main__":
    main()
