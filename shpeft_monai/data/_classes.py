"""Class names and integer labels of a user's data, checked against explicit ``class_names``/``num_classes``.

Integer labels (and strings of digits, unless they are the given class names) are class indices: the
classes are ``0 .. max label`` (named by the data's or the user's names). Other string labels are class names: they map to indices in the order of the explicit ``class_names``,
else the data's declared ``classes``, else the sorted unique label strings.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._common import DataError

_INT = re.compile(r"^[+-]?\d+$")
_UNSET_HINT = "leave class_names and num_classes unset to take the classes from the data"


def _listing(names: Sequence[Any], limit: int = 20) -> str:
    shown = ", ".join(str(n) for n in list(names)[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _is_int(label: Any) -> bool:
    return isinstance(label, (int, np.integer)) and not isinstance(label, bool)


def resolve_classes(
    labels: Sequence[Any],
    source: str,
    *,
    declared: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> tuple[tuple[str, ...], list[int]]:
    """Class names in label order and the integer label of every sample.

    Args:
        labels: one raw label per sample (int class index or str class name).
        source: the dataset, for messages.
        declared: class names the data itself declares (a datalist's ``classes``, Br35H's names).
        class_names: names the user gave explicitly.
        num_classes: class count the user gave explicitly.

    Raises:
        DataError: a label is neither an int nor a string, a negative index, a name not among the
            classes, or the explicit values disagree with the data (the message names both and the fix).
    """
    bad = [lab for lab in labels if not (_is_int(lab) or isinstance(lab, str))]
    if bad:
        raise DataError(
            f"{source}: labels must be class indices (int) or class names (str), got {bad[0]!r} "
            f"({type(bad[0]).__name__}){f' and {len(bad) - 1} more' if len(bad) > 1 else ''}"
        )
    if not labels:
        raise DataError(f"{source}: the dataset has no labelled images")
    explicit = None if class_names is None else tuple(str(c) for c in class_names)
    if explicit is not None and len(set(explicit)) != len(explicit):
        raise DataError(f"class_names={list(explicit)} repeats a name; give every class once")
    strs = {lab for lab in labels if isinstance(lab, str)}
    given_names = set(explicit or declared or ())
    if strs and all(_INT.match(s) for s in strs) and not strs <= given_names:
        labels = [int(lab) for lab in labels]  # "0", "1", ... are class indices unless they are the names
    if all(_is_int(lab) for lab in labels):
        ints = [int(lab) for lab in labels]
        if min(ints) < 0:
            raise DataError(f"{source}: label {min(ints)} is negative; class indices start at 0")
        top = max(ints)
        names = explicit or (tuple(str(c) for c in declared) if declared else None)
        origin = "class_names" if explicit else "the data's `classes`"
        if names is None:
            names = tuple(str(i) for i in range(top + 1))
        elif len(names) <= top:
            raise DataError(
                f"{source}: labels go up to {top} ({top + 1} classes) but {origin} has {len(names)} name(s) "
                f"({_listing(names)}); give {top + 1} or more names, or {_UNSET_HINT}"
            )
    else:
        strs = [str(lab) for lab in labels]
        found = sorted(set(strs))
        if explicit is not None:
            if set(explicit) != set(found):
                raise DataError(
                    f"class_names has {len(explicit)} name(s) ({_listing(explicit)}) but the data has "
                    f"{len(found)} class(es) ({_listing(found)}) in {source}; give exactly the data's class "
                    f"names (in the label order you want), or {_UNSET_HINT}"
                )
            names = explicit
        elif declared:
            names = tuple(str(c) for c in declared)
            unknown = sorted(set(found) - set(names))
            if unknown:
                raise DataError(
                    f"{source}: label(s) {_listing(unknown)} are not among the declared classes "
                    f"({_listing(names)}); add them to `classes` or fix the labels"
                )
        else:
            names = tuple(found)
        index = {n: i for i, n in enumerate(names)}
        ints = [index[s] for s in strs]
    if num_classes is not None and int(num_classes) != len(names):
        raise DataError(
            f"num_classes={num_classes} but the data has {len(names)} classes ({_listing(names)}) in {source}; "
            f"{_UNSET_HINT}, or set num_classes={len(names)}"
        )
    return names, ints
