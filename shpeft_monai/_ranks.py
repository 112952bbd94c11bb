"""Exact global dense ranks of scores that are never concatenated (for the weighted hybrid).

:func:`.scoring.normalize_scores` gives every entry ``rank / (D - 1)``, where ``rank`` is the number
of distinct values below it over all tensors and ``D`` the number of distinct values. Both are
computed here without one vector of all scores: non-negative float32 values sort like their bit
patterns, so a histogram of the high 16 bits splits the value range into chunks of bounded size, and
each chunk's distinct values come from one pass over the tensors (``torch.unique`` of that chunk
only). :class:`DenseRanks` counts them, or keeps them for rank look-ups (at most one float per
entry, fewer with ties).
:func:`weighted_rank_global` needs only the exact ranks of the upper tail of the score with the larger
weight, and the exact ranks of the other score at those entries alone (answered during that score's
counting pass), the tail grown until a bound proves that no entry outside it can reach the top-k.
The float32 arithmetic is the reference's, so the masks are identical.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch

from .selection import _flat_topk

__all__ = ["DenseRanks", "weighted_rank_global"]

_BINS = 1 << 15  # high 16 bits of a non-negative float32
# Entries scanned at once: every temporary of a scan (bits, masks) is one slice, so the allocator
# reuses the same few blocks instead of tensor-sized ones that fragment the heap and stay resident
# (the forward-only selection's peak on ViT-B/16: benchmarks/selection_cost, README).
_SLICE = 1 << 18


def _bits_hi(v: torch.Tensor) -> torch.Tensor:
    return v.view(torch.int32) >> 16


def _flat(scores: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    return scores[name].reshape(-1).float().contiguous()


def _slices(v: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, view)`` over ``v`` in :data:`_SLICE`-entry views (no copies)."""
    for start in range(0, v.numel(), _SLICE):
        yield start, v[start : start + _SLICE]


def _in_bins(
    scores: Mapping[str, torch.Tensor], names: list[str], lo: int, hi: int, size: int, positions: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every entry whose high bits lie in ``[lo, hi)`` (tensors in ``names`` order, ascending by
    position; ``size`` of them, known from the histogram), and with ``positions`` their global
    positions, gathered slice by slice into buffers allocated once."""
    values = torch.empty(size)
    where = torch.empty(size, dtype=torch.int64) if positions else None
    at = off = 0
    for n in names:
        v = _flat(scores, n)
        for start, part in _slices(v):
            h = _bits_hi(part)
            idx = torch.nonzero((h >= lo) & (h < hi)).squeeze(1)
            values[at : at + idx.numel()] = part[idx]
            if where is not None:
                where[at : at + idx.numel()] = idx + (off + start)
            at += idx.numel()
        off += v.numel()
    if at != size:
        raise RuntimeError("scores changed between two reads; selection needs deterministic scores.")
    return values, where


def _histogram(scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Entries per high-16-bit bin; refuses negative scores (their bits do not sort like values)."""
    hist = torch.zeros(_BINS, dtype=torch.int64)
    for n in scores:
        for _, v in _slices(_flat(scores, n)):
            if bool(v.min() < 0):
                raise ValueError(
                    f"rank normalisation expects non-negative scores; {n!r} has negative values."
                )
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
        queries: values (each one of the scores' entries) whose dense ranks :attr:`query_ranks`
            answers from the same pass, without keeping the distinct values.
    """

    def __init__(
        self,
        scores: Mapping[str, torch.Tensor],
        keep: bool = True,
        chunk: int | None = None,
        queries: torch.Tensor | None = None,
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
        q = queries.reshape(-1).float().contiguous() if queries is not None else torch.zeros(0)
        q_bits = _bits_hi(q)
        self.query_ranks = torch.zeros(q.numel(), dtype=torch.int64)
        distinct = 0
        for lo, hi in groups:
            values, _ = _in_bins(scores, list(scores), lo, hi, int(self.hist[lo:hi].sum()))
            u = torch.unique(values)
            if q.numel():
                in_chunk = (q_bits >= lo) & (q_bits < hi)
                self.query_ranks[in_chunk] = distinct + torch.searchsorted(u, q[in_chunk])
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
    values, positions = _in_bins(scores, names, b0, _BINS, int(hist[b0:].sum()), positions=True)
    u = torch.unique(values)
    below = distinct - int(u.numel())
    ranks = below + torch.searchsorted(u, values)
    outside = int(hist[:b0].sum()) > 0
    return positions, ranks, (below - 1 if outside else None)


def _split(positions: torch.Tensor, sizes: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Ascending global positions (tensors in name order) as positions inside each tensor."""
    out, start = {}, 0
    for n, size in sizes.items():
        out[n] = positions[(positions >= start) & (positions < start + size)] - start
        start += size
    return out


def _gather(scores: Mapping[str, torch.Tensor], local: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Values of the scores at per-tensor positions (one tensor at a time), in name order."""
    parts = [_flat(scores, n)[i] for n, i in local.items()]
    return torch.cat(parts) if parts else torch.zeros(0)


def weighted_rank_global(
    ts: Mapping[str, torch.Tensor], ta: Mapping[str, torch.Tensor], lam: float, k: int
) -> dict[str, torch.Tensor]:
    """Top-k of ``lam * rank_norm(ts) + (1 - lam) * rank_norm(ta)`` over all tensors, exactly as
    :func:`.selection.select_indices` (weighted, rank, global) returns it.

    Candidates are the upper tail of the score with the larger weight (ts when ``lam >= 0.5``), each
    scored exactly (the other score's ranks at those entries come from its counting pass); an entry
    outside the tail scores at most ``weight * (its rank bound) + (1 - weight) * 1``, so the tail
    grows until the k-th candidate beats that.
    """
    names = list(ta)
    sizes = {n: (ta.shapes[n].numel() if hasattr(ta, "shapes") else ta[n].numel()) for n in names}
    total = sum(sizes.values())
    main_is_ts = lam >= 0.5
    main, other = (ts, ta) if main_is_ts else (ta, ts)
    r_main = DenseRanks(main, keep=False)
    m = min(total, max(4 * k, int(2 * math.sqrt(k * total))))
    while True:
        pos, rank_main, out_main = _tail(main, names, r_main.hist, r_main.distinct, m)
        r_other = DenseRanks(other, keep=False, queries=_gather(other, _split(pos, sizes)))
        n_main, n_other = _norm(rank_main, r_main.denom), _norm(r_other.query_ranks, r_other.denom)
        n_ts, n_ta = (n_main, n_other) if main_is_ts else (n_other, n_main)
        mixed = lam * n_ts + (1.0 - lam) * n_ta  # the reference's expression, term for term
        sel = _flat_topk(mixed, k)
        if out_main is None:  # the tail holds every entry
            picked = pos[sel]
            break
        # the best an outside entry can score, in the same float32 operations (each is monotone)
        b_main = _norm(torch.tensor([out_main]), r_main.denom)
        b_other = _norm(torch.tensor([r_other.distinct - 1]), r_other.denom)
        b_ts, b_ta = (b_main, b_other) if main_is_ts else (b_other, b_main)
        bound = float((lam * b_ts + (1.0 - lam) * b_ta)[0])
        if float(mixed[sel].min()) > bound:  # strictly: an outside tie at a lower position would win
            picked = pos[sel]
            break
        m = min(total, 4 * m)
    return _split(picked, sizes)
