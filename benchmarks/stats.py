"""Statistics of the benchmark tables: seeds, grouped (cluster) bootstrap and paired differences.

Pure numpy (no torch), so the tables can be recomputed from the results JSON anywhere.

Why grouped: the Br35H test split holds 452 files but only 44 groups of near-duplicate images
(``shpeft_monai/resources/br35h_split.json``, key ``group``), and a user's data set may hold
byte-identical copies. Files of one group are not independent cases: a bootstrap that resamples
files treats them as if they were and gives intervals that are too narrow. The bootstrap here is a
*cluster* bootstrap: each replicate draws as many groups as the test split holds, with replacement,
and takes every file of each drawn group (a group drawn twice counts twice).

Definitions (docs/benchmarks.md, "Statistics"):

* **per seed / mean ± sd**: the test accuracy of each seed's run, their mean and sample standard
  deviation (``ddof=1``; 0 for one seed);
* **grouped 95 % interval** of a method's test accuracy: percentile interval (2.5 %, 97.5 %) of the
  seed-averaged accuracy over ``n_boot`` cluster-bootstrap replicates of the test split. One draw of
  groups is shared by all seeds of the method, so the interval measures how much the *test split*
  could move the figure; the seed-to-seed spread is the separate sd column;
* **paired difference** A - B over the seeds both ran: per-seed differences of test accuracy and
  their mean; its grouped interval draws the same groups for both methods (and all seeds) in each
  replicate and takes the seed-averaged difference. "Excludes zero" means the whole interval lies on
  one side of 0.

Example:
    >>> import numpy as np
    >>> correct = np.array([[1, 1, 0, 1]])  # one seed, four test files
    >>> groups = np.array([0, 0, 1, 2])  # the first two files are near-duplicates
    >>> ci = grouped_bootstrap(correct, groups, n_boot=200, seed=0)
    >>> ci["n_groups"], round(ci["estimate"], 2)
    (3, 0.75)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "LEVEL",
    "N_BOOT",
    "group_index",
    "group_sums",
    "grouped_bootstrap",
    "mean_sd",
    "paired_difference",
    "resample_counts",
    "resampled_accuracy",
]

N_BOOT = 2000
LEVEL = 0.95


def mean_sd(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``) of the finite values; sd 0 for one value.

    NaN and ``None`` are left out; no value at all gives ``(nan, nan)``.
    """
    v = np.asarray([x for x in values if x is not None and x == x], dtype=float)
    if v.size == 0:
        return (float("nan"), float("nan"))
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def group_index(groups: Sequence[Any]) -> tuple[np.ndarray, int]:
    """Map arbitrary group keys to ``0..G-1`` in order of first appearance; returns (index, G)."""
    seen: dict[Any, int] = {}
    idx = np.fromiter((seen.setdefault(g, len(seen)) for g in groups), dtype=np.int64, count=len(groups))
    return idx, len(seen)


def group_sums(correct: np.ndarray, groups: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per-group sums of correctness ``(S, G)`` for each of S seeds, and group sizes ``(G,)``.

    Args:
        correct: ``(S, N)`` (or ``(N,)`` for one seed) 0/1 correctness of N test files.
        groups: ``(N,)`` group key of each file.
    """
    c = np.atleast_2d(np.asarray(correct, dtype=float))
    idx, n_groups = group_index(groups)
    if c.shape[1] != idx.size:
        raise ValueError(f"correct has {c.shape[1]} files per seed but groups has {idx.size}")
    sums = np.stack([np.bincount(idx, weights=row, minlength=n_groups) for row in c])
    sizes = np.bincount(idx, minlength=n_groups).astype(float)
    return sums, sizes


def resample_counts(n_groups: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, G)`` counts: how often each group is drawn when ``G`` groups are drawn with replacement."""
    return rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot).astype(float)


def resampled_accuracy(counts: np.ndarray, sums: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Accuracy of each seed on each resampled test split, ``(B, S)``.

    Replicate b takes every file of group g ``counts[b, g]`` times: accuracy = sum_g counts * sums
    / sum_g counts * sizes.
    """
    return (np.atleast_2d(counts) @ np.atleast_2d(sums).T) / (np.atleast_2d(counts) @ sizes)[:, None]


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def grouped_bootstrap(
    correct: np.ndarray,
    groups: Sequence[Any],
    *,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
) -> dict[str, Any]:
    """Cluster-bootstrap interval of the seed-averaged accuracy.

    Args:
        correct: ``(S, N)`` 0/1 correctness per seed and test file (``(N,)`` for one seed).
        groups: ``(N,)`` group of each file; pass ``range(N)`` for the file-level bootstrap.
        n_boot: replicates.
        level: interval coverage (0.95: the 2.5 % and 97.5 % percentiles).
        seed: of the replicates' random draws (fixed: the table is reproducible).

    Returns:
        ``estimate`` (mean over seeds of the accuracy on the whole test split), ``low``, ``high``,
        ``level``, ``n_boot``, ``n_groups`` (distinct groups), ``n_files`` and ``n_seeds``.
    """
    sums, sizes = group_sums(correct, groups)
    counts = resample_counts(sizes.size, n_boot, np.random.default_rng(seed))
    samples = resampled_accuracy(counts, sums, sizes).mean(1)
    low, high = _interval(samples, level)
    return {
        "estimate": float((sums.sum(1) / sizes.sum()).mean()),
        "low": low,
        "high": high,
        "level": level,
        "n_boot": n_boot,
        "n_groups": int(sizes.size),
        "n_files": int(sizes.sum()),
        "n_seeds": int(sums.shape[0]),
    }


def paired_difference(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    groups: Sequence[Any],
    *,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired difference of test accuracy, A minus B, over the same seeds and the same test files.

    Args:
        correct_a, correct_b: ``(S, N)`` 0/1 correctness, row s of both from the same seed.
        groups: ``(N,)`` group of each test file.

    Returns:
        ``per_seed`` (accuracy differences, in seed order), ``mean``, ``sd`` (of the per-seed
        differences), ``low`` / ``high`` (grouped bootstrap of the seed-averaged difference, one draw
        of groups shared by A and B), ``excludes_zero``, ``n_groups``, ``n_seeds``, ``level``, ``n_boot``.
    """
    a = np.atleast_2d(np.asarray(correct_a, dtype=float))
    b = np.atleast_2d(np.asarray(correct_b, dtype=float))
    if a.shape != b.shape:
        raise ValueError(f"paired runs must have the same seeds and files: {a.shape} vs {b.shape}")
    sums_a, sizes = group_sums(a, groups)
    sums_b, _ = group_sums(b, groups)
    per_seed = (sums_a.sum(1) - sums_b.sum(1)) / sizes.sum()
    counts = resample_counts(sizes.size, n_boot, np.random.default_rng(seed))
    samples = (resampled_accuracy(counts, sums_a, sizes) - resampled_accuracy(counts, sums_b, sizes)).mean(1)
    low, high = _interval(samples, level)
    mean, sd = mean_sd(per_seed.tolist())
    return {
        "per_seed": [float(x) for x in per_seed],
        "mean": mean,
        "sd": sd,
        "low": low,
        "high": high,
        "excludes_zero": bool(low > 0 or high < 0),
        "level": level,
        "n_boot": n_boot,
        "n_groups": int(sizes.size),
        "n_seeds": int(a.shape[0]),
    }
