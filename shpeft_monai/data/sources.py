"""Open a user's dataset, whatever its shape, as one checked train/validation/test split.

:func:`open_dataset` reads the committed Br35H split, a folder with one sub-folder per class, a CSV file
(a flat folder of images plus a table) or a MONAI datalist JSON. Class names come from the data (folder
names, string labels, a datalist's ``classes``); explicit ``class_names``/``num_classes`` must agree with
them. When the source gives no split, it is made here: stratified per class and grouped, so that copies
of one image never straddle two splits (:mod:`.splitting`, :mod:`.grouping`). Every split is then checked
for cross-split copies by file content (:func:`~shpeft_monai.data.check_splits`). The result,
:class:`DatasetSplits`, carries a SHA-256 of the datalist so that a run's report can name exactly which
data it saw.

Example:
    >>> from shpeft_monai.data import open_dataset  # doctest: +SKIP
    >>> ds = open_dataset("/data/tumours")  # doctest: +SKIP
    >>> ds.class_names, ds.num_classes, {k: len(v) for k, v in ds.splits.items()}  # doctest: +SKIP
    (('glioma', 'meningioma', 'none', 'pituitary'), 4, {'train': 700, 'validation': 150, 'test': 150})
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._classes import resolve_classes
from ._common import BR35H_CLASSES, IMAGE_SUFFIXES, SPLIT_NAMES, DataError, Datalist, check_fractions
from .datalists import (
    _SPLIT_ALIASES,
    _has_image_suffix,
    _parse_datalist,
    br35h_root,
    load_split,
    read_datalist_json,
)
from .grouping import DEFAULT_THRESHOLD, content_groups, near_duplicate_groups
from .splitting import check_splits, grouped_split

__all__ = ["GROUPINGS", "DatasetSplits", "open_dataset"]

logger = logging.getLogger(__name__)

GROUPINGS = ("content", "near_duplicate", "none")
_IMAGE_COLUMNS = ("image", "path", "file", "filename")


@dataclass(frozen=True)
class DatasetSplits:
    """A checked train/validation/test split with its class names and where it came from.

    Attributes:
        splits: ``{"train", "validation", "test"}`` -> ``[{"image": absolute path, "label": int, ...}]``.
        class_names: class names in label order.
        source: ``"br35h"`` or the absolute path the user gave.
        kind: ``"br35h"``, ``"folder"``, ``"csv"`` or ``"datalist"``.
        grouping: how the split was made: ``"committed"`` (given by the source), ``"content"``,
            ``"near_duplicate"`` or ``"none"``.

    Example:
        >>> ds = open_dataset("br35h")  # doctest: +SKIP
        >>> ds.identity()["sizes"]  # doctest: +SKIP
        {'train': 2098, 'validation': 450, 'test': 452}
    """

    splits: dict[str, list[dict]]
    class_names: tuple[str, ...]
    source: str
    kind: str
    grouping: str | None

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(class_names)``)."""
        return len(self.class_names)

    def root(self) -> Path:
        """Folder the datalist's paths are relative to in :attr:`sha256`."""
        if self.kind == "br35h":
            return br35h_root()
        path = Path(self.source)
        return path if self.kind == "folder" else path.parent

    @property
    def sha256(self) -> str:
        """SHA-256 of the canonical JSON ``{split: [[path relative to the root (or absolute), label]]}``."""
        root = self.root().absolute()

        def rel(image: str) -> str:
            try:
                return Path(image).relative_to(root).as_posix()
            except ValueError:
                return Path(image).as_posix()

        canon = {
            name: [[rel(str(s["image"])), int(s["label"])] for s in entries]
            for name, entries in self.splits.items()
        }
        text = json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def identity(self) -> dict[str, Any]:
        """JSON-able summary: source, kind, sha256, grouping, split sizes and class names."""
        return {
            "source": self.source,
            "kind": self.kind,
            "sha256": self.sha256,
            "grouping": self.grouping,
            "sizes": {name: len(entries) for name, entries in self.splits.items()},
            "class_names": list(self.class_names),
        }


def _read_folder(root: Path) -> list[dict[str, Any]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"{root}: no class sub-folders; expected <folder>/<class name>/<images>. For a flat folder of "
            "images, give a CSV file (columns image,label) or a datalist JSON instead of the folder"
        )
    entries: list[dict[str, Any]] = []
    for cls in classes:
        files = sorted(p for p in (root / cls).rglob("*") if p.is_file() and _has_image_suffix(p))
        if not files:
            raise DataError(
                f"{root}: class folder {cls!r} has no image files ({', '.join(IMAGE_SUFFIXES)}); "
                "add images or remove the folder"
            )
        entries += [{"image": str(p), "label": cls} for p in files]
    return entries


def _read_csv(path: Path) -> tuple[list[dict[str, Any]], list[str | None]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    columns = {c.strip().lower(): c for c in (rows[0].keys() if rows else []) if c}
    image_col = next((columns[c] for c in _IMAGE_COLUMNS if c in columns), None)
    label_col = columns.get("label")
    if image_col is None or label_col is None:
        raise DataError(
            f"{path}: needs an image column ({' / '.join(_IMAGE_COLUMNS)}) and a `label` column, found "
            f"{sorted(columns.values())}; write e.g. `image,label` then `scans/a.png,tumour`"
        )
    split_col = columns.get("split")
    raw = [str(r.get(label_col) or "").strip() for r in rows]
    entries, given = [], []
    for i, r in enumerate(rows):
        image = str(r.get(image_col) or "").strip()
        if not image or not raw[i]:
            raise DataError(f"{path}: row {i + 2} has an empty {'image' if not image else 'label'} cell")
        p = Path(image)
        entries.append(
            {
                "image": str(p if p.is_absolute() else path.parent.absolute() / p),
                "label": raw[i],  # digit strings become class indices in resolve_classes
            }
        )
        if split_col is not None:
            value = str(r.get(split_col) or "").strip().lower()
            if value not in _SPLIT_ALIASES:
                raise DataError(
                    f"{path}: row {i + 2} has split {value!r}; use one of {sorted(_SPLIT_ALIASES)}"
                )
            given.append(_SPLIT_ALIASES[value])
        else:
            given.append(None)
    return entries, given


def _make_split(
    entries: list[dict[str, Any]],
    class_names: Sequence[str],
    grouping: str,
    seed: int,
    val: float,
    test: float,
) -> dict[str, Datalist]:
    paths = [e["image"] for e in entries]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing and grouping != "none":
        raise DataError(
            f"{len(missing)} listed image(s) do not exist: {', '.join(missing[:10])}"
            + (" ..." if len(missing) > 10 else "")
            + "; fix the paths (relative paths resolve against the dataset's folder)"
        )
    if grouping == "none":
        groups = np.arange(len(entries))
    elif grouping == "content":
        groups, _ = content_groups(paths)
        labels_of: dict[int, set[int]] = {}
        for g, e in zip(groups.tolist(), entries, strict=True):
            labels_of.setdefault(g, set()).add(int(e["label"]))
        mixed = [g for g, labs in labels_of.items() if len(labs) > 1]
        if mixed:
            cases = [
                ", ".join(
                    f"{e['image']} ({class_names[int(e['label'])]})"
                    for e, h in zip(entries, groups)
                    if h == g
                )
                for g in mixed[:10]
            ]
            raise DataError(
                f"{len(mixed)} image(s) are stored as byte-identical files with different labels: "
                + "; ".join(cases)
                + "; keep one copy with the right label"
            )
    else:
        groups = near_duplicate_groups(paths, DEFAULT_THRESHOLD)
    return grouped_split(
        entries, groups, class_names, seed=seed, val_fraction=val, test_fraction=test, grouping=grouping
    )


def open_dataset(
    source: str | os.PathLike[str],
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    grouping: str = "content",
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> DatasetSplits:
    """Open ``source`` as a checked train/validation/test split.

    Args:
        source: ``"br35h"`` (the committed grouped split), a folder with one sub-folder per class, a CSV
            file (columns ``image``/``path``/``file``/``filename`` and ``label``, optional ``split``; paths
            relative to the CSV's folder) or a MONAI datalist JSON (``training``/``validation``/``test``
            lists of ``{"image", "label"}``, optional ``classes``). Labels are class indices or names.
        seed: seed of the split when the source gives none.
        val_fraction: share of every class for validation when the split is made here.
        test_fraction: share of every class for test when the split is made here.
        grouping: when the split is made here, what stays together: ``"content"`` (byte-identical files),
            ``"near_duplicate"`` (flip/rotation-aware perceptual hash, as for Br35H) or ``"none"``.
        class_names: expected class names; must agree with the data (string labels take their indices
            from this order; for integer labels these name the classes).
        num_classes: expected class count; must equal the data's.

    Raises:
        DataError: unreadable source, labels that disagree with ``class_names``/``num_classes``, a class
            too small for the split, or a file whose content appears in two splits.
        FileNotFoundError: ``source`` does not exist.
    """
    if grouping not in GROUPINGS:
        raise ValueError(f"open_dataset: grouping={grouping!r}; use one of {list(GROUPINGS)}")
    check_fractions("open_dataset", val_fraction, test_fraction)
    declared: Sequence[str] | None = None
    given: dict[str, Datalist] | None = None
    if str(source).lower() == "br35h":
        kind, where = "br35h", "br35h"
        given, declared = load_split("br35h"), BR35H_CLASSES
    else:
        path = Path(source).absolute()
        where = str(path)
        if path.is_dir():
            kind, entries, split_of = "folder", _read_folder(path), None
        elif not path.is_file():
            raise FileNotFoundError(
                f"open_dataset: {str(source)!r} is neither 'br35h', a class folder, a CSV nor a datalist JSON"
            )
        elif path.suffix.lower() in (".csv", ".tsv"):
            kind, (entries, split_of) = "csv", _read_csv(path)
            if all(s is not None for s in split_of) and entries:
                given = {name: [] for name in SPLIT_NAMES}
                for e, s in zip(entries, split_of, strict=True):
                    given[s].append(e)
        else:
            kind = "datalist"
            data = read_datalist_json(path)
            if isinstance(data, dict) and isinstance(data.get("classes"), list):
                declared = [str(c) for c in data["classes"]]
            given = _parse_datalist(data, path.parent, str(path))
        if given is not None and not given["validation"] and not given["test"]:
            entries, given = given["train"], None  # only training data: the split is made here
    flat = (
        [(name, e) for name, lst in given.items() for e in lst]
        if given is not None
        else [("", e) for e in entries]
    )
    missing_label = [e["image"] for _, e in flat if "label" not in e]
    if missing_label:
        raise DataError(f"{where}: {len(missing_label)} sample(s) have no label, e.g. {missing_label[0]}")
    names, ints = resolve_classes(
        [e["label"] for _, e in flat],
        where,
        declared=declared,
        class_names=class_names,
        num_classes=num_classes,
    )
    samples = [(name, {**e, "label": ints[i]}) for i, (name, e) in enumerate(flat)]
    if given is not None:
        splits: dict[str, Datalist] = {name: [] for name in SPLIT_NAMES}
        for name, e in samples:
            splits[name].append(e)
        how = "committed"
        for name in SPLIT_NAMES:
            if not splits[name]:
                logger.warning(
                    "open_dataset %s: the source's split has no %r images; metrics on %s will be missing. "
                    "Give %s images, or only training images to let open_dataset split them",
                    where,
                    name,
                    name,
                    name,
                )
    else:
        splits = _make_split([e for _, e in samples], names, grouping, seed, val_fraction, test_fraction)
        how = grouping
    check_splits(splits, names)
    result = DatasetSplits(splits=splits, class_names=names, source=where, kind=kind, grouping=how)
    logger.info(
        "open_dataset %s (%s, split %s): classes %s, sizes %s",
        where,
        kind,
        how,
        list(names),
        {k: len(v) for k, v in splits.items()},
    )
    return result
