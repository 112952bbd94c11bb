"""Robust aggregation of fixed-length sparse site updates (issue 12, item 4; docs/federated_privacy.md).

Each site sends one flat vector: the k agreed sparse values followed by the flattened head. Because
every site trains the same agreed mask, the vectors have equal length and coordinate ``j`` means the
same weight at every site, so coordinate-wise statistics apply directly:

- ``"mean"``: the example-weighted mean (FedAvg on the sparse coordinates);
- ``"median"``: the coordinate-wise median (Yin et al., ICML 2018; Flower's ``FedMedian``);
- ``"trimmed_mean"``: per coordinate, drop the ``floor(trim_fraction * n)`` smallest and largest
  values and average the rest (Flower's ``FedTrimmedAvg``, scipy's ``trim_mean``).

The robust rules ignore the example counts, as Flower's do: a reported count is itself a lever for a
dishonest site. Numpy only (no Flower import); the tests check equality with Flower's helpers.

Example:
    >>> import numpy as np
    >>> aggregate([np.array([1.0, 2.0]), np.array([3.0, 4.0]), np.array([1e3, -1e3])], [1, 1, 1], "median")
    array([3., 2.])
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["RULES", "aggregate", "trimmed_count"]

logger = logging.getLogger(__name__)

RULES = ("mean", "median", "trimmed_mean")


def trimmed_count(num_sites: int, trim_fraction: float) -> int:
    """Number of sites dropped at each end by ``"trimmed_mean"`` (``floor(trim_fraction * num_sites)``).

    Use it at start-up to check that the configured fraction trims anything at the expected site
    count: with 3 sites, ``trim_fraction`` must be at least 1/3 to drop one site per end (then it is
    the median).
    """
    _check_trim_fraction(trim_fraction)
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}.")
    return math.floor(trim_fraction * num_sites)


def aggregate(
    vectors: Sequence[np.ndarray],
    weights: Sequence[float],
    rule: str = "mean",
    trim_fraction: float = 0.2,
) -> np.ndarray:
    """Combine equal-length site vectors with ``rule`` (one of :data:`RULES`).

    Args:
        vectors: one 1-D finite vector per site, all of the same length.
        weights: one positive finite weight per site (its number of training examples); used by
            ``"mean"`` only, validated for every rule.
        rule: ``"mean"``, ``"median"`` or ``"trimmed_mean"``.
        trim_fraction: share of sites cut at each end by ``"trimmed_mean"``, in [0, 0.5).

    Returns:
        The aggregate vector, in the floating dtype of the inputs (float64 for integer inputs).

    Raises:
        ValueError: unknown rule, bad trim fraction, no vectors, a vector that is not 1-D, unequal
            lengths, non-finite values, or weights that do not match the vectors or are not positive.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}.")
    _check_trim_fraction(trim_fraction)
    table = _stack(vectors)
    w = _check_weights(weights, table.shape[0])
    out_dtype = np.result_type(*[np.asarray(v).dtype for v in vectors], np.float32)
    if not np.issubdtype(out_dtype, np.floating):
        out_dtype = np.dtype(np.float64)

    if rule == "mean":
        result = (w[:, None] * table).sum(axis=0) / w.sum()
    elif rule == "median":
        result = np.median(table, axis=0)
    else:
        n = table.shape[0]
        cut = trimmed_count(n, trim_fraction)
        if cut == 0 and trim_fraction > 0:
            logger.warning(
                "trimmed_mean with trim_fraction=%s and %d sites trims no site: this round is a plain "
                "unweighted mean. Use trim_fraction >= %.3f or rule='median'.",
                trim_fraction,
                n,
                1.0 / n,
            )
        result = np.sort(table, axis=0)[cut : n - cut].mean(axis=0)
    return np.asarray(result, dtype=out_dtype)


def _check_trim_fraction(trim_fraction: float) -> None:
    if not (isinstance(trim_fraction, (int, float)) and 0.0 <= trim_fraction < 0.5):
        raise ValueError(
            f"trim_fraction must be a number in [0, 0.5) (share of sites cut at each end), got {trim_fraction!r}."
        )


def _stack(vectors: Sequence[np.ndarray]) -> np.ndarray:
    if len(vectors) == 0:
        raise ValueError("vectors is empty: pass one update vector per site (at least one).")
    arrays = [np.asarray(v) for v in vectors]
    for i, a in enumerate(arrays):
        if a.ndim != 1:
            raise ValueError(f"vectors[{i}] has shape {a.shape}; flatten each site's update to 1-D.")
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"vectors[{i}] has dtype {a.dtype}; pass real numbers.")
    lengths = sorted({a.shape[0] for a in arrays})
    if len(lengths) > 1:
        by_site = [a.shape[0] for a in arrays]
        raise ValueError(
            f"vectors have unequal lengths {by_site}: every site must send the k agreed values plus the "
            "head, in the same order (same mask fingerprint)."
        )
    table = np.stack([a.astype(np.float64, copy=False) for a in arrays])
    if not np.isfinite(table).all():
        bad = sorted({int(i) for i in np.nonzero(~np.isfinite(table))[0]})
        raise ValueError(
            f"vectors {bad} contain NaN or infinite values; drop those sites before aggregating."
        )
    return table


def _check_weights(weights: Sequence[float], n: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.shape[0] != n:
        raise ValueError(f"weights must hold one number per site ({n}), got shape {w.shape}.")
    if not np.isfinite(w).all() or (w <= 0).any():
        raise ValueError(f"weights must be positive and finite (examples per site), got {w.tolist()}.")
    return w
