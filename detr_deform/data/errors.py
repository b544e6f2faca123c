"""The error every dataset problem is reported with."""
from __future__ import annotations

from detr_deform.errors import DetrDeformError


class DatasetError(DetrDeformError, ValueError):
    """A dataset file or annotation is unusable; the message names it. ``kind``
    tags the problem (e.g. "missing_file", "unreadable_image", "size_mismatch")."""

    def __init__(self, message: str, kind: str = "dataset") -> None:
        super().__init__(message)
        self.kind = kind
