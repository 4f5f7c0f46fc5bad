"""Build rate per format, offline (prepare + build + write a Part 10 file), with DCMTK's
`img2dcm -vlp` on the same JPEG in the same run.

    .venv/bin/python bench/formats.py [--repeat 5] [--video-mb 100]

Inputs are made here: a 12 MP (4032x3024) photo-like image as baseline JPEG, the same JPEG
with EXIF orientation 6 (must be re-encoded), 12 MP HEIC and PNG, a ~5 MB PDF, an H.264 MP4
of about --video-mb MB. Prints ms per object and MB/s of input.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from fhirbridge.dicom.build import build_object, prepare_media  # noqa: E402
from fhirbridge.dicom.context import PatientDemographics, StudyContext  # noqa: E402
from fhirbridge.dicom.io import write_dataset  # noqa: E402
from fhirbridge.dicom.uids import uid_from  # noqa: E402
from fhirbridge.media.kinds import MediaLimits  # noqa: E402


def photo_image(w: int = 4032, h: int = 3024) -> Image.Image:
    """Photo-like content (gradients + noise) so codecs work as hard as on real photos."""
    base = Image.linear_gradient("L").resize((w, h))
    noise = Image.effect_noise((w, h), 40)
    return Image.merge("RGB", (base, noise, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))


def inputs(tmp: Path, video_mb: int) -> dict[str, tuple[Path, str]]:
    im = photo_image()
    out: dict[str, tuple[Path, str]] = {}
    p = tmp / "photo.jpg"
    im.save(p, "JPEG", quality=92)
    out["JPEG pass-through"] = (p, "image/jpeg")
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp / "rotated.jpg"
    im.save(p, "JPEG", quality=92, exif=exif)
    out["rotated JPEG"] = (p, "image/jpeg")
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
        p = tmp / "photo.heic"
        im.save(p, "HEIF", quality=80)
        out["12 MP HEIC"] = (p, "image/heic")
    except Exception as exc:  # noqa: BLE001
        print(f"(HEIC input not made: {exc})")
    p = tmp / "photo.png"
    im.save(p, "PNG", compress_level=6)
    out["12 MP PNG"] = (p, "image/png")
    out["5 MB PDF"] = (make_pdf(tmp / "doc.pdf", 5 * 1024 * 1024), "application/pdf")
    out[f"{video_mb} MB MP4"] = (make_mp4(tmp / "clip.mp4", video_mb), "video/mp4")
    return out


def make_pdf(path: Path, size: int) -> Path:
    """A PDF of about `size` bytes: pages carrying an incompressible image stream."""
    import os

    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, NameObject

    w = PdfWriter()
    while True:
        page = w.add_blank_page(width=595, height=842)
        blob = DecodedStreamObject()
        blob.set_data(os.urandom(512 * 1024))
        page[NameObject("/PieceInfo")] = w._add_object(blob)
        buf = io.BytesIO()
        w.write(buf)
        if buf.tell() >= size:
            path.write_bytes(buf.getvalue())
            return path


def make_mp4(path: Path, mb: int) -> Path:
    """H.264 High/L4.1 1280x720 25 fps, high bit rate, until about `mb` MB."""
    import av

    with av.open(str(path), "w", format="mp4") as out:
        s = out.add_stream("libx264", rate=25, options={"profile": "high", "level": "4.1",
                                                       "preset": "ultrafast", "crf": "1"})
        s.width, s.height, s.pix_fmt = 1280, 720, "yuv420p"
        frame_img = photo_image(1280, 720)
        target = mb * 1024 * 1024
        for i in range(25 * 600):  # at most 10 minutes of video
            for packet in s.encode(av.VideoFrame.from_image(frame_img.rotate(i % 360))):
                out.mux(packet)
            if i % 25 == 24 and path.stat().st_size >= target:
                break
        for packet in s.encode():
            out.mux(packet)
    return path


def build_once(path: Path, ctype: str, out: Path) -> float:
    patient = PatientDemographics(patient_id="BENCH1", issuer_of_patient_id="HOSP",
                                  family="Bench", given=("Mark",))
    t0 = time.perf_counter()
    source = path if ctype.startswith("video/") else path.read_bytes()
    media = prepare_media(source, ctype, MediaLimits(max_video_bytes=4 << 30,
                                                     max_video_seconds=3600))
    key = path.name
    ctx = StudyContext(study_instance_uid=uid_from("study", key),
                       series_instance_uid=uid_from("series", key),
                       sop_instance_uid=uid_from("sop", key),
                       content_datetime=datetime(2026, 11, 29, tzinfo=timezone.utc),
                       document_title="Bench document")
    ds = build_object(media, patient, ctx)
    out.write_bytes(write_dataset(ds))
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--video-mb", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files = inputs(tmp, args.video_mb)
        print(f"{'input':22} {'size':>9} {'ms/object':>10} {'MB/s':>8}")
        for label, (path, ctype) in files.items():
            times = [build_once(path, ctype, tmp / "out.dcm")
                     for _ in range(max(1, args.repeat if "MP4" not in label else 2))]
            best = min(times)
            mb = path.stat().st_size / 1e6
            print(f"{label:22} {mb:7.1f}MB {best * 1000:10.1f} {mb / best:8.1f}")
        if shutil.which("img2dcm"):
            jpeg = files["JPEG pass-through"][0]
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                subprocess.run(["img2dcm", "-vlp", "-q", str(jpeg), str(tmp / "img2dcm.dcm")],
                               check=True)
                times.append(time.perf_counter() - t0)
            best = min(times)
            print(f"{'img2dcm -vlp (JPEG)':22} {jpeg.stat().st_size / 1e6:7.1f}MB "
                  f"{best * 1000:10.1f} {jpeg.stat().st_size / 1e6 / best:8.1f}")
        else:
            print("img2dcm not found (apt install dcmtk)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
