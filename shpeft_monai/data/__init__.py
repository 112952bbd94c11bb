"""Datalists, the committed Br35H split, MONAI transforms for 2D images, NIfTI and DICOM, and a preflight check.

* A datalist is MONAI's: a list of ``{"image": path, "label": int}`` dicts, grouped into
  ``{"train": [...], "validation": [...], "test": [...]}``. The Br35H split is a committed resource whose
  groups of near-duplicate images never cross splits (:mod:`.datalists`).
* One loading path for every format: :class:`LoadMedicalImaged` reads PNG/JPEG, NIfTI and DICOM into a
  float32 channel-first array in [0, 1]; :func:`image_transforms` is the MONAI pipeline around it
  (:mod:`.images`).
* :func:`preflight` decodes every sample once before training and reports every problem in one message
  (:mod:`.checks`).

Example:
    >>> from shpeft_monai.data import image_transforms, load_split, preflight  # doctest: +SKIP
    >>> splits = load_split("br35h")  # doctest: +SKIP
    >>> good, problems = preflight(splits["train"], num_classes=2)  # doctest: +SKIP
    >>> sample = image_transforms(224, train=True)(good[0])  # doctest: +SKIP
    >>> sample["image"].shape, sample["label"].dtype  # doctest: +SKIP
    (torch.Size([3, 224, 224]), torch.int64)
"""

from __future__ import annotations

from ._common import BR35H_CLASSES, IMAGE_SUFFIXES, SPLIT_NAMES, DataError, Datalist
from .checks import preflight
from .datalists import br35h_root, class_names, folder_datalist, load_split, num_classes, subsample
from .images import IMAGENET_MEAN, IMAGENET_STD, LoadMedicalImaged, image_transforms, load_medical_image

__all__ = [
    "BR35H_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "SPLIT_NAMES",
    "DataError",
    "Datalist",
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
