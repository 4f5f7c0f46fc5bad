"""`fhirbridge dicomize`: one DICOM object from a file, offline, with the service's own code."""

from __future__ import annotations

import argparse
import hashlib
import sys
from datetime import datetime, timezone
from pathlib import Path

from fhirbridge.dicom.context import CodedConcept, PatientDemographics, StudyContext
from fhirbridge.dicom.io import write_dataset
from fhirbridge.dicom.photo import build_vl_photographic
from fhirbridge.dicom.uids import uid_from
from fhirbridge.media.errors import MediaError
from fhirbridge.media.photo import prepare_photo
from fhirbridge.media.sniff import sniff_content_type


def dicomize(args: argparse.Namespace) -> int:
    src = Path(args.input)
    try:
        data = src.read_bytes()
    except OSError as exc:
        print(f"fhirbridge dicomize: cannot read input: {exc.strerror}", file=sys.stderr)
        return 2
    content_type = args.content_type or sniff_content_type(data) or ""
    family, _, given = args.patient_name.partition("^")
    patient = PatientDemographics(
        patient_id=args.patient_id,
        issuer_of_patient_id=args.issuer,
        family=family,
        given=tuple(g for g in given.split("^") if g)[:1] + tuple(
            g for g in given.split("^")[1:2] if g),
        birth_date=args.birth_date,
        sex=args.sex,
    )
    key = hashlib.sha256(data + args.patient_id.encode() + args.issuer.encode()).hexdigest()
    mtime = datetime.fromtimestamp(src.stat().st_mtime, timezone.utc)
    try:
        photo = prepare_photo(data, content_type)
    except MediaError as exc:
        print(f"fhirbridge dicomize: {exc.code}: {exc.text}", file=sys.stderr)
        return 1
    created = photo.exif.datetime_original if photo.exif and photo.exif.datetime_original \
        else mtime
    ctx = StudyContext(
        study_instance_uid=uid_from("study", key),
        series_instance_uid=uid_from("series", key),
        sop_instance_uid=uid_from("sop", key),
        content_datetime=created,
        anatomic_region=CodedConcept(args.body_site, "SCT", args.body_site)
        if args.body_site else None,
        laterality=args.laterality,
        study_description="Patient-generated photo",
        series_description="Photo",
    )
    ds = build_vl_photographic(photo, patient, ctx)
    Path(args.output).write_bytes(write_dataset(ds))
    print(f"{args.output}: {ds.SOPClassUID.name} {ds.SOPInstanceUID}")
    return 0
