"""`fhirbridge dicomize`: one DICOM object from a file (photo, PDF or video), offline, with
the service's own code (fhirbridge.dicom.build)."""

from __future__ import annotations

import argparse
import hashlib
import sys
from datetime import datetime, timezone
from pathlib import Path

from fhirbridge.dicom.anatomy import anatomy_display
from fhirbridge.dicom.build import build_object, prepare_media
from fhirbridge.dicom.context import CodedConcept, PatientDemographics, StudyContext
from fhirbridge.dicom.io import write_dataset
from fhirbridge.dicom.uids import uid_from
from fhirbridge.media.errors import MediaError
from fhirbridge.media.kinds import (
    ACCEPTED_TYPES,
    PDF,
    SERIES_DESCRIPTION,
    SERIES_NUMBER,
    VIDEO,
    MediaLimits,
    kind_of,
)
from fhirbridge.media.sniff import sniff_content_type


def dicomize(args: argparse.Namespace) -> int:
    src = Path(args.input)
    try:
        with open(src, "rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        print(f"fhirbridge dicomize: cannot read input: {exc.strerror}", file=sys.stderr)
        return 2
    content_type = args.content_type or sniff_content_type(head) or ""
    kind = kind_of(content_type)
    if kind is None:
        print(f"fhirbridge dicomize: unsupported-type: {content_type or 'unknown format'}; "
              f"accepted: {', '.join(ACCEPTED_TYPES)}", file=sys.stderr)
        return 1
    family, _, given = args.patient_name.partition("^")
    given_parts = [g for g in given.split("^")[:2] if g]
    patient = PatientDemographics(
        patient_id=args.patient_id,
        issuer_of_patient_id=args.issuer,
        family=family,
        given=tuple(given_parts),
        birth_date=args.birth_date,
        sex=args.sex,
    )
    digest = hashlib.sha256()
    with open(src, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    key = hashlib.sha256(digest.digest() + args.patient_id.encode()
                         + args.issuer.encode()).hexdigest()
    mtime = datetime.fromtimestamp(src.stat().st_mtime, timezone.utc)
    try:
        media = prepare_media(src if kind == VIDEO else src.read_bytes(), content_type,
                              MediaLimits())
    except MediaError as exc:
        print(f"fhirbridge dicomize: {exc.code}: {exc.text}", file=sys.stderr)
        return 1
    ctx = StudyContext(
        study_instance_uid=uid_from("study", key),
        series_instance_uid=uid_from(f"series-{kind}", key),
        sop_instance_uid=uid_from("sop", key),
        content_datetime=media.captured or mtime,
        series_number=SERIES_NUMBER[kind],
        # CodeMeaning: the display the service writes for this code, not the code itself
        anatomic_region=CodedConcept(args.body_site, "SCT", anatomy_display(args.body_site))
        if args.body_site else None,
        laterality=args.laterality,
        study_description="Patient-generated media",
        series_description=SERIES_DESCRIPTION[kind],
        document_title="Patient document" if kind == PDF else "",
    )
    ds = build_object(media, patient, ctx)
    Path(args.output).write_bytes(write_dataset(ds))
    print(f"{args.output}: {ds.SOPClassUID.name} {ds.SOPInstanceUID}")
    return 0
