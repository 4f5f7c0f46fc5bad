"""`serve` runs the pipeline in `pipeline.worker_processes` child processes: one that dies
is started again, and its work is not lost."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

from tests.integration.test_identity_feed import adt, send, wait_for
from tests.integration.test_photo_end_to_end import (
    MRN_SYSTEM,
    sample_media,
    unique_photo,
    with_photo,
)
from tests.support.service import FhirbridgeService


def test_a_killed_worker_process_is_replaced_and_work_goes_on(tmp_path):
    svc = FhirbridgeService(tmp_path / "fb").start()  # folder PACS, no EHR
    try:
        wait_for(lambda: len(svc.worker_pids()) == 2, 20, "two worker processes")
        before = svc.worker_pids()
        for pid in before:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: len(set(svc.worker_pids()) - set(before)) == 2, 20,
                 "two new worker processes")

        mrn = f"WP{uuid.uuid4().hex[:8]}"
        assert "MSA|AA" in send(svc, tmp_path, adt("A04", f"PID|1||{mrn}^^^HOSP^MR||Müller^José"
                                                         "||19840307|M"))
        media = with_photo(sample_media(), unique_photo())
        media["subject"] = {"identifier": {"system": MRN_SYSTEM, "value": mrn}}
        r = svc.post_media(media)
        assert r.status_code == 201
        task = svc.wait_task(f"Media/{r.json()['id']}")
        assert task["status"] == "completed", task
        assert list((svc.data_dir / "dicom").rglob("*.dcm"))
        after = svc.worker_pids()
    finally:
        svc.stop()
    deadline = time.monotonic() + 10  # stopping serve stops its workers
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in after):
        time.sleep(0.1)
    assert not any(Path(f"/proc/{p}").exists() for p in after)
