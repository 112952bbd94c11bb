"""User-facing errors and how a bundle run ends on one.

A problem the user can fix (bad data, a conflicting setting, a damaged artefact) must end the run with
its message as the last thing on screen and a non-zero exit code, not inside the ~60-line double
traceback that MONAI's config parser wraps around every exception (``Failed to evaluate
ConfigExpression``). :func:`install_excepthook` does that for ``python -m monai.bundle run ...``; set
``SHPEFT_TRACEBACK=1`` to see the full traceback.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType

__all__ = ["RunConfigError", "ShpeftError", "install_excepthook", "user_error_in"]


class ShpeftError(Exception):
    """A problem with the user's input or files that the message explains how to fix."""


class RunConfigError(ShpeftError, ValueError):
    """A setting conflicts with the run it refers to (or with the data), named with both values."""


def _user_facing() -> tuple[type[BaseException], ...]:
    from .data import DataError
    from .io import DeltaFileError
    from .sparse import DeltaMismatchError

    return (ShpeftError, DataError, DeltaFileError, DeltaMismatchError)


def user_error_in(exc: BaseException | None) -> BaseException | None:
    """The first user-facing error in ``exc``'s chain (``__cause__`` / ``__context__``), or None."""
    kinds = _user_facing()
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kinds):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    error = user_error_in(exc)
    if error is None or os.environ.get("SHPEFT_TRACEBACK", "") not in ("", "0"):
        sys.__excepthook__(kind, exc, tb)
        return
    sys.stderr.write(
        f"\nshpeft: the run stopped ({type(error).__name__}):\n{error}\n"
        "(set SHPEFT_TRACEBACK=1 to see the traceback)\n"
    )
    sys.stderr.flush()


def install_excepthook() -> None:
    """End the process on a user-facing error with its message only (exit code stays 1)."""
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _hook
