"""Exact global dense ranks of scores that are never concatenated (for the weighted hybrid).

:func:`.scoring.normalize_scores` gives every entry ``rank / (D - 1)``, where ``rank`` is the number
of distinct values below it over all tensors and ``D`` the number of distinct values. Both are
computed here without one vector of all scores: non-negative float32 values sort like their bit
patterns, so a histogram of the high 16 bits splits the value range into chunks of bounded size, and
each chunk's distinct values come from one pass over the tensors (``torch.unique`` of that chunk
only). :class:`DenseRanks` counts them, or keeps them for rank look-ups (at most one float per
entry, fewer with ties).
:func:`weighted_rank_global` needs only the counts plus the exact ranks of the upper tails of both
scores, grown until a bound proves that no entry outside them can reach the top-k. The float32
arithmetic is the reference's, so the masks are identical.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .selection import _flat_topk

__all__ = ["DenseRanks", "weighted_rank_global"]

_BINS = 1 << 15  # high 16 bits of a non-negative float32


def _bits_hi(v: torch.Tensor) -> torch.Tensor:
    return v.view(torch.int32) >> 16


def _flat(scores: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    return scores[name].reshape(-1).float().contiguous()


def _histogram(scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Entries per high-16-bit bin; refuses negative scores (their bits do not sort like values)."""
    hist = torch.zeros(_BINS, dtype=torch.int64)
    for n in scores:
        v = _flat(scores, n)
        if v.numel() and bool(v.min() < 0):
            raise ValueError(f"rank normalisation expects non-negative scores; {n!r} has negative values.")
        hist += torch.bincount(_bits_hi(v).long(), minlength=_BINS)
    return hist


def _norm(rank: torch.Tensor, denom: float) -> torch.Tensor:
    """The reference's float32 arithmetic: ``(cumsum.float() - 1) / denom`` with ``cumsum = rank + 1``."""
    return ((rank + 1).float() - 1) / denom


def _denominator(distinct: int) -> float:
    return max(float((torch.tensor([distinct]).float() - 1)[0]), 1.0)


class DenseRanks:
    """Global dense ranks of lazily produced non-negative scores, by value-range chunks.

    Args:
        scores: name -> tensor (a dict or :class:`.streaming.LazyScores`), read a few times.
        keep: keep the distinct values for :meth:`rank` (else only :attr:`distinct` is counted).
        chunk: entries gathered at once (default: a 64th of all entries, at least 1 Mi: each chunk
            costs one more pass over the scores, and its sort is the peak of the whole selection).
    """

    def __init__(
        self, scores: Mapping[str, torch.Tensor], keep: bool = True, chunk: int | None = None
    ) -> None:
        self.hist = _histogram(scores)
        self._keep = keep
        self.starts: list[int] = []
        self.values: list[torch.Tensor] = []
        self.offsets: list[int] = []
        total = int(self.hist.sum())
        chunk = chunk or max(1 << 20, total // 64)
        bins = torch.nonzero(self.hist).squeeze(1).tolist()
        groups: list[tuple[int, int]] = []
        size = 0
        for b in bins:
            if not groups or size + int(self.hist[b]) > chunk:
                groups.append((b, b + 1))
                size = 0
            groups[-1] = (groups[-1][0], b + 1)
            size += int(self.hist[b])
        distinct = 0
        for lo, hi in groups:
            parts = []
            for n in scores:
                v = _flat(scores, n)
                h = _bits_hi(v)
                parts.append(v[(h >= lo) & (h < hi)])
            u = torch.unique(torch.cat(parts))
            del parts
            self.starts.append(lo)
            self.offsets.append(distinct)
            if keep:
                self.values.append(u)
            distinct += int(u.numel())
        self.distinct = distinct
        self.denom = _denominator(distinct)

    def rank(self, t: torch.Tensor) -> torch.Tensor:
        """Dense rank (int64) of every entry of ``t`` among all the scores' distinct values."""
        if not self._keep:
            raise RuntimeError("DenseRanks(keep=False) only counts; build it with keep=True to rank.")
        v = t.reshape(-1).float().contiguous()
        cid = torch.searchsorted(torch.tensor(self.starts, dtype=torch.int32), _bits_hi(v), right=True) - 1
        out = torch.empty(v.numel(), dtype=torch.int64)
        for c in torch.unique(cid).tolist():
            m = cid == c
            out[m] = self.offsets[c] + torch.searchsorted(self.values[c], v[m])
        return out.view(t.shape)

    def normalized(self, t: torch.Tensor) -> torch.Tensor:
        """:func:`.scoring.normalize_scores` (``rank``) of the entries of ``t``, float32."""
        return _norm(self.rank(t), self.denom)


def _tail(
    scores: Mapping[str, torch.Tensor], names: list[str], hist: torch.Tensor, distinct: int, m: int
) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """Global positions (ascending) and exact dense ranks of the entries in the top bins holding
    at least ``m`` entries; and the largest rank outside them (None when nothing is outside)."""
    from_top = torch.flip(torch.cumsum(torch.flip(hist, (0,)), 0), (0,))
    ok = torch.nonzero(from_top >= m).squeeze(1)
    b0 = int(ok[-1]) if ok.numel() else 0
    vals, pos, off = [], [], 0
    for n in names:
        v = _flat(scores, n)
        idx = torch.nonzero(_bits_hi(v) >= b0).squeeze(1)
        vals.append(v[idx])
        pos.append(idx + off)
        off += v.numel()
    values, positions = torch.cat(vals), torch.cat(pos)
    u = torch.unique(values)
    below = distinct - int(u.numel())
    ranks = below + torch.searchsorted(u, values)
    outside = int(hist[:b0].sum()) > 0
    return positions, ranks, (below - 1 if outside else None)


def weighted_rank_global(
    ts: Mapping[str, torch.Tensor], ta: Mapping[str, torch.Tensor], lam: float, k: int
) -> dict[str, torch.Tensor]:
    """Top-k of ``lam * rank_norm(ts) + (1 - lam) * rank_norm(ta)`` over all tensors, exactly as
    :func:`.selection.select_indices` (weighted, rank, global) returns it."""
    names = list(ta)
    sizes = {n: (ta.shapes[n].numel() if hasattr(ta, "shapes") else ta[n].numel()) for n in names}
    total = sum(sizes.values())
    r_ts, r_ta = DenseRanks(ts, keep=False), DenseRanks(ta, keep=False)
    top_ts = _norm(torch.tensor([r_ts.distinct - 1]), r_ts.denom)
    top_ta = _norm(torch.tensor([r_ta.distinct - 1]), r_ta.denom)
    m = min(total, max(4 * k, int(2 * math.sqrt(k * total))))
    while True:
        pos_ts, rank_ts, out_ts = _tail(ts, names, r_ts.hist, r_ts.distinct, m)
        pos_ta, rank_ta, out_ta = _tail(ta, names, r_ta.hist, r_ta.distinct, m)
        # both position lists ascend: intersect by binary search (torch.isin sorts both, 4x the memory)
        j = torch.searchsorted(pos_ta, pos_ts).clamp_(max=max(pos_ta.numel() - 1, 0))
        both = pos_ta[j] == pos_ts if pos_ta.numel() else torch.zeros_like(pos_ts, dtype=torch.bool)
        cand, j = pos_ts[both], j[both]
        if cand.numel() >= k:
            mixed = lam * _norm(rank_ts[both], r_ts.denom) + (1.0 - lam) * _norm(rank_ta[j], r_ta.denom)
            sel = _flat_topk(mixed, k)
            tau = float(mixed[sel].min())
            bounds = [float("-inf")]
            if out_ts is not None:  # best an entry below the ts tail can score
                bounds.append(float(lam * _norm(torch.tensor([out_ts]), r_ts.denom) + (1.0 - lam) * top_ta))
            if out_ta is not None:
                bounds.append(float(lam * top_ts + (1.0 - lam) * _norm(torch.tensor([out_ta]), r_ta.denom)))
            if tau > max(bounds):  # strictly: an outside tie at a lower position would win
                picked = cand[sel]
                break
        if m >= total:
            raise AssertionError("weighted rank selection found fewer than k candidates in all entries")
        m = min(total, 4 * m)
    out, start = {}, 0
    for n in names:
        out[n] = picked[(picked >= start) & (picked < start + sizes[n])] - start
        start += sizes[n]
    return out
