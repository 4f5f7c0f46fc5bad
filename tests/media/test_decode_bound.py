"""Decode memory bounded by bytes (media.max_decoded_bytes), from the header, before decoding."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from fhirbridge.media.errors import MediaError
from fhirbridge.media.photo import check_photo, prepare_photo
from tests.integration.test_hostile_input import big_png

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("color_type,bands", [(0, 1), (2, 3), (4, 2), (6, 4)])
def test_refused_from_the_header_before_decoding(color_type, bands):
    png = big_png(9000, 9900, color_type, 16)
    limit = 9000 * 9900 * bands * 2 - 1  # one byte short of the 16-bit samples
    for fn in (check_photo, prepare_photo):
        started = time.monotonic()
        with pytest.raises(MediaError) as info:
            fn(png, "image/png", max_decoded_bytes=limit)
        assert info.value.code == "too-many-pixels"
        assert "media.max_decoded_bytes" in info.value.text
        assert time.monotonic() - started < 0.5  # nothing was inflated
    check_photo(png, "image/png", max_decoded_bytes=limit + 1)


def test_16_bit_grey_png_prepared_within_a_bounded_peak():
    """The issue's case: a ~700 KB 16-bit greyscale 9000x9900 PNG took a worker to ~1 GB
    (32-bit copies while scaling to 8 bits); its samples are 178 MB."""
    code = (
        "import resource, sys\n"
        "from tests.integration.test_hostile_input import big_png\n"
        "from fhirbridge.media.photo import prepare_photo\n"
        "png = big_png(9000, 9900, 0, 16)\n"
        "p = prepare_photo(png, 'image/png', uniform_stddev=0)\n"
        "assert (p.rows, p.columns, p.samples_per_pixel) == (9900, 9000, 1)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    peak_mib = int(r.stdout.split()[-1])
    assert peak_mib < 450, f"peak {peak_mib} MiB"
