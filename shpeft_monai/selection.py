"""Exact-budget selection: hybrid modes (METHOD.md step 3) and thresholds (step 4).

Every routine returns exactly the requested number of entries, and ties break deterministically
(lower flat index first, tensors in name order), so the same scores always give the same mask.

* ``global``: top-k over all eligible tensors together;
* ``per_tensor``: the budget split over tensors in proportion to their size (largest remainder);
* ``per_row``: the budget split evenly over output rows (GPS-style); rows get ``k // R`` entries
  each and the ``k % R`` rows with the best next entry one more.

``union`` takes ``round(rho * k)`` entries by task-specific importance, then fills the rest by
task-agnostic importance among the entries not yet taken (so duplicates are refilled).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .config import SHPEFTConfig
from .scoring import random_scores, weighted_scores

__all__ = ["select_indices", "topk_entries"]

Scores = Mapping[str, torch.Tensor]
Picked = dict[str, torch.Tensor]


def _flat_topk(v: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k largest entries of a 1-D tensor; ties go to lower positions. Sorted."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.int64)
    if k >= v.numel():
        return torch.arange(v.numel())
    t = torch.kthvalue(v, v.numel() - k + 1).values  # the k-th largest value
    above = torch.nonzero(v > t).squeeze(1)
    ties = torch.nonzero(v == t).squeeze(1)[: k - above.numel()]
    return torch.sort(torch.cat([above, ties])).values


def _masked(scores: Scores, taken: Picked | None) -> dict[str, torch.Tensor]:
    out = {}
    for n, s in scores.items():
        s = s.reshape(-1).float().clone()
        if taken and n in taken and taken[n].numel():
            s[taken[n]] = float("-inf")
        out[n] = s
    return out


def _global(flat: dict[str, torch.Tensor], k: int) -> Picked:
    names = list(flat)
    sizes = [flat[n].numel() for n in names]
    picked = _flat_topk(torch.cat([flat[n] for n in names]), k)
    out, start = {}, 0
    for n, size in zip(names, sizes):
        sel = picked[(picked >= start) & (picked < start + size)] - start
        out[n] = sel
        start += size
    return out


def _allocate(weights: list[int], k: int) -> list[int]:
    """Split k proportionally to weights (largest remainder, ties to earlier), capped by weights."""
    total = sum(weights)
    raw = [k * w / total for w in weights]
    alloc = [int(r) for r in raw]
    order = sorted(range(len(weights)), key=lambda i: (-(raw[i] - alloc[i]), i))
    for i in order[: k - sum(alloc)]:
        alloc[i] += 1
    return [min(a, w) for a, w in zip(alloc, weights)]


def _per_tensor(flat: dict[str, torch.Tensor], k: int) -> Picked:
    names = list(flat)
    avail = [int(torch.isfinite(flat[n]).sum()) for n in names]
    return {n: _flat_topk(flat[n], a) for n, a in zip(names, _allocate(avail, k))}


def _per_row(flat: dict[str, torch.Tensor], shapes: dict[str, torch.Size], k: int) -> Picked:
    rows_of = {n: (shapes[n][0] if len(shapes[n]) > 1 else 1) for n in flat}
    q, r = divmod(k, sum(rows_of.values()))
    out: Picked = {}
    next_best, next_pos = [], []
    for n, v in flat.items():
        m = v.view(rows_of[n], -1)
        vals, cols = torch.sort(m, dim=1, descending=True, stable=True)
        take = min(q, m.shape[1])
        base = torch.arange(m.shape[0]).unsqueeze(1) * m.shape[1]
        chosen = (base + cols[:, :take]).reshape(-1)
        out[n] = chosen[torch.isfinite(vals[:, :take].reshape(-1))]
        if take < m.shape[1]:
            next_best.append(vals[:, take])
            next_pos.append((n, (base.squeeze(1) + cols[:, take])))
        else:
            next_best.append(torch.full((m.shape[0],), float("-inf")))
            next_pos.append((n, torch.full((m.shape[0],), -1)))
    if r:
        extra = _flat_topk(torch.cat(next_best), r)
        offsets = torch.cumsum(torch.tensor([0] + [len(p) for _, p in next_pos]), 0)
        for i, (n, pos) in enumerate(next_pos):
            sel = extra[(extra >= offsets[i]) & (extra < offsets[i + 1])] - offsets[i]
            add = pos[sel]
            out[n] = torch.cat([out[n], add[add >= 0]])
    short = k - sum(int(v.numel()) for v in out.values())
    if short > 0:  # rows shorter than their share, or rows already fully taken: fill globally
        more = _global(_masked(flat, out), short)
        out = {n: torch.cat([out[n], more[n]]) for n in out}
    return {n: torch.sort(v).values for n, v in out.items()}


def topk_entries(scores: Scores, k: int, threshold: str = "global", taken: Picked | None = None) -> Picked:
    """Exactly ``k`` entries by score under a threshold rule, never re-picking ``taken`` ones."""
    flat = _masked(scores, taken)
    available = sum(int(torch.isfinite(v).sum()) for v in flat.values())
    if k > available:
        raise ValueError(f"asked for {k} entries but only {available} are available.")
    if threshold == "global":
        picked = _global(flat, k)
    elif threshold == "per_tensor":
        picked = _per_tensor(flat, k)
    elif threshold == "per_row":
        picked = _per_row(flat, {n: s.shape for n, s in scores.items()}, k)
    else:
        raise ValueError(f"threshold={threshold!r} is not one of ('global', 'per_tensor', 'per_row').")
    got = sum(int(v.numel()) for v in picked.values())
    assert got == k, f"selection returned {got} entries instead of {k}"  # invariant, not input check
    return picked


def select_indices(
    config: SHPEFTConfig,
    k: int,
    task_specific: Scores | None,
    task_agnostic: Scores,
) -> Picked:
    """Apply the configured hybrid mode and threshold; returns sorted flat indices per tensor."""
    mode = config.hybrid
    if mode in ("union", "weighted", "task_specific") and config.needs_task_data and task_specific is None:
        raise ValueError(f"hybrid={mode!r} needs task-specific scores: pass a calibration loader.")
    if (
        mode == "task_agnostic"
        or (mode == "union" and config.rho == 0)
        or (mode == "weighted" and config.lam == 0)
    ):
        picked = topk_entries(task_agnostic, k, config.threshold)
    elif (
        mode == "task_specific"
        or (mode == "union" and config.rho == 1)
        or (mode == "weighted" and config.lam == 1)
    ):
        picked = topk_entries(task_specific, k, config.threshold)
    elif mode == "random":
        picked = topk_entries(random_scores(task_agnostic, config.seed), k, config.threshold)
    elif mode == "weighted":
        mixed = weighted_scores(task_specific, task_agnostic, config.lam, config.normalize)
        picked = topk_entries(mixed, k, config.threshold)
    else:  # union
        k_ts = round(config.rho * k)
        first = topk_entries(task_specific, k_ts, config.threshold)
        second = topk_entries(task_agnostic, k - k_ts, config.threshold, taken=first)
        picked = {n: torch.sort(torch.cat([first[n], second[n]])).values for n in first}
    return {n: v.to(torch.int64) for n, v in picked.items() if v.numel()}
