"""Which files are the same image: exact content hashes and a flip/rotation-aware perceptual hash.

A split that scatters copies of one image over train and test leaks the test set into training. Two
notions of "copy" are used by :func:`~shpeft_monai.data.open_dataset`:

* **content**: byte-identical files (SHA-256 of the file bytes, :func:`content_sha256`).
* **near duplicate**: the same picture saved at another size, contrast or orientation. Every image is
  decoded once as a 64x64 grey thumbnail; its 256-bit DCT perceptual hash (top-left 16x16 coefficients
  compared with their median) is computed for the image and, from the same coefficients, for its 8
  dihedral transforms (mirroring flips the sign of the odd-frequency coefficients; transposing transposes
  them). Two files are linked when any transform of one lies within ``threshold`` bits of the other; the
  connected components (union-find) are the groups. This is the grouping of the committed Br35H split
  (``scripts/make_br35h_split.py`` uses these functions; see ``docs/`` for its statistics).

Example:
    >>> from shpeft_monai.data.grouping import near_duplicate_groups  # doctest: +SKIP
    >>> groups = near_duplicate_groups(["a.jpg", "a_mirrored.png", "b.jpg"])  # doctest: +SKIP
    >>> groups.tolist()  # doctest: +SKIP
    [0, 0, 1]
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

__all__ = [
    "DEFAULT_THRESHOLD",
    "content_groups",
    "content_sha256",
    "dihedral_hashes",
    "grey_thumbnail",
    "min_hamming",
    "near_duplicate_groups",
    "near_duplicate_pairs",
    "union_find_groups",
]

THUMB = 64
HASH_SIZE = 16
DEFAULT_THRESHOLD = 40  # bits of 256: no Br35H group mixes labels at this threshold
_PROGRESS_MIN = 200
_BLOCK = 1024

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def content_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file's bytes, cached in memory by (absolute path, size, mtime)."""
    p = Path(path).absolute()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    digest = _SHA_CACHE.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        digest = _SHA_CACHE[key] = h.hexdigest()
    return digest


def _progress(items: Sequence, desc: str) -> Iterable:
    return tqdm(items, desc=desc, unit="file", leave=False, disable=len(items) < _PROGRESS_MIN)


def content_groups(paths: Sequence[str | os.PathLike[str]]) -> tuple[np.ndarray, list[str]]:
    """Group ids (numbered by first member) of byte-identical files, and each file's SHA-256."""
    digests = [content_sha256(p) for p in _progress(paths, "hashing files")]
    ids: dict[str, int] = {}
    return np.asarray([ids.setdefault(d, len(ids)) for d in digests], dtype=np.int64), digests


def grey_thumbnail(path: str | os.PathLike[str], size: int = THUMB) -> np.ndarray:
    """Decode ``path`` cheaply to a ``size`` x ``size`` float64 grey thumbnail.

    PIL formats use JPEG draft mode (DCT-domain downscaling, never below ``size``); NIfTI and DICOM go
    through :func:`~shpeft_monai.data.load_medical_image` (middle axial slice, scaled to [0, 255]).
    """
    try:
        with Image.open(path) as im:
            im.draft("L", (size, size))
            grey = im.convert("L").resize((size, size), Image.Resampling.LANCZOS)
        return np.asarray(grey, dtype=np.float64)
    except UnidentifiedImageError:
        from .images import load_medical_image

        arr = load_medical_image(path, spatial_dims=2).mean(axis=0) * 255.0
        grey = Image.fromarray(arr.astype(np.float32), mode="F").resize(
            (size, size), Image.Resampling.LANCZOS
        )
        return np.asarray(grey, dtype=np.float64)


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)
    return np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))


def dihedral_hashes(thumbs: np.ndarray, hash_size: int = HASH_SIZE) -> np.ndarray:
    """Perceptual hashes of every thumbnail ``(n, s, s)`` under the 8 dihedral transforms.

    Returns a bool array ``(8, n, hash_size**2)``; index 0 is the untransformed image.
    """
    dct = _dct_matrix(thumbs.shape[-1])
    coeff = (dct @ thumbs @ dct.T)[:, :hash_size, :hash_size]
    sign = (-1.0) ** np.arange(hash_size)
    variants = []
    for c in (coeff, coeff.transpose(0, 2, 1)):
        variants += [c, c * sign[None, :], c * sign[:, None], c * sign[:, None] * sign[None, :]]
    flat = np.stack([v.reshape(len(v), -1) for v in variants])
    return flat > np.median(flat, axis=2, keepdims=True)


def _min_hamming_rows(hashes: np.ndarray, rows: slice) -> np.ndarray:
    """``(rows, n)``: smallest Hamming distance between any transform of row i and the plain hash of j."""
    bits = hashes.shape[-1]
    ref = hashes[0].astype(np.float32)
    best = np.full((len(range(*rows.indices(ref.shape[0]))), ref.shape[0]), bits, dtype=np.float32)
    for h in hashes[:, rows].astype(np.float32):
        agree = h @ ref.T + (1 - h) @ (1 - ref).T
        np.minimum(best, bits - agree, out=best)
    return best


def min_hamming(hashes: np.ndarray) -> np.ndarray:
    """Symmetric ``(n, n)`` matrix: smallest Hamming distance between any transform of i and j."""
    best = _min_hamming_rows(hashes, slice(None))
    return np.minimum(best, best.T)


def near_duplicate_pairs(hashes: np.ndarray, threshold: int = DEFAULT_THRESHOLD) -> np.ndarray:
    """``(m, 2)`` index pairs ``i < j`` linked by :func:`min_hamming` ``<= threshold``, in row blocks
    (memory ``O(block * n)``, so tens of thousands of files fit)."""
    n = hashes.shape[1]
    pairs = []
    for start in range(0, n, _BLOCK):
        best = _min_hamming_rows(hashes, slice(start, start + _BLOCK))
        i, j = np.nonzero(best <= threshold)
        i = i + start
        keep = i != j
        pairs.append(np.stack([np.minimum(i, j)[keep], np.maximum(i, j)[keep]], axis=1))
    return np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), dtype=np.int64)


def union_find_groups(n: int, pairs: Iterable[tuple[int, int]]) -> np.ndarray:
    """Connected components of ``n`` nodes linked by ``pairs``; group ids numbered by first member."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs:
        ri, rj = find(int(i)), find(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)  # the root is always the component's smallest index
    roots = [find(i) for i in range(n)]
    ids: dict[int, int] = {}
    return np.asarray([ids.setdefault(r, len(ids)) for r in roots], dtype=np.int64)


def near_duplicate_groups(
    paths: Sequence[str | os.PathLike[str]], threshold: int = DEFAULT_THRESHOLD
) -> np.ndarray:
    """Group ids (numbered by first member) of files that are near duplicates of one another."""
    if not paths:
        return np.zeros(0, dtype=np.int64)
    thumbs = np.stack([grey_thumbnail(p) for p in _progress(paths, "perceptual hashes")])
    return union_find_groups(len(paths), near_duplicate_pairs(dihedral_hashes(thumbs), threshold))
