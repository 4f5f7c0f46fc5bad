"""The C-STORE transport (adapters.pacs.DimsePacs) against a real Orthanc."""

from __future__ import annotations

import threading
import time

from fhirbridge.adapters.pacs import DimsePacs
from fhirbridge.dicom.photo import build_vl_photographic
from fhirbridge.media.photo import prepare_photo
from tests.dicom.test_photo import context, patient
from tests.media.test_photo_formats import jpeg, pattern
from tests.support.servers import OrthancServer


def _photo(n: int):  # type: ignore[no-untyped-def]
    return build_vl_photographic(prepare_photo(jpeg(pattern((64 + n, 48))), "image/jpeg"),
                                 patient(), context(key=f"idle-release-{n}-{time.time()}"))


def _polling_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name != "MainThread" and t.is_alive()
               and type(t).__module__.startswith("pynetdicom"))


def test_an_idle_association_is_released_and_reopened_for_the_next_store(
        orthanc: OrthancServer) -> None:
    before = _polling_threads()
    pacs = DimsePacs(orthanc.dicom_url, ae_title="FHIRBRIDGE", idle_release_seconds=0.5)
    first, second = _photo(1), _photo(2)
    pacs.store([first])
    assert _polling_threads() > before  # the association's reactor threads run
    deadline = time.monotonic() + 10
    while _polling_threads() > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _polling_threads() == before, "the idle association was not released"
    pacs.store([second])  # a new association
    found = {uid for uid in (str(first.SOPInstanceUID), str(second.SOPInstanceUID))
             if orthanc.find_instances(uid)}
    assert found == {str(first.SOPInstanceUID), str(second.SOPInstanceUID)}
    pacs.close()
