"""One exception type per failure family; each carries what a person needs to act on it."""

from __future__ import annotations

from pathlib import Path


class BonefracError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero, never as a traceback."""


class ImageReadError(BonefracError):
    """A file could not be read as an image; `reason` says why in words a person understands."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class DatasetError(BonefracError):
    """A folder does not have a layout bonefrac understands (no class folders, one class only, ...)."""


class DataLeakageError(BonefracError):
    """Evaluation or training data share duplicate groups across splits."""


class WeightsNotFoundError(BonefracError):
    """Pretrained weights could not be found, read safely, or fitted to the model; the message names the fix."""
