"""The one error the media layer raises.

`code` is a short machine-readable token; `text` is a human-readable explanation that never
contains pixel data, metadata values or anything about the patient (it may be logged and
returned to the submitter).
"""

from __future__ import annotations

NOT_DECODABLE = "not-decodable"
TRUNCATED = "truncated"
TOO_MANY_PIXELS = "too-many-pixels"
TOO_SMALL = "too-small"
UNSUPPORTED_TYPE = "unsupported-type"
TYPE_MISMATCH = "type-mismatch"
UNIFORM = "uniform-image"  # blank or a single colour: nothing to see
TOO_LARGE = "too-large"  # bytes over the configured limit
TOO_LONG = "too-long"  # video duration over the configured limit
UNSUPPORTED_CODEC = "unsupported-codec"  # a container we take holding a codec we do not
DUPLICATE = "duplicate"  # the same content is already stored for this patient


class MediaError(Exception):
    """Media bytes that cannot be turned into a DICOM object."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text

    def __reduce__(self):  # picklable (job queues, multiprocessing)
        return (type(self), (self.code, self.text))
