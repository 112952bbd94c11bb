"""One loading path for PIL images, NIfTI and DICOM, and the MONAI transforms built on it.

:class:`LoadMedicalImaged` reads PNG/JPEG (PIL), NIfTI (nibabel) and DICOM (pydicom) into a float32
channel-first array in [0, 1]. 8-bit images are divided by 255; other data (MRI/CT ranges, 16-bit PNG)
are clipped to their 0.5-99.5 percentiles. For 2D models a volume becomes its middle axial slice and grey
images are repeated to three channels; for 3D models every input becomes a one-channel volume.
:func:`image_transforms` wraps it in the resize / augment / normalise pipeline.

Example:
    >>> from shpeft_monai.data import image_transforms, load_medical_image  # doctest: +SKIP
    >>> load_medical_image("scan.nii.gz").shape  # doctest: +SKIP
    (3, 256, 256)
    >>> image_transforms(224, train=False)({"image": "scan.dcm"})["image"].shape  # doctest: +SKIP
    torch.Size([3, 224, 224])
"""

from __future__ import annotations

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
from PIL import Image

from ..networks import IMAGENET_MEAN, IMAGENET_STD  # one definition, re-exported by the package
from ._common import DataError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LoadMedicalImaged", "image_transforms", "load_medical_image"]

logger = logging.getLogger(__name__)

_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


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
