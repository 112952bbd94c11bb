"""Small functions that MONAI bundle configs call (``$from shpeft_monai import bundle as sb``).

They keep the YAML declarative: datalists with pre-flight checks, transforms matched to the
network's preprocessing, the fine-tuning method applied before the optimizer is built, the trained
model rebuilt from base weights + saved artefact for evaluation and inference, and the summary that
``make demo`` prints.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import data as _data
from .handlers.checkpoint import load_trainable_state
from .io import load_delta, load_mask
from .methods import prepare_method
from .model import apply_delta, mask_summary
from .networks import preprocessing

__all__ = [
    "checked",
    "image_folder_datalist",
    "load_trained",
    "make_datalist",
    "selection_summary",
    "transforms",
]

logger = logging.getLogger(__name__)


def make_datalist(
    dataset: str = "br35h",
    dataset_dir: str | None = None,
    *,
    seed: int = 0,
    train_subset: int = 0,
    val_subset: int = 0,
    test_subset: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """Train/validation/test records from ``dataset`` (``br35h`` or a datalist JSON) or a
    folder-per-class ``dataset_dir``; optional stratified subsets (0 = all). Each record also keeps
    its source path under ``path`` so that reports and CSVs can name files."""
    split = _data.folder_datalist(dataset_dir, seed=seed) if dataset_dir else _data.load_split(dataset)
    sizes = {"train": train_subset, "validation": val_subset, "test": test_subset}
    out = {}
    for name, records in split.items():
        n = sizes.get(name, 0)
        chosen = _data.subsample(records, n, seed=seed) if n else list(records)
        out[name] = [{**r, "path": str(r["image"])} for r in chosen]
    return out


def image_folder_datalist(input_dir: str, suffixes: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Unlabelled records for every image file under ``input_dir`` (inference)."""
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"input_dir {str(root)!r} is not a folder; pass --input_dir <folder of images>."
        )
    suffixes = tuple(suffixes or (*_data.IMAGE_SUFFIXES, ".nii", ".nii.gz", ".dcm"))
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(suffixes)}) under {str(root)!r}.")
    return [{"image": str(p), "path": str(p)} for p in files]


def checked(
    records: list[dict[str, Any]], num_classes: int | None, skip_bad: bool = False, spatial_dims: int = 2
) -> list[dict[str, Any]]:
    """Pre-flight check of a datalist: every problem reported at once (or skipped with a warning)."""
    good, problems = _data.preflight(records, num_classes, skip_bad=skip_bad, spatial_dims=spatial_dims)
    if problems:
        logger.warning("skipped %d bad samples: %s", len(problems), [p["image"] for p in problems][:20])
    return good


def transforms(network_name: str, img_size: int, train: bool, spatial_dims: int = 2) -> Any:
    """MONAI transforms using the network's own normalisation (ImageNet, or 0.5/0.5 for Lite0)."""
    try:
        stats = preprocessing(network_name)
    except (KeyError, ValueError):
        stats = {"mean": _data.IMAGENET_MEAN, "std": _data.IMAGENET_STD}
    return _data.image_transforms(img_size, train, stats["mean"], stats["std"], spatial_dims)


def load_trained(
    network: nn.Module, output_dir: str | Path, method: str = "shpeft", lora: dict | None = None
) -> nn.Module:
    """Base network + the best saved artefact of a training run (the SH-PEFT delta merged in)."""
    out = Path(output_dir)
    if method == "shpeft":
        path = out / "best_delta.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the training workflow first (same output_dir).")
        return apply_delta(network, load_delta(path))
    path = out / "best_trainable.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the training workflow first (same output_dir).")
    network = prepare_method(network, method, lora=lora, output_dir=None)
    load_trainable_state(network, path)
    return network


def selection_summary(output_dir: str | Path) -> dict[str, Any] | None:
    """Where the selected weights sit (from ``mask.safetensors``), or None for other methods."""
    path = Path(output_dir) / "mask.safetensors"
    return mask_summary(load_mask(path).mask) if path.is_file() else None


def run_summary(output_dir: str | Path, method: str = "shpeft") -> dict[str, Any]:
    """Facts about the trained artefact for the report: sizes and trainable counts."""
    out = Path(output_dir)
    facts: dict[str, Any] = {"method": method}
    best = out / ("best_delta.safetensors" if method == "shpeft" else "best_trainable.safetensors")
    if best.is_file():
        facts["artefact_bytes"] = best.stat().st_size
    if method == "shpeft" and best.is_file():
        delta = load_delta(best)
        facts.update(delta.summary())
        facts["best_epoch"] = delta.meta.get("epoch")
        mask_file = out / "mask.safetensors"
        if mask_file.is_file():
            facts["selection_seconds"] = load_mask(mask_file).meta.get("selection_seconds")
    return facts


def dump_json(path: str | Path, payload: Any) -> None:
    from .io import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2, default=str))


def device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
