"""Names every part of the data layer shares: the error type, the datalist type and the constants."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

BR35H_FOLDERS: tuple[str, str] = ("no", "yes")  # Br35H's class folders (and the committed split's "classes")
BR35H_CLASSES: tuple[str, str] = ("no_tumour", "tumour")  # their class names, in label order
SPLIT_NAMES: tuple[str, str, str] = ("train", "validation", "test")
IMAGE_SUFFIXES: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".nii",
    ".nii.gz",
    ".dcm",
)

Datalist = list[dict[str, Any]]


class DataError(ValueError):
    """A datalist or a sample is unusable. ``problems`` holds one dict per bad sample (may be empty)."""

    def __init__(self, message: str, problems: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


def check_fractions(where: str, val_fraction: float, test_fraction: float) -> None:
    """Validation and test shares of a split: each in [0, 1), together leaving training data."""
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{where}: {name}={frac} must lie in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"{where}: val_fraction + test_fraction = {val_fraction + test_fraction} leaves no training data; "
            "keep the sum below 1"
        )
