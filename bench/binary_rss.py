"""Benchmark: memory of `fhirbridge serve` while a 1 GB raw body streams in at `POST
/fhir/Binary` (FHIR R4 http.html#binary) and back out at `GET /fhir/Binary/{id}`.

Starts the service as the README does (`fhirbridge serve --config FILE`, temporary data dir),
writes an MP4-looking file (an ISO BMFF `ftyp` box, major brand isom, then one `mdat` box of
zeros), uploads it with a streaming httpx client and samples the server's RSS (/proc, 20 Hz)
and its high-water mark (VmHWM). Target: peak RSS under 200 MB.

    .venv/bin/python bench/binary_rss.py [--mb 1024] [--chunked] [--no-get]

This prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from tests.support.service import FhirbridgeService  # noqa: E402

MIB = 1024 * 1024


def write_mp4_like(path: Path, size: int) -> str:
    """ftyp (isom, compatible isom/iso2/avc1/mp41) + one mdat box of zeros; returns sha256."""
    ftyp = b"ftypisom" + (0x200).to_bytes(4, "big") + b"isomiso2avc1mp41"
    ftyp = (len(ftyp) + 4).to_bytes(4, "big") + ftyp
    mdat_size = size - len(ftyp)
    head = ftyp + mdat_size.to_bytes(4, "big") + b"mdat"
    digest = hashlib.sha256(head)
    zeros = bytes(MIB)
    with open(path, "wb") as fh:
        fh.write(head)
        left = size - len(head)
        while left:
            block = zeros[:min(left, MIB)]
            fh.write(block)
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in kB from /proc/<pid>/status (psutil is not a dependency)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_kb = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.peak_kb = max(self.peak_kb, proc_status(self.pid).get("VmRSS", 0))
            time.sleep(self.every)

    def stop(self) -> int:
        self.stop_event.set()
        self.join()
        return self.peak_kb


def file_chunks(path: Path, size: int = 256 * 1024) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while block := fh.read(size):
            yield block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=1024, help="body size in MiB (default 1024)")
    ap.add_argument("--chunked", action="store_true",
                    help="send with Transfer-Encoding: chunked instead of Content-Length")
    ap.add_argument("--no-get", action="store_true", help="skip reading the Binary back")
    args = ap.parse_args()
    size = args.mb * MIB

    with tempfile.TemporaryDirectory(prefix="fb-binary-rss-") as tmp:
        src = Path(tmp) / "upload.mp4"
        t0 = time.monotonic()
        digest = write_mp4_like(src, size)
        print(f"generated {src.name}: {size / MIB:.0f} MiB in {time.monotonic() - t0:.1f} s")

        svc = FhirbridgeService(Path(tmp) / "service", workers=1,
                                env={"FHIRBRIDGE_MEDIA__MAX_BINARY_BYTES": str(4 * 1024 * MIB)})
        svc.start()
        assert svc.proc is not None
        pid = svc.proc.pid
        try:
            svc.client.get("/fhir/metadata")  # warm up imports on the request path
            base_kb = proc_status(pid)["VmRSS"]
            print(f"server pid {pid}: RSS before upload {base_kb / 1024:.1f} MB")

            sampler = RssSampler(pid)
            sampler.start()
            body = file_chunks(src) if args.chunked else open(src, "rb")  # noqa: SIM115
            t0 = time.monotonic()
            with httpx.Client(base_url=svc.base, timeout=600) as client:
                r = client.post("/fhir/Binary", content=body,
                                headers={"Content-Type": "video/mp4"})
            elapsed = time.monotonic() - t0
            if not args.chunked:
                body.close()  # type: ignore[union-attr]
            peak_kb = sampler.stop()
            hwm_kb = proc_status(pid)["VmHWM"]
            assert r.status_code == 201, (r.status_code, r.text[:500])
            blob = svc.data_dir / "blobs" / digest[:2] / digest
            assert blob.is_file() and blob.stat().st_size == size, "stored bytes differ"
            mode = "chunked" if args.chunked else "Content-Length"
            print(f"POST /fhir/Binary ({mode}) {size / MIB:.0f} MiB: {r.status_code} in "
                  f"{elapsed:.1f} s = {size / MIB / elapsed:.0f} MiB/s; "
                  f"sha256 verified on disk")
            print(f"  server peak RSS during upload (sampled): {peak_kb / 1024:.1f} MB; "
                  f"VmHWM (process lifetime): {hwm_kb / 1024:.1f} MB")

            if not args.no_get:
                sampler = RssSampler(pid)
                sampler.start()
                h = hashlib.sha256()
                got = 0
                t0 = time.monotonic()
                with httpx.Client(base_url=svc.base, timeout=600) as client:
                    with client.stream("GET", r.headers["location"].removeprefix(svc.base)) \
                            as resp:
                        for chunk in resp.iter_bytes():
                            h.update(chunk)
                            got += len(chunk)
                elapsed = time.monotonic() - t0
                peak_kb = sampler.stop()
                hwm_kb = proc_status(pid)["VmHWM"]
                assert got == size and h.hexdigest() == digest, "read back differs"
                print(f"GET /fhir/Binary/{{id}} {size / MIB:.0f} MiB: {elapsed:.1f} s = "
                      f"{size / MIB / elapsed:.0f} MiB/s, identical; server peak RSS "
                      f"{peak_kb / 1024:.1f} MB, VmHWM {hwm_kb / 1024:.1f} MB")
            verdict = "OK" if hwm_kb < 200 * 1024 else "OVER"
            print(f"target < 200 MB peak RSS: {verdict} (VmHWM {hwm_kb / 1024:.1f} MB)")
        finally:
            svc.stop()


if __name__ == "__main__":
    main()
