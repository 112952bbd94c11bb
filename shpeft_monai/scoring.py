"""Importance scores of SH-PEFT (METHOD.md section 2, steps 1 to 3).

* task-specific: gradient statistics from a calibration pass (:mod:`.calibration`), L1 ``sum|g|`` or
  L2 ``sum g^2``, optionally the first-order Taylor term ``|g*w|`` / ``(g*w)^2``;
* task-agnostic: the pretrained weight's magnitude, L1 ``|w|`` or L2 ``w^2`` (no data);
* hybrid ``weighted``: ``lam * norm(I_ts) + (1 - lam) * norm(I_ta)`` with a global normalisation
  (rank in [0, 1], or division by the maximum) that makes the two scales comparable.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = [
    "accumulate_gradient",
    "normalize_scores",
    "random_scores",
    "task_agnostic_scores",
    "weighted_scores",
]

Scores = dict[str, torch.Tensor]


def task_agnostic_scores(params: Mapping[str, torch.Tensor], estimator: str = "l1") -> Scores:
    """``|w|`` (l1) or ``w**2`` (l2) of each pretrained tensor, float32 on CPU."""
    out: Scores = {}
    for name, p in params.items():
        w = p.detach().to("cpu", torch.float32)
        _check_finite(name, w, "pretrained weight")
        out[name] = w.abs() if estimator == "l1" else w.square()
    return out


def accumulate_gradient(
    acc: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, estimator: str, taylor: bool
) -> None:
    """Add one batch's contribution to a task-specific accumulator, in place."""
    g = grad.detach().float()
    if taylor:
        g = g * weight.detach().float()
    acc.add_(g.abs() if estimator == "l1" else g.square())


def random_scores(params: Mapping[str, torch.Tensor], seed: int) -> Scores:
    """Uniform random scores (the random-mask reference), reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=gen) for n, p in params.items()}


def normalize_scores(scores: Mapping[str, torch.Tensor], method: str = "rank") -> Scores:
    """Put scores on [0, 1] globally: ``rank`` (ties share the lowest rank) or ``max``."""
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).float() for n in names])
    if method == "max":
        top = flat.max()
        flat = flat / top if top > 0 else torch.zeros_like(flat)
    else:
        # Dense rank via sorting (stable, so ties are deterministic), scaled to [0, 1].
        order = torch.sort(flat, stable=True).indices
        sorted_vals = flat[order]
        new_group = torch.ones_like(sorted_vals, dtype=torch.bool)
        new_group[1:] = sorted_vals[1:] != sorted_vals[:-1]
        ranks_sorted = torch.cumsum(new_group, 0).float() - 1
        denom = max(float(ranks_sorted[-1]), 1.0)
        flat = torch.empty_like(flat).index_copy_(0, order, ranks_sorted / denom)
    out, pos = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = flat[pos : pos + size].view(scores[n].shape)
        pos += size
    return out


def weighted_scores(ts: Scores, ta: Scores, lam: float, method: str = "rank") -> Scores:
    """``lam * norm(ts) + (1 - lam) * norm(ta)``."""
    nts, nta = normalize_scores(ts, method), normalize_scores(ta, method)
    return {n: lam * nts[n] + (1.0 - lam) * nta[n] for n in ts}


def _check_finite(name: str, t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise FloatingPointError(
            f"{what} {name!r} has {bad} NaN/Inf entries; check the checkpoint (or the calibration "
            "data and learning rate) before selecting weights."
        )
