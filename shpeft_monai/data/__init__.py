"""Datalists, the committed Br35H split, users' own data, MONAI transforms for 2D images, NIfTI and DICOM,
and a preflight check.

* :func:`open_dataset` opens Br35H, a folder per class, a CSV or a datalist JSON as one checked split
  (:class:`DatasetSplits`: class names from the data, a stratified split grouped by file content when the
  source gives none, no file content in two splits, a SHA-256 of the datalist) (:mod:`.sources`);
  :func:`check_splits` is its leak and duplicate check (:mod:`.splitting`, :mod:`.grouping`).
* A datalist is MONAI's: a list of ``{"image": path, "label": int}`` dicts, grouped into
  ``{"train": [...], "validation": [...], "test": [...]}``. The Br35H split is a committed resource whose
  groups of near-duplicate images never cross splits (:mod:`.datalists`).
* One loading path for every format: :class:`LoadMedicalImaged` reads PNG/JPEG, NIfTI and DICOM into a
  float32 channel-first array in [0, 1]; :func:`image_transforms` is the MONAI pipeline around it
  (:mod:`.images`).
* :func:`preflight` decodes every sample once before training and reports every problem in one message
  (:mod:`.checks`).

Example:
    >>> from shpeft_monai.data import image_transforms, open_dataset, preflight  # doctest: +SKIP
    >>> ds = open_dataset("br35h")  # doctest: +SKIP
    >>> good, problems = preflight(ds.splits["train"], ds.num_classes, class_names=ds.class_names)  # doctest: +SKIP
    >>> sample = image_transforms(224, train=True)(good[0])  # doctest: +SKIP
    >>> sample["image"].shape, sample["label"].dtype  # doctest: +SKIP
    (torch.Size([3, 224, 224]), torch.int64)
"""

from __future__ import annotations

from ._common import BR35H_CLASSES, BR35H_FOLDERS, IMAGE_SUFFIXES, SPLIT_NAMES, DataError, Datalist
from .checks import preflight
from .datalists import br35h_root, class_names, folder_datalist, load_split, num_classes, subsample
from .images import IMAGENET_MEAN, IMAGENET_STD, LoadMedicalImaged, image_transforms, load_medical_image
from .sources import DatasetSplits, open_dataset
from .splitting import check_splits

__all__ = [
    "BR35H_CLASSES",
    "BR35H_FOLDERS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "SPLIT_NAMES",
    "DataError",
    "Datalist",
    "DatasetSplits",
    "LoadMedicalImaged",
    "br35h_root",
    "check_splits",
    "class_names",
    "folder_datalist",
    "image_transforms",
    "load_medical_image",
    "load_split",
    "num_classes",
    "open_dataset",
    "preflight",
    "subsample",
]
