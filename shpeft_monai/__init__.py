"""SH-PEFT for MONAI: select ~0.01 % of a pretrained vision model's weights by hybrid importance,
train only those, and ship the result as a tiny sparse delta."""

from __future__ import annotations

from .config import SHPEFTConfig
from .io import DeltaFileError, MaskFile, load_delta, load_mask, save_delta, save_mask
from .model import (
    apply_delta,
    eject,
    eligible_parameters,
    extract_delta,
    get_mask,
    inject,
    is_injected,
    load_delta_values,
    mask_summary,
    merge,
    trainable_parameters,
    trainable_report,
)
from .pipeline import select_mask
from .sparse import DeltaMismatchError, SparseDelta, SparseMask

__all__ = [
    "DeltaFileError",
    "DeltaMismatchError",
    "MaskFile",
    "SHPEFTConfig",
    "SparseDelta",
    "SparseMask",
    "apply_delta",
    "eject",
    "eligible_parameters",
    "extract_delta",
    "get_mask",
    "inject",
    "is_injected",
    "load_delta",
    "load_delta_values",
    "load_mask",
    "mask_summary",
    "merge",
    "save_delta",
    "save_mask",
    "select_mask",
    "trainable_parameters",
    "trainable_report",
]
__version__ = "0.1.0"

# Submodules with heavier imports (timm, MONAI engines) load on first access, so that configs can
# say `$from shpeft_monai import bundle` without the package importing them up front.
_LAZY = {
    "bundle",
    "data",
    "errors",
    "handlers",
    "methods",
    "networks",
    "recipe",
    "report",
    "run_record",
    "weights",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'shpeft_monai' has no attribute {name!r}")
