"""A Video Photographic Image (PS3.3 A.32.4 family, SOP Class 1.2.840.10008.5.1.4.1.1.77.1.4.1)
from a prepared video, the EHR's patient and the submission's context.

Modules: Patient, General Study, General Series (Modality XC), General Equipment, SOP Common
with Contributing Equipment (modules.py, as for every fhirbridge object); General Image,
Cine, Multi-frame, Image Pixel, Acquisition Context (empty), VL Image.

Pixel Data (PS3.5 8.2.7 H.264 High/L4.1, 8.2.8 High/L4.2, 8.2.9 Stereo High, 8.2.10/8.2.11
HEVC Main/Main 10; Annex A.4 encapsulation):
- the MP4 from fhirbridge.media.video — "the container format for the video bit stream shall
  be MPEG-2 Transport Stream ... or MPEG-4, a.k.a. MP4 container" (8.2.7-8.2.11) — holding
  the upload's video track with its coded pictures unchanged, no audio, no metadata;
- encapsulated as an **empty Basic Offset Table** item (there is no per-frame fragment to
  point at: the container indexes the frames) followed by the **whole MP4 in one fragment**
  ("One fragment shall contain the whole MPEG-4 AVC/H.264 bit stream", 8.2.7-8.2.9; HEVC
  allows several, one is used), padded to even length with one 0x00 after the last box;
- the pixel description as 8.2.7-8.2.11 require: Samples per Pixel 3, Photometric
  Interpretation YBR_PARTIAL_420, Planar Configuration 0, Pixel Representation 0, Bits
  Allocated/Stored/High Bit 8/8/7 — or 16/10/9 for a 10-bit HEVC Main 10 stream (8.2.11),
  although dicom3tools (2022) holds the VL Image Module to 8 bits; no Pixel Aspect Ratio
  (square pixels); Rows/Columns the picture size after cropping, as FFmpeg reports it;
- Lossy Image Compression 01, method ISO_14496_10 (AVC) or ISO_23008_2 (HEVC);
- Cine: FrameTime (ms, from the average frame rate), CineRate, RecommendedDisplayFrameRate;
  Multi-frame: NumberOfFrames (the coded pictures in the track), FrameIncrementPointer →
  FrameTime. A variable-frame-rate phone clip gets its average rate (no Frame Time Vector).
"""

from __future__ import annotations

import struct
from datetime import datetime, timezone

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from fhirbridge.dicom.context import CodedConcept, PatientDemographics, StudyContext
from fhirbridge.dicom.modules import (
    _code_item,
    _ds,
    _dt_in,
    add_anatomy,
    add_camera_image,
    add_content_datetime,
    add_contributing_equipment,
    add_general_equipment,
    add_general_series,
    add_general_study,
    add_patient,
    add_sop_common,
    new_dataset,
    object_zone,
)
from fhirbridge.media.video import PreparedVideo

__all__ = ["VIDEO_PHOTOGRAPHIC_IMAGE_STORAGE", "build_video_photographic",
           "encapsulate_video"]

VIDEO_PHOTOGRAPHIC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.4.1"
UNSPECIFIED_ANATOMY = CodedConcept("123037004", "SCT", "Body structure")
_MAX_FRAGMENT = 0xFFFFFFFE  # 2^32 - 2: the largest even item length


def encapsulate_video(data: bytes) -> bytes:
    """PS3.5 A.4 for the MPEG-4 AVC / HEVC non-fragmentable transfer syntaxes: an empty Basic
    Offset Table item, then the whole video (its MP4 container) as one even-length fragment."""
    pad = b"\x00" if len(data) % 2 else b""
    length = len(data) + len(pad)
    if length > _MAX_FRAGMENT:
        raise ValueError("video too large for one fragment")
    return b"".join((b"\xfe\xff\x00\xe0\x00\x00\x00\x00",
                     b"\xfe\xff\x00\xe0" + struct.pack("<I", length), data, pad))


def build_video_photographic(video: PreparedVideo, patient: PatientDemographics,
                             ctx: StudyContext, *, now: datetime | None = None) -> Dataset:
    """The Video Photographic Image object (with file_meta; the transfer syntax chosen for
    the stream by fhirbridge.media.video).

    `now` (default: the current local time) is the instance creation time. Raises ValueError
    when an identifier does not fit its DICOM value representation or ImageLaterality is not
    one of L, R, B, U."""
    now = now or datetime.now(timezone.utc).astimezone()
    info = video.info
    if not video.transfer_syntax_uid:
        raise ValueError("the video has no DICOM transfer syntax")
    zone = object_zone(ctx)
    ds = new_dataset(VIDEO_PHOTOGRAPHIC_IMAGE_STORAGE, ctx, video.transfer_syntax_uid)

    ds.ImageType = ["ORIGINAL", "PRIMARY"]  # the coded pictures are not changed
    add_sop_common(ds, VIDEO_PHOTOGRAPHIC_IMAGE_STORAGE, ctx, now=now, zone=zone)
    add_general_study(ds, ctx, zone=zone)
    add_general_series(ds, ctx, "XC")
    add_patient(ds, patient)
    add_general_equipment(ds, ctx.manufacturer, ctx.manufacturer_model_name)

    # General Image / VL Image
    ds.InstanceNumber = ctx.instance_number
    ds.PatientOrientation = ""
    add_content_datetime(ds, ctx, zone=zone)
    if ctx.content_datetime is not None:
        ds.AcquisitionDateTime = _dt_in(ctx.content_datetime, zone)
    add_camera_image(ds, ctx)
    ds.LossyImageCompressionMethod = "ISO_14496_10" if info.codec == "h264" else "ISO_23008_2"
    add_anatomy(ds, ctx)
    if "AnatomicRegionSequence" not in ds:
        # Type 1C in the VL Image Module for this IOD (dciodvfy requires it for Video
        # Photographic, unlike VL Photographic). Without a body site from the submission we
        # say only "a body structure": SNOMED CT's root anatomy concept, true and unspecific.
        ds.AnatomicRegionSequence = Sequence([_code_item(UNSPECIFIED_ANATOMY)])

    # Cine (C.7.6.5) and Multi-frame (C.7.6.6)
    frame_time = info.frame_time_ms
    ds.FrameTime = _ds(frame_time)
    rate = float(info.frame_rate)
    ds.CineRate = max(1, int(round(rate)))
    ds.RecommendedDisplayFrameRate = max(1, int(round(rate)))
    if info.duration > 0:
        ds.ActualFrameDuration = max(1, int(round(frame_time)))
    ds.NumberOfFrames = video.frame_count
    ds.FrameIncrementPointer = Tag("FrameTime")

    # Image Pixel
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_PARTIAL_420"
    ds.PlanarConfiguration = 0
    ds.Rows = info.height
    ds.Columns = info.width
    if info.codec == "hevc" and info.bit_depth == 10:
        # PS3.5 8.2.11 (HEVC Main 10 / Level 5.1): 16/10/9. The VL Image Module in the
        # dicom3tools tables (2022) still allows 8 only; PS3.5 is followed.
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 10, 9
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelRepresentation = 0

    # Acquisition Context (Type 2 sequence, empty)
    ds.AcquisitionContextSequence = Sequence([])

    add_contributing_equipment(ds, ctx, now=now, zone=zone)

    ds.PixelData = encapsulate_video(video.mp4)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds
