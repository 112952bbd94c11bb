"""Stratified, grouped train/validation/test splits, and the check that a split does not leak.

* :func:`grouped_split` splits per class, whole groups at a time (copies of one image stay on one side),
  and refuses a class too small to reach every split instead of leaving validation or test without it.
* :func:`check_splits` hashes every file: byte-identical content in two splits is a leak (an error that
  lists every case); the same path or the same content twice inside one split is a warning.

Example:
    >>> from shpeft_monai.data import check_splits, load_split  # doctest: +SKIP
    >>> warnings = check_splits(load_split("br35h"), ["no_tumour", "tumour"])  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._common import SPLIT_NAMES, DataError, Datalist
from .grouping import _progress, content_sha256

__all__ = ["check_splits", "grouped_split"]

logger = logging.getLogger(__name__)

_MAX_LISTED = 50
_GROUP_WORDS = {"content": "content groups", "near_duplicate": "near-duplicate groups"}


def _name(label: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= label < len(class_names):
        return repr(str(class_names[label]))
    return f"with label {label}"


def _take(order: list[int], sizes: np.ndarray, target: float, keep: int) -> list[int]:
    """Groups (from ``order``) whose sizes sum closest to ``target``: at least one, leaving ``keep`` behind."""
    taken: list[int] = []
    total = 0
    for g in order:
        if len(order) - len(taken) <= keep:
            break
        if taken and abs(total + sizes[g] - target) >= abs(total - target):
            continue
        taken.append(g)
        total += int(sizes[g])
    return taken


def grouped_split(
    samples: Sequence[Mapping[str, Any]],
    groups: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    grouping: str = "content",
) -> dict[str, Datalist]:
    """Split ``samples`` per class into train/validation/test without splitting any group.

    A group belongs to the class of most of its members. In every class the groups are shuffled
    (``seed``) and taken in that order for test, then validation, each as close to its share of the
    class's files as whole groups allow; the rest is train. A split with a non-zero fraction gets at
    least one group of every class.

    Raises:
        DataError: a class has fewer groups than the splits it must reach (the message names the class,
            its image and group counts, and the fix).
    """
    labels = np.asarray([int(s["label"]) for s in samples], dtype=np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    sizes = np.bincount(groups, minlength=n_groups)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups.tolist()):
        members.setdefault(g, []).append(i)
    group_label = {g: Counter(labels[idx].tolist()).most_common(1)[0][0] for g, idx in members.items()}
    parts = [("test", test_fraction), ("validation", val_fraction)]
    needed = 1 + sum(frac > 0 for _, frac in parts)
    assign: dict[int, str] = {}
    too_small = []
    for label in range(len(class_names)):
        own = sorted(g for g, lab in group_label.items() if lab == label)
        n_files = int(sizes[own].sum()) if own else 0
        if len(own) < needed:
            too_small.append((label, n_files, len(own)))
            continue
        rng = np.random.default_rng([seed, label])
        order = [own[i] for i in rng.permutation(len(own))]
        keep = needed - 1  # groups to leave for the parts still to fill, train included
        for part, frac in parts:
            if frac <= 0:
                continue
            for g in _take(order, sizes, frac * n_files, keep):
                assign[g] = part
            order = [g for g in order if g not in assign]
            keep -= 1
        for g in order:
            assign[g] = "train"
    if too_small:
        word = _GROUP_WORDS.get(grouping)
        lines = []
        for label, n_files, n_own in too_small:
            count = f"{n_files} image(s)" + (f" in {n_own} {word}" if word else "")
            lines.append(f"class {_name(label, class_names)} has {count}")
        unit = "groups" if word else "images"
        raise DataError(
            "; ".join(lines)
            + f": a {'grouped ' if word else ''}split needs at least {needed} {unit} per class (one each for "
            + ", ".join(["train", *(p for p, f in parts[::-1] if f > 0)])
            + "); add images to the class, or give your own split (a datalist JSON with training, "
            "validation and test lists, or a CSV with a `split` column)"
        )
    out: dict[str, Datalist] = {name: [] for name in SPLIT_NAMES}
    for i, s in enumerate(samples):
        out[assign[int(groups[i])]].append(dict(s))
    return out


def _warn(warnings: list[str], message: str) -> None:
    logger.warning(message)
    warnings.append(message)


def check_splits(
    splits: Mapping[str, Sequence[Mapping[str, Any]]], class_names: Sequence[str] | None = None
) -> list[str]:
    """Check a train/validation/test split for leaks and duplicates by hashing every file's bytes.

    Args:
        splits: ``{split name: [{"image": path, "label": int, ...}, ...]}``.
        class_names: class names in label order; when given, a non-empty split that lacks a class is
            reported too.

    Returns:
        One warning per case (also logged): a path listed twice in one split, byte-identical files twice in
        one split, a class missing from a split. Files that do not exist are left to
        :func:`~shpeft_monai.data.preflight`.

    Raises:
        DataError: byte-identical content appears in two different splits; the message lists every case
            (both paths, both splits) and the fix.

    Example:
        >>> check_splits({"train": [{"image": "a.png", "label": 0}], "test": [{"image": "b.png", "label": 0}]})  # doctest: +SKIP
        []
    """
    entries = [
        (name, str(s["image"]), s.get("label")) for name, lst in splits.items() for s in lst if "image" in s
    ]
    warnings: list[str] = []
    seen: dict[str, dict[str, list[str]]] = {}  # digest -> split -> paths (in order, with repeats)
    labels: dict[str, set[Any]] = {}  # digest -> labels it is given
    for name, image, label in _progress(entries, "checking splits"):
        path = Path(image)
        if not path.is_file():
            continue
        digest = content_sha256(path)
        seen.setdefault(digest, {}).setdefault(name, []).append(image)
        labels.setdefault(digest, set()).add(label)
    leaks = []
    for digest, where in seen.items():
        labs = sorted(map(str, labels[digest]))
        conflict = f" with different labels ({', '.join(labs)})" if len(labs) > 1 else ""
        for name, paths in where.items():
            for path, n in Counter(paths).items():
                if n > 1:
                    _warn(
                        warnings,
                        f"split {name!r} lists {path} {n} times{conflict}: it is trained/scored {n} times",
                    )
            distinct = list(dict.fromkeys(paths))
            if len(distinct) > 1:
                _warn(
                    warnings,
                    f"split {name!r} holds {len(distinct)} byte-identical files{conflict}: "
                    + ", ".join(distinct),
                )
        if len(where) > 1:
            leaks.append(" <-> ".join(f"{name}: {', '.join(dict.fromkeys(p))}" for name, p in where.items()))
    if class_names is not None:
        for name, lst in splits.items():
            present = {int(s["label"]) for s in lst if isinstance(s.get("label"), (int, np.integer))}
            missing = [str(c) for k, c in enumerate(class_names) if k not in present]
            if lst and missing:
                _warn(warnings, f"split {name!r} has no image of class(es) {', '.join(missing)}")
    if leaks:
        shown = [f"  {case}" for case in leaks[:_MAX_LISTED]]
        if len(leaks) > _MAX_LISTED:
            shown.append(f"  ... and {len(leaks) - _MAX_LISTED} more")
        raise DataError(
            f"{len(leaks)} image(s) appear in more than one split with byte-identical content (a test-set "
            "leak: the model is scored on images it was trained on):\n"
            + "\n".join(shown)
            + "\nRemove the copies from all but one split, or let open_dataset make the split (it keeps "
            "identical files together)."
        )
    return warnings
