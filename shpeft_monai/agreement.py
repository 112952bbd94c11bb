"""Mask agreement: one global SH-PEFT mask of exactly k entries from several sites' candidates.

Flower-free core of federated SH-PEFT (arXiv:2405.17877 selects one mask per task; here the sites
of a federation agree on one; docs/federated.md). The budget ``k`` is computed here only
(:func:`budget`), from the eligible layout, and the Flower glue (:mod:`shpeft_monai.fl`) asks
for it.

Each site scores the eligible weights on its own data and sends only its top
``candidate_factor * k`` entries as *global flat indices* into the eligible layout (eligible tensors
in name order, each flattened, concatenated) with their scores (:func:`site_scores`):

* ``weighted`` hybrid (the default, ``0 < lam < 1``): the site ranks by the bundle's own mixed score
  ``lam * rank(I_ts) + (1 - lam) * rank(I_ta)`` over every eligible weight (every site holds the same
  base weights, so ``I_ta`` is common). The server sums the sites' mixed scores weighted by their
  share of the examples; an entry a site did not send counts at that site's lowest sent score (an
  upper bound of its true score). One site gives exactly the mask the bundle selects on its data.
  Sending task-specific candidates alone cannot work here: under rank normalisation the mixed rule
  picks weights in the top few per cent of both scores, most of them outside any site's top
  ``4k`` task-specific entries (measured: 37 of 2,146 entries in common with centralised selection).
* ``union`` / ``task_specific``: the site ranks by task-specific importance; the server normalises
  each site's candidate scores by that site's maximum (so gradient scale, batch count and image
  statistics of a site do not decide its influence), weights them by the site's share of the
  examples, sums them (zero off every candidate) and applies the rule of the core
  (:func:`shpeft_monai.selection.select_indices`; ``union`` takes ``round(rho * k)`` entries by the
  combined task-specific score and the rest by the task-agnostic importance of its own base weights).

Either way exactly k entries come out with deterministic tie-breaking: the same replies give the
same mask regardless of reply order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .config import SHPEFTConfig
from .scoring import weighted_scores
from .selection import select_indices, topk_entries
from .sparse import SparseMask

__all__ = [
    "agree_mask",
    "budget",
    "candidate_count",
    "combine_candidates",
    "flatten_layout",
    "mixes_at_sites",
    "site_candidates",
    "site_scores",
]


def mixes_at_sites(config: SHPEFTConfig) -> bool:
    """Whether sites rank by the mixed hybrid score (``weighted`` with ``0 < lam < 1``)."""
    return config.hybrid == "weighted" and 0 < config.lam < 1


def site_scores(
    config: SHPEFTConfig, task_specific: Mapping[str, torch.Tensor], task_agnostic: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """What a site ranks its candidates by: the bundle's mixed score for ``weighted``, else its
    task-specific importance."""
    if mixes_at_sites(config):
        return dict(weighted_scores(task_specific, task_agnostic, config.lam, config.normalize))
    return dict(task_specific)


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
    candidates: Sequence[tuple[np.ndarray, np.ndarray, int]],
    n_eligible: int,
    config: SHPEFTConfig,
) -> np.ndarray:
    """Dense combined score of every eligible entry, weighted by the sites' example shares.

    Mixed scores (``config`` weighted, :func:`mixes_at_sites`): ``sum_i (n_i / N) * h_i``, where an
    entry site i did not send counts at ``min(h_i)``. Otherwise task-specific candidates:
    ``sum_i (n_i / N) * s_i / max(s_i)``, zero off every candidate.
    """
    mixed = mixes_at_sites(config)
    total = float(sum(n for _, _, n in candidates))
    out = np.zeros(n_eligible, dtype=np.float64)
    # sort by content so the floating-point sum does not depend on the order replies arrived in
    for idx, sc, n in sorted(candidates, key=lambda c: (c[2], c[0].tobytes(), c[1].tobytes())):
        if not sc.size:
            continue
        w, s = n / total, sc.astype(np.float64)
        if mixed:
            floor = float(s.min())  # everything this site did not send scores at most this
            out += w * floor
            np.add.at(out, idx, w * (s - floor))
            continue
        top = float(s.max())
        if top > 0:
            np.add.at(out, idx, w * (s / top))
    return out.astype(np.float32)


def agree_mask(
    config: SHPEFTConfig,
    combined: np.ndarray,
    task_agnostic: Mapping[str, torch.Tensor],
    base_fingerprint: str,
) -> SparseMask:
    """Exactly ``config.budget_for(n_eligible)`` entries by the core's hybrid rule from the combined
    scores of :func:`combine_candidates` (called with the same ``config``)."""
    names, sizes = flatten_layout(task_agnostic)
    n_eligible = sum(sizes)
    if combined.shape != (n_eligible,):
        raise ValueError(f"combined scores have shape {combined.shape}, expected ({n_eligible},)")
    k = budget(config, n_eligible)
    ts, pos = {}, 0
    for n, size in zip(names, sizes):
        ts[n] = torch.from_numpy(combined[pos : pos + size].copy()).view(task_agnostic[n].shape)
        pos += size
    if mixes_at_sites(config):  # the sites' mixed scores already are the hybrid rule's scores
        picked = topk_entries(ts, k, config.threshold)
    else:
        picked = select_indices(config, k, ts, {n: task_agnostic[n] for n in names})
    shapes = {n: tuple(task_agnostic[n].shape) for n in picked}
    mask = SparseMask(picked, shapes, base_fingerprint, meta={"eligible_weights": n_eligible})
    if mask.k != k:  # select_indices guarantees it; a broken guarantee must not go unnoticed
        raise RuntimeError(f"agreed mask has {mask.k} entries, the budget is {k}")
    return mask
