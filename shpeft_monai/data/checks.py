"""Preflight: decode every sample once before training and report every problem in one message,
instead of failing on the first bad file hours into a run.

Example:
    >>> from shpeft_monai.data import load_split, preflight  # doctest: +SKIP
    >>> good, problems = preflight(load_split()["train"], num_classes=2, skip_bad=True)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile
from tqdm import tqdm

from ._common import DataError, Datalist
from .images import _HIGH_DEPTH_MODES, _channel_error, _kind, _read_any

__all__ = ["preflight"]

logger = logging.getLogger(__name__)

_MAX_LISTED = 50
_PROBE_SIZE = 64


def _probe(path: Path, spatial_dims: int) -> str | None:
    """Decode ``path`` cheaply; return why it is unusable, or None."""
    try:
        if _kind(path) == "image":
            with Image.open(path) as im:
                im.verify()  # structure and checksums (PNG); does not decode pixels
            with Image.open(path) as im:
                im.draft(None, (_PROBE_SIZE, _PROBE_SIZE))
                im.load()  # decodes the whole stream (at reduced scale): truncation raises here
                channels = len(im.getbands())
                arr = np.asarray(im) if im.mode in _HIGH_DEPTH_MODES else None
        else:
            arr, _ = _read_any(path)
            channels = arr.shape[0]
    except DataError as exc:
        return str(exc).removeprefix(f"{path}: ")
    except Exception as exc:  # any decoder failure is a reason to report, not to crash the check
        return f"cannot decode ({type(exc).__name__}: {exc})"
    reason = _channel_error(channels, spatial_dims)
    if reason:
        return f"wrong channel count: {reason}"
    if arr is not None and np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        return f"contains {int((~np.isfinite(arr)).sum())} NaN/Inf values"
    return None


def _label_problem(sample: Mapping[str, Any], n_classes: int | None) -> str | None:
    if n_classes is None:
        return None
    if "label" not in sample:
        return "no 'label' key"
    label = sample["label"]
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        return f"label {label!r} ({type(label).__name__}) is not an integer class index"
    if not 0 <= int(label) < n_classes:
        return f"label {int(label)} is outside [0, {n_classes})"
    return None


def _class_count_hint(
    datalist: Sequence[Mapping[str, Any]], n_classes: int, class_names: Sequence[str] | None
) -> str:
    """Why labels beyond ``n_classes`` mean the class count is wrong, not that samples are bad."""
    labels = [
        int(s["label"])
        for s in datalist
        if isinstance(s, Mapping)
        and isinstance(s.get("label"), (int, np.integer))
        and not isinstance(s.get("label"), bool)
    ]
    names = f" ({', '.join(map(str, class_names))})" if class_names else ""
    span = f"up to {max(labels)}" if min(labels) >= 0 else f"from {min(labels)} up to {max(labels)}"
    return (
        f"this model has {n_classes} classes{names} but the datalist uses labels {span}; let the classes come from the data (leave num_classes unset) or fix the labels. "
        "Skipping these samples would train on only some of the classes"
    )


def preflight(
    datalist: Sequence[Mapping[str, Any]],
    num_classes: int | None,
    *,
    check_decode: bool = True,
    skip_bad: bool = False,
    spatial_dims: int = 2,
    class_names: Sequence[str] | None = None,
) -> tuple[Datalist, list[dict[str, Any]]]:
    """Check every sample of a datalist before training and report all problems at once.

    Detects a missing ``image`` key or path, empty files, files that do not decode (corrupt or truncated
    images, broken NIfTI/DICOM), NaN/Inf values, labels that are not ints in ``[0, num_classes)`` (skipped
    when ``num_classes`` is None) and unusable channel counts (more than 4 for 2D).

    Args:
        datalist: list of ``{"image": path, "label": int}``.
        num_classes: number of classes, or None for unlabelled (inference) lists.
        check_decode: decode every file (cheaply: JPEG draft mode, header + data for NIfTI/DICOM).
        skip_bad: drop bad samples with a warning each instead of raising.
        spatial_dims: 2 or 3, the model the data is for (channel rules differ).
        class_names: the model's class names in label order, named in the message about labels out of range.

    Returns:
        ``(good, problems)``: the usable samples (in order) and one ``{"image", "index", "reason"}`` per bad one.

    Raises:
        DataError: some sample is bad and ``skip_bad`` is False; the message lists every problem.

    Example:
        >>> good, problems = preflight(load_split()["train"], num_classes=2, skip_bad=True)  # doctest: +SKIP
    """
    if check_decode and ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: preflight cannot detect truncated images"
        )
    good: Datalist = []
    problems: list[dict[str, Any]] = []
    for i, sample in enumerate(
        tqdm(datalist, desc="preflight", unit="file", leave=False, disable=len(datalist) < 200)
    ):
        image = sample.get("image") if isinstance(sample, Mapping) else None
        reasons: list[str] = []
        if not isinstance(sample, Mapping):
            reasons.append(f"sample is a {type(sample).__name__}, not a dict with 'image' and 'label'")
        elif not isinstance(image, (str, os.PathLike)):
            reasons.append(f"'image' must be a file path, got {image!r}")
        else:
            path = Path(image)
            if not path.is_file():
                reasons.append("missing: no such file" if not path.exists() else "not a file")
            elif path.stat().st_size == 0:
                reasons.append("empty file (0 bytes)")
            elif check_decode and (why := _probe(path, spatial_dims)):
                reasons.append(why)
        if isinstance(sample, Mapping) and (why := _label_problem(sample, num_classes)):
            reasons.append(why)
        if reasons:
            problems.append({"image": str(image), "index": i, "reason": "; ".join(reasons)})
        else:
            good.append(dict(sample))
    out_of_range = [p for p in problems if "is outside [0, " in p["reason"]]
    hint = _class_count_hint(datalist, num_classes, class_names) if out_of_range and num_classes else ""
    if problems and not skip_bad:
        shown = [f"  [{p['index']}] {p['image']}: {p['reason']}" for p in problems[:_MAX_LISTED]]
        if len(problems) > _MAX_LISTED:
            shown.append(f"  ... and {len(problems) - _MAX_LISTED} more")
        advice = []
        if hint:
            advice.append(f"{len(out_of_range)} label(s) out of range: {hint}.")
        if len(out_of_range) < len(problems):
            advice.append(
                "Fix or remove these files/entries in the datalist, or pass skip_bad=True "
                "(bundle switch `skip_bad_samples: True`) to drop them with a warning."
            )
        raise DataError(
            f"preflight found {len(problems)} bad sample(s) out of {len(datalist)}:\n"
            + "\n".join(shown)
            + "\n"
            + "\n".join(advice),
            problems,
        )
    for p in problems:
        logger.warning("skipping sample %d %s: %s", p["index"], p["image"], p["reason"])
    if problems:
        logger.warning("preflight: skipped %d of %d samples", len(problems), len(datalist))
    if hint:
        logger.warning(
            "preflight: skipped %d sample(s) with labels out of range: %s", len(out_of_range), hint
        )
    return good, problems
