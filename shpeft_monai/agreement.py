"""Mask agreement: one global SH-PEFT mask of exactly k entries from several sites' candidates.

Flower-free core of federated SH-PEFT (arXiv:2405.17877 selects one mask per task; here the sites
of a federation agree on one; docs/federated.md). The budget ``k`` is computed here only
(:func:`budget`), from the eligible layout, and the Flower glue (:mod:`shpeft_monai.fl`) asks
for it.

Each site scores the eligible weights on its own data (task-specific importance, the core's
calibration pass) and sends only its top ``candidate_factor * k`` entries as *global flat indices*
into the eligible layout (eligible tensors in name order, each flattened, concatenated) with their
scores. The server

1. normalises each site's candidate scores by that site's maximum (so gradient scale, batch count
   and image statistics of a site do not decide its influence), weights them by the site's share of
   the examples, and sums them into one combined task-specific score (zero off every candidate);
2. computes the task-agnostic importance from its own copy of the base weights (no data);
3. applies the configured hybrid rule of the core (:func:`shpeft_monai.selection.select_indices`;
   ``weighted`` by default, as in ``shpeft_monai.recipe.DEFAULTS``; ``union`` takes
   ``round(rho * k)`` entries by the combined task-specific score and the rest by task-agnostic
   importance), which returns exactly k entries with deterministic tie-breaking.

Everything here is deterministic: the same replies give the same mask regardless of reply order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .config import SHPEFTConfig
from .selection import select_indices
from .sparse import SparseMask

__all__ = [
    "agree_mask",
    "budget",
    "candidate_count",
    "combine_candidates",
    "flatten_layout",
    "site_candidates",
]


def flatten_layout(tensors: Mapping[str, torch.Tensor]) -> tuple[list[str], list[int]]:
    """Names (sorted) and sizes of the eligible tensors: the global flat index layout."""
    names = sorted(tensors)
    return names, [int(tensors[n].numel()) for n in names]


def budget(config: SHPEFTConfig, tensors: Mapping[str, torch.Tensor] | int) -> int:
    """k of ``config`` over the eligible ``tensors`` (or their total size): the one place it is computed."""
    n = tensors if isinstance(tensors, int) else sum(flatten_layout(tensors)[1])
    return config.budget_for(int(n))


def candidate_count(config: SHPEFTConfig, n_eligible: int, factor: int) -> int:
    """How many candidates each site sends: ``factor * k``, at least 1, at most ``n_eligible``."""
    if factor < 1:
        raise ValueError(f"candidate factor={factor!r} must be an integer >= 1 (default 4)")
    return int(min(max(factor * budget(config, n_eligible), 1), n_eligible))


def site_candidates(scores: Mapping[str, torch.Tensor], n_top: int) -> tuple[np.ndarray, np.ndarray]:
    """A site's ``n_top`` best entries by its own task-specific score, as (global index, score).

    Ties go to lower global indices; the result is sorted by index.
    """
    names = sorted(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).float().cpu() for n in names])
    n_top = int(min(max(n_top, 1), flat.numel()))
    # stable descending sort: equal scores keep index order, so ties break to lower indices
    order = torch.sort(flat, descending=True, stable=True).indices[:n_top]
    order = torch.sort(order).values
    return order.numpy().astype(np.int64), flat[order].numpy().astype(np.float32)


def combine_candidates(
    candidates: Sequence[tuple[np.ndarray, np.ndarray, int]], n_eligible: int
) -> np.ndarray:
    """Dense combined task-specific score: sum over sites of ``(n_i / N) * s_i / max(s_i)``."""
    total = float(sum(n for _, _, n in candidates))
    out = np.zeros(n_eligible, dtype=np.float64)
    # sort by content so the floating-point sum does not depend on the order replies arrived in
    for idx, sc, n in sorted(candidates, key=lambda c: (c[2], c[0].tobytes(), c[1].tobytes())):
        top = float(sc.max()) if sc.size else 0.0
        if top <= 0:
            continue
        np.add.at(out, idx, (n / total) * (sc.astype(np.float64) / top))
    return out.astype(np.float32)


def agree_mask(
    config: SHPEFTConfig,
    combined: np.ndarray,
    task_agnostic: Mapping[str, torch.Tensor],
    base_fingerprint: str,
) -> SparseMask:
    """Exactly ``config.budget_for(n_eligible)`` entries by the core's hybrid rule."""
    names, sizes = flatten_layout(task_agnostic)
    n_eligible = sum(sizes)
    if combined.shape != (n_eligible,):
        raise ValueError(f"combined scores have shape {combined.shape}, expected ({n_eligible},)")
    k = budget(config, n_eligible)
    ts, pos = {}, 0
    for n, size in zip(names, sizes):
        ts[n] = torch.from_numpy(combined[pos : pos + size].copy()).view(task_agnostic[n].shape)
        pos += size
    picked = select_indices(config, k, ts, {n: task_agnostic[n] for n in names})
    shapes = {n: tuple(task_agnostic[n].shape) for n in picked}
    mask = SparseMask(picked, shapes, base_fingerprint, meta={"eligible_weights": n_eligible})
    if mask.k != k:  # select_indices guarantees it; a broken guarantee must not go unnoticed
        raise RuntimeError(f"agreed mask has {mask.k} entries, the budget is {k}")
    return mask
