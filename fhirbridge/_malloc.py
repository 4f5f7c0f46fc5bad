"""glibc malloc settings for a service that moves multi-megabyte buffers.

By default glibc serves every allocation above its (dynamic, at most 32 MiB) mmap threshold
with a fresh mmap and gives it back on free, so each 2–3 MB request body, base64 text, photo
and DICOM buffer is page-faulted in again (about 750 faults for 3 MB) and zeroed by the kernel.
Keeping such buffers in the heap, and trimming the heap only when 128 MiB sits free at its
top, cut the system CPU per photo by about a third (docs/decisions.md, "Photo pipeline
speed"). Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's own upper bound for the dynamic threshold
TRIM_THRESHOLD = 128 * 1024 * 1024


def tune_malloc() -> bool:
    """Apply the settings; True when glibc took them. Not applied when the operator set
    MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ (glibc's own tunables) themselves."""
    if platform.libc_ver()[0] != "glibc" or any(
            k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
            bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False
