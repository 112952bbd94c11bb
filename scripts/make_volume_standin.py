"""Build the STAND-IN 3D task for the bundle's ``volume3d`` overlay from real volumes shipped with nibabel.

No labelled 3D medical set is available offline, so the 3D overlay is exercised on a documented stand-in:
**orientation-error detection**. Every real volume of nibabel's test data (brain MRI, EPI series, a
scanner phantom; each time point of a 4D series counts as one volume) is written twice as NIfTI:

* label 0 ``original``: the volume in closest-canonical (RAS) orientation, header and data consistent;
* label 1 ``flipped``: the same data flipped along the superior-inferior axis while the header still
  says RAS, i.e. an upside-down volume (a real data-handling error: voxel order and header disagree).

The flip is superior-inferior, not left-right, because the bundle's 3D training augmentation flips
left-right at random (``RandFlipd(spatial_axis=0)``), which would destroy a left-right label.
Splits are grouped by source (volumes of the same subject or series stay in one split), so that
neither copy of a volume is seen in training when the other is evaluated.

This is a plumbing check of the 3D path (NIfTI loading, 3D transforms, SH-PEFT on Conv3d kernels,
evaluation and inference), not a medical benchmark: the task is easy and the set is tiny.

Usage::

    python scripts/make_volume_standin.py                      # writes runs/volume3d_data/
    python scripts/make_volume_standin.py /some/folder         # another folder

It writes ``<folder>/volumes/*.nii.gz`` and ``<folder>/datalist.json`` (MONAI datalist, paths relative
to the JSON file), which the overlay reads through ``--dataset <folder>/datalist.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from shpeft_monai.io import write_json

logger = logging.getLogger("make_volume_standin")

CLASS_NAMES = ("original", "flipped")
# nibabel test file -> (group, split). Files of the same subject or series share a group.
SOURCES: dict[str, tuple[str, str]] = {
    "anatomical.nii": ("anat", "train"),  # structural brain MRI
    "reoriented_anat_moved.nii": ("anat", "train"),  # the same subject, resampled and reoriented
    "example4d+orig.BRIK.gz": ("anat", "train"),  # AFNI series of the same subject, 3 volumes
    "phantom_EPI_asc_CLEAR_2_1.PAR": ("phantom", "train"),  # Philips EPI of a phantom, 3 volumes
    "example4d.nii.gz": ("epi", "validation"),  # EPI brain series, 2 volumes
    "scaled+tlrc.BRIK": ("tlrc", "validation"),  # AFNI volume in Talairach space
    "example_nifti2.nii.gz": ("nifti2", "test"),  # NIfTI-2 brain series, 2 volumes
}
MIN_SIZE = 8  # skip volumes thinner than this along any axis


def source_volumes(data_dir: Path) -> Iterator[tuple[str, str, str, np.ndarray, np.ndarray]]:
    """(name, group, split, data (X, Y, Z) float32 in RAS, affine) for every usable 3D volume."""
    import nibabel as nib

    for file_name, (group, split) in SOURCES.items():
        path = data_dir / file_name
        if not path.is_file():
            logger.warning("%s not found; skipped", path)
            continue
        img = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asarray(img.dataobj, dtype=np.float32)
        if data.ndim == 3:
            data = data[..., None]
        if data.ndim != 4 or min(data.shape[:3]) < MIN_SIZE:
            logger.warning("%s: shape %s is not a usable volume; skipped", file_name, data.shape)
            continue
        stem = file_name.split(".")[0].replace("+", "_")
        for t in range(data.shape[3]):
            yield f"{stem}_t{t}", group, split, np.ascontiguousarray(data[..., t]), img.affine


def build(out_dir: Path, data_dir: Path | None = None) -> Path:
    """Write the flipped/original NIfTI pairs and ``datalist.json`` under ``out_dir``; return the JSON path."""
    import nibabel as nib
    from nibabel.testing import data_path

    data_dir = Path(data_dir) if data_dir is not None else Path(data_path)
    vol_dir = out_dir / "volumes"
    vol_dir.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict[str, object]]] = {"training": [], "validation": [], "test": []}
    key = {"train": "training", "validation": "validation", "test": "test"}
    for name, group, split, data, affine in source_volumes(data_dir):
        for label, volume in enumerate((data, data[:, :, ::-1])):  # axis 2 is superior-inferior in RAS
            rel = Path("volumes") / f"{name}_{CLASS_NAMES[label]}.nii.gz"
            nib.save(nib.Nifti1Image(np.ascontiguousarray(volume), affine), str(out_dir / rel))
            splits[key[split]].append({"image": rel.as_posix(), "label": label, "group": group})
    empty = [k for k, v in splits.items() if not v]
    if empty:
        raise RuntimeError(
            f"no volumes for split(s) {empty}: nibabel's test data under {data_dir} is incomplete"
        )
    datalist = {
        "description": (
            "STAND-IN task (not a medical benchmark): real nibabel test volumes, label 1 = flipped "
            "superior-inferior while the header says RAS. Built by scripts/make_volume_standin.py."
        ),
        "class_names": list(CLASS_NAMES),
        **splits,
    }
    path = out_dir / "datalist.json"
    write_json(path, datalist)
    counts = {k: len(v) for k, v in splits.items()}
    logger.info("wrote %s (%s samples per split)", path, counts)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default="runs/volume3d_data", help="output folder")
    parser.add_argument(
        "--data-dir", default=None, help="folder of source volumes (default: nibabel's test data)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = build(Path(args.out_dir), args.data_dir)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
