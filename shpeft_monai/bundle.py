"""Small functions that MONAI bundle configs call (``$from shpeft_monai import bundle as sb``).

They keep the YAML declarative: datalists with pre-flight checks, transforms matched to the
network's preprocessing, the fine-tuning method applied before the optimizer is built, the trained
model rebuilt from base weights + saved artefact for evaluation and inference, and the summary that
``make demo`` prints.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import data as _data
from .errors import RunConfigError, install_excepthook
from .handlers.checkpoint import load_trainable_state, saved_meta
from .io import BEST_DELTA_FILE, BEST_TRAINABLE_FILE, MASK_FILE, load_delta, load_mask
from .methods import prepare_method
from .model import apply_delta, mask_summary
from .networks import create_network
from .run_record import RunRecord, environment, resolve_run

__all__ = [
    "artefact_meta",
    "build_network",
    "checked",
    "class_counts",
    "image_folder_datalist",
    "load_trained",
    "resolve_run",
    "selection_summary",
    "title",
    "transforms",
]

logger = logging.getLogger(__name__)

# a bundle run that stops on a user-facing problem ends with that message, not a config-parser traceback
install_excepthook()


def image_folder_datalist(
    input_dir: str | None, suffixes: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Unlabelled records for every image file under ``input_dir`` (inference)."""
    if not input_dir:
        raise RunConfigError("inference needs images: pass --input_dir <folder of images>.")
    root = Path(input_dir)
    if not root.is_dir():
        raise RunConfigError(f"input_dir {str(root)!r} is not a folder; pass --input_dir <folder of images>.")
    suffixes = tuple(suffixes or (*_data.IMAGE_SUFFIXES, ".nii", ".nii.gz", ".dcm"))
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
    if not files:
        raise RunConfigError(f"no image files ({', '.join(suffixes)}) under {str(root)!r}.")
    return [{"image": str(p), "path": str(p)} for p in files]


def class_counts(records: Sequence[Mapping[str, Any]], num_classes: int) -> list[int]:
    """Training examples per class (the prior of the logit-adjusted loss)."""
    counts = [0] * int(num_classes)
    for r in records:
        counts[int(r["label"])] += 1
    return counts


def checked(
    records: list[dict[str, Any]], run: RunRecord, skip_bad: bool = False, labelled: bool = True
) -> list[dict[str, Any]]:
    """Pre-flight check of a datalist for the run: every problem reported at once (or skipped, logged)."""
    good, problems = _data.preflight(
        records,
        run.num_classes if labelled else None,
        skip_bad=skip_bad,
        spatial_dims=run.spatial_dims,
        class_names=list(run.class_names) if labelled else None,
    )
    if problems:
        logger.warning("skipped %d bad samples: %s", len(problems), [p["image"] for p in problems][:20])
    return good


def transforms(run: RunRecord, train: bool) -> Any:
    """MONAI transforms with the run's size, spatial dims and its network's own normalisation."""
    stats = run.preprocessing
    return _data.image_transforms(run.img_size, train, stats["mean"], stats["std"], run.spatial_dims)


def build_network(run: RunRecord, **kwargs: Any) -> nn.Module:
    """The run's pretrained network with a new head for its classes (``img_size`` only where it applies)."""
    try:
        return create_network(run.network_name, run.num_classes, img_size=run.img_size, **kwargs)
    except ValueError as err:
        if "img_size" not in str(err):
            raise
        return create_network(run.network_name, run.num_classes, **kwargs)


def artefact_meta(run: RunRecord) -> dict[str, Any]:
    """What a saved artefact carries about itself: the run's description (network, size, classes,
    data) and the environment it was trained in (:func:`~shpeft_monai.run_record.environment`)."""
    return {**run.describe(), "environment": environment()}


def title(run: RunRecord, split: str = "test") -> str:
    """Report title naming the data scored, the split, the method and the network."""
    scored = run.scored or {}
    source = str(scored.get("source") or run.data.get("source"))
    name = "Br35H" if source.lower() == "br35h" else Path(source).name
    part = scored.get("split", split)
    where = f"{name} ({'all images' if part == 'all' else part + ' split'})"
    return f"{where}: {run.method} on {run.network_name}, classes {', '.join(run.class_names)}"


def load_trained(network: nn.Module, output_dir: str | Path, run: RunRecord) -> nn.Module:
    """Base network + the best saved artefact of a training run (the SH-PEFT delta merged in)."""
    out = Path(output_dir)
    if run.method == "shpeft":
        path = out / BEST_DELTA_FILE
        if not path.is_file():
            raise RunConfigError(f"{path} not found: the training in {out} saved no artefact yet.")
        return apply_delta(network, load_delta(path))
    path = out / BEST_TRAINABLE_FILE
    if not path.is_file():
        raise RunConfigError(f"{path} not found: the training in {out} saved no artefact yet.")
    network = prepare_method(network, run.method, lora=run.lora, output_dir=None)
    load_trainable_state(network, path)
    return network


def selection_summary(output_dir: str | Path) -> dict[str, Any] | None:
    """Where the selected weights sit (from ``mask.safetensors``), or None for other methods."""
    path = Path(output_dir) / MASK_FILE
    return mask_summary(load_mask(path).mask) if path.is_file() else None


def run_summary(output_dir: str | Path, run: RunRecord) -> dict[str, Any]:
    """Facts about the trained artefact for the report: sizes, trainable counts, the data scored."""
    out = Path(output_dir)
    method = run.method
    facts: dict[str, Any] = {
        "method": method,
        "network": run.network_name,
        "img_size": run.img_size,
        "class_names": list(run.class_names),
        "trained_on": run.data,
        "scored": run.scored,
    }
    best = out / (BEST_DELTA_FILE if method == "shpeft" else BEST_TRAINABLE_FILE)
    if best.is_file():
        meta = saved_meta(best)
        facts["artefact_bytes"] = best.stat().st_size
        facts["best_epoch"] = meta.get("epoch")
        facts["trained_with"] = meta.get("environment")
    if method == "shpeft" and best.is_file():
        delta = load_delta(best)
        facts.update(delta.summary())
        mask_file = out / MASK_FILE
        if mask_file.is_file():
            facts["selection_seconds"] = load_mask(mask_file).meta.get("selection_seconds")
    return facts


def device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
