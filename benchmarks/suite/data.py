"""Data of the suite: the split (Br35H or the user's data), its bootstrap groups, a decoded tensor cache.

* Br35H: the committed grouped split (``shpeft_monai.data.load_split("br35h")``); every sample carries
  the ``group`` of its near-duplicates, which the bootstrap resamples.
* The user's data (``--dataset <folder | CSV | datalist JSON>``): ``shpeft_monai.data.open_dataset``
  makes (or reads) the split, grouped so that byte-identical files never cross splits. Its samples
  carry no group key, so the bootstrap groups are computed here: the SHA-256 of each file's bytes
  (``grouping="content"``, identical files form a group), or the library's near-duplicate groups of
  the test files when the split was made with ``grouping="near_duplicate"``.

Each image is decoded, resized and normalised once with the library's evaluation transforms into a
float16 tensor (cached under ``$SHPEFT_CACHE_DIR/bench``); training augmentation is a random
left-right flip per image per epoch on the cached tensors, the same for every method.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import SuiteConfig

__all__ = [
    "DataSource",
    "Split",
    "batches",
    "cache_root",
    "content_group",
    "load_tensors",
    "open_source",
    "slug",
]

logger = logging.getLogger("benchmarks.suite")
SPLITS = ("train", "validation", "test")


@dataclass
class DataSource:
    """The split the suite runs on; every sample has ``image``, ``label`` and ``group``."""

    name: str  # "br35h" or a slug of the user's path
    source: str
    class_names: list[str]
    splits: dict[str, list[dict[str, Any]]]
    grouping: str  # what the bootstrap groups are
    identity: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary: sizes and distinct groups per split."""
        return {
            "name": self.name,
            "source": self.source,
            "class_names": self.class_names,
            "grouping": self.grouping,
            "sizes": {k: len(v) for k, v in self.splits.items()},
            "groups": {k: len({str(d["group"]) for d in v}) for k, v in self.splits.items()},
            **({"identity": self.identity} if self.identity else {}),
        }


@dataclass
class Split:
    x: torch.Tensor  # (N, 3, S, S) float16, normalised
    y: torch.Tensor  # (N,) int64


def content_group(path: str | os.PathLike[str]) -> str:
    """Group key of a file by content: the first 16 hex digits of the SHA-256 of its bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def slug(source: str) -> str:
    """A file-name-safe short name of a data path (its folder or file stem)."""
    stem = Path(source.rstrip("/")).stem or "data"
    return re.sub(r"[^A-Za-z0-9]+", "_", stem).strip("_").lower() or "data"


def _subsets(cfg: SuiteConfig, splits: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    from shpeft_monai.data import subsample

    sizes = {"train": cfg.train_subset, "validation": cfg.val_subset, "test": cfg.test_subset}
    return {
        k: [dict(d) for d in splits[k]] if not sizes[k] else subsample(splits[k], sizes[k], seed=0)
        for k in SPLITS
    }


def _user_groups(items: list[dict[str, Any]], grouping: str) -> str:
    """Attach a ``group`` to each sample that has none; returns what the groups are."""
    if all("group" in d for d in items):
        return "given by the data"
    if grouping == "near_duplicate":
        try:
            from shpeft_monai.data.grouping import near_duplicate_groups

            ids = near_duplicate_groups([d["image"] for d in items])
            for d, g in zip(items, ids):
                d["group"] = int(g)
            return "near-duplicate groups (perceptual hash, library default threshold)"
        except ImportError:
            logger.warning("near-duplicate grouping unavailable: grouping the bootstrap by file content")
    for d in items:
        d["group"] = content_group(d["image"])
    return "content groups (SHA-256 of the file bytes, computed by the benchmark)"


def open_source(cfg: SuiteConfig) -> DataSource:
    """The split of ``cfg.dataset`` (after the configured subsets), every sample with its ``group``."""
    from shpeft_monai.data import class_names, load_split

    if cfg.dataset.lower() == "br35h":
        splits = _subsets(cfg, load_split("br35h"))
        return DataSource(
            "br35h",
            "br35h",
            list(class_names("br35h")),
            splits,
            "near-duplicate groups of the committed split",
        )
    identity: dict[str, Any] = {}
    try:
        from shpeft_monai.data import open_dataset
    except ImportError:  # older library: the ungrouped loader; the bootstrap still groups by content
        logger.warning(
            "shpeft_monai.data.open_dataset unavailable: splitting %s without grouping", cfg.dataset
        )
        raw, names = load_split(cfg.dataset), list(class_names(cfg.dataset))
    else:
        ds = open_dataset(cfg.dataset, seed=0, grouping=cfg.grouping)
        raw, names = ds.splits, list(ds.class_names)
        identity = ds.identity() if hasattr(ds, "identity") else {}
    splits = _subsets(cfg, raw)
    grouping = ""
    for k in SPLITS:
        grouping = _user_groups(splits[k], cfg.grouping) or grouping
    return DataSource(slug(cfg.dataset), str(cfg.dataset), names, splits, grouping, identity)


def cache_root() -> Path:
    """``$SHPEFT_CACHE_DIR/bench`` (the library's cache folder rule: ``~/.cache/shpeft-monai`` by default)."""
    root = os.environ.get("SHPEFT_CACHE_DIR") or Path.home() / ".cache" / "shpeft-monai"
    return Path(root) / "bench"


def _cache_split(items: list[dict[str, Any]], img_size: int, network: str, tag: str) -> Split:
    from shpeft_monai.data import image_transforms
    from shpeft_monai.networks import preprocessing

    norm = preprocessing(network)
    ident = json.dumps([[d["image"] for d in items], img_size, norm["mean"], norm["std"]])
    digest = hashlib.sha1(ident.encode()).hexdigest()[:16]
    path = cache_root() / f"{tag}_{img_size}_{digest}.pt"
    if path.is_file():
        data = torch.load(path)
        return Split(data["x"], data["y"])
    tf = image_transforms(img_size, train=False, mean=norm["mean"], std=norm["std"])
    xs, ys = [], []
    t0 = time.perf_counter()
    for i, d in enumerate(items):
        out = tf({"image": d["image"], "label": d["label"]})
        xs.append(torch.as_tensor(out["image"]).to(torch.float16))
        ys.append(int(d["label"]))
        if (i + 1) % 200 == 0:
            logger.info("decoded %d/%d %s images", i + 1, len(items), tag)
    split = Split(torch.stack(xs), torch.tensor(ys, dtype=torch.long))
    logger.info("decoded %d %s images at %d px in %.0fs", len(items), tag, img_size, time.perf_counter() - t0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"x": split.x, "y": split.y}, tmp)
    os.replace(tmp, path)
    return split


def load_tensors(source: DataSource, cfg: SuiteConfig, network: str) -> dict[str, Split]:
    """Decoded tensors of every split at the network's resolution."""
    size = cfg.cnn_img_size if network == cfg.cnn else cfg.img_size
    return {k: _cache_split(source.splits[k], size, network, f"{source.name}_{k}") for k in SPLITS}


def batches(split: Split, batch_size: int, gen: torch.Generator | None, flip: bool) -> list:
    """Mini-batches in a random order (``gen``) or in order (``None``), with random left-right flips."""
    n = split.y.numel()
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    out = []
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        x = split.x[idx].float()
        if flip:
            f = torch.rand(idx.numel(), generator=gen) < 0.5
            x = torch.where(f[:, None, None, None], x.flip(-1), x)
        out.append((x, split.y[idx]))
    return out
