"""Memory-bounded selection: the masks of :mod:`.selection`, one tensor at a time.

The reference path (:func:`.selection.select_indices`) concatenates every score into one vector,
and the weighted hybrid sorts that vector twice (global ranks). Here each score tensor is produced
on demand (:class:`LazyScores`), reduced to at most ``k`` candidates and dropped; nothing of size
"all eligible weights" is ever allocated beyond the task-specific accumulator itself. The masks are
identical to the reference path in every hybrid mode and threshold (``tests/test_streaming_selection.py``):

* ``global``: a global top-k (ties to the lower position, tensors in name order) is contained in the
  union of the per-tensor top-k under the same order, so a running merge of per-tensor candidates
  keeps at most ``2k`` values;
* ``per_tensor`` and ``per_row`` are per tensor already (their global fills reuse the above);
* weighted hybrid with ``normalize="rank"`` needs global dense ranks, computed exactly without a
  sort of everything by :mod:`._ranks` (value-range chunks for the distinct counts, then exact
  ranks of the upper tails only under the ``global`` threshold; :class:`._ranks.DenseRanks` keeps the
  sorted distinct values, at most one float per entry, for ``per_tensor`` and ``per_row``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch

from ._ranks import DenseRanks, weighted_rank_global
from .config import SHPEFTConfig
from .selection import _allocate, _flat_topk

__all__ = ["LazyScores", "lazy_random_scores", "stream_select", "stream_topk"]

Picked = dict[str, torch.Tensor]


class LazyScores(Mapping[str, torch.Tensor]):
    """Score tensors computed on access, in name order; ``shapes`` known without computing any.

    Example:
        >>> w = {"a": torch.tensor([1.0, -3.0]), "b": torch.tensor([[2.0]])}
        >>> s = LazyScores({n: t.shape for n, t in w.items()}, lambda n: w[n].abs())
        >>> s["a"].tolist(), len(s)
        ([1.0, 3.0], 2)
    """

    def __init__(self, shapes: Mapping[str, torch.Size], fn: Callable[[str], torch.Tensor]) -> None:
        self.shapes = {n: torch.Size(s) for n, s in shapes.items()}
        self._fn = fn

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise KeyError(name)
        return self._fn(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def shapes_of(scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Size]:
    if isinstance(scores, LazyScores):
        return dict(scores.shapes)
    return {n: t.shape for n, t in scores.items()}


def lazy_random_scores(shapes: Mapping[str, torch.Size], seed: int) -> LazyScores:
    """The values of :func:`.scoring.random_scores`, one tensor at a time (generator state per tensor)."""
    gen = torch.Generator().manual_seed(seed)
    states = {}
    for n, s in shapes.items():
        states[n] = gen.get_state()
        torch.rand(s, generator=gen)  # advance exactly as the reference draws

    def draw(name: str) -> torch.Tensor:
        g = torch.Generator()
        g.set_state(states[name])
        return torch.rand(shapes[name], generator=g)

    return LazyScores(shapes, draw)


def _flat(scores: Mapping[str, torch.Tensor], name: str, taken: Picked | None) -> torch.Tensor:
    v = scores[name].reshape(-1).float()
    if taken and name in taken and taken[name].numel():
        v = v.clone()
        v[taken[name]] = float("-inf")
    return v


def _global(scores: Mapping[str, torch.Tensor], k: int, taken: Picked | None) -> Picked:
    names = list(scores)
    best_v = torch.zeros(0)
    best_pos = torch.zeros(0, dtype=torch.int64)
    offsets, off = {}, 0
    for n in names:
        v = _flat(scores, n, taken)
        offsets[n] = off
        sel = _flat_topk(v, min(k, v.numel()))  # candidates, ascending positions
        cand_v = torch.cat([best_v, v[sel]])
        cand_pos = torch.cat([best_pos, sel + off])  # still ascending: earlier tensors first
        keep = _flat_topk(cand_v, min(k, cand_v.numel()))
        best_v, best_pos = cand_v[keep], cand_pos[keep]
        off += v.numel()
        del v
    out: Picked = {}
    for n in names:
        size = scores.shapes[n].numel() if isinstance(scores, LazyScores) else scores[n].numel()
        lo = offsets[n]
        out[n] = best_pos[(best_pos >= lo) & (best_pos < lo + size)] - lo
    return out


def _per_tensor(scores: Mapping[str, torch.Tensor], k: int, taken: Picked | None) -> Picked:
    shapes = shapes_of(scores)
    avail = [s.numel() - (int(taken[n].numel()) if taken and n in taken else 0) for n, s in shapes.items()]
    alloc = _allocate(avail, k)
    return {n: _flat_topk(_flat(scores, n, taken), a) for n, a in zip(shapes, alloc)}


def _per_row(scores: Mapping[str, torch.Tensor], k: int, taken: Picked | None) -> Picked:
    shapes = shapes_of(scores)
    rows_of = {n: (s[0] if len(s) > 1 else 1) for n, s in shapes.items()}
    q, r = divmod(k, sum(rows_of.values()))
    out: Picked = {}
    next_best, next_pos = [], []
    for n in shapes:
        m = _flat(scores, n, taken).view(rows_of[n], -1)
        vals, cols = torch.sort(m, dim=1, descending=True, stable=True)
        take = min(q, m.shape[1])
        base = torch.arange(m.shape[0]).unsqueeze(1) * m.shape[1]
        chosen = (base + cols[:, :take]).reshape(-1)
        out[n] = chosen[torch.isfinite(vals[:, :take].reshape(-1))]
        if take < m.shape[1]:
            next_best.append(vals[:, take].clone())
            next_pos.append(base.squeeze(1) + cols[:, take])
        else:
            next_best.append(torch.full((m.shape[0],), float("-inf")))
            next_pos.append(torch.full((m.shape[0],), -1))
        del m, vals, cols
    if r:
        extra = _flat_topk(torch.cat(next_best), r)
        offsets = torch.cumsum(torch.tensor([0] + [len(p) for p in next_pos]), 0)
        for i, n in enumerate(shapes):
            sel = extra[(extra >= offsets[i]) & (extra < offsets[i + 1])] - offsets[i]
            add = next_pos[i][sel]
            out[n] = torch.cat([out[n], add[add >= 0]])
    short = k - sum(int(v.numel()) for v in out.values())
    if short > 0:  # rows shorter than their share, or rows already fully taken: fill globally
        both = {n: torch.cat([out[n], taken[n]]) if taken and n in taken else out[n] for n in out}
        more = _global(scores, short, both)
        out = {n: torch.cat([out[n], more[n]]) for n in out}
    return {n: torch.sort(v).values for n, v in out.items()}


def stream_topk(
    scores: Mapping[str, torch.Tensor], k: int, threshold: str = "global", taken: Picked | None = None
) -> Picked:
    """:func:`.selection.topk_entries` (same result) with one score tensor alive at a time."""
    shapes = shapes_of(scores)
    available = sum(s.numel() for s in shapes.values()) - sum(
        int(taken[n].numel()) for n in shapes if taken and n in taken
    )
    if k > available:
        raise ValueError(f"asked for {k} entries but only {available} are available.")
    if threshold == "global":
        picked = _global(scores if isinstance(scores, LazyScores) else dict(scores), k, taken)
    elif threshold == "per_tensor":
        picked = _per_tensor(scores, k, taken)
    elif threshold == "per_row":
        picked = _per_row(scores, k, taken)
    else:
        raise ValueError(f"threshold={threshold!r} is not one of ('global', 'per_tensor', 'per_row').")
    got = sum(int(v.numel()) for v in picked.values())
    assert got == k, f"selection returned {got} entries instead of {k}"  # invariant, not input check
    return picked


def _weighted_max(ts: Mapping[str, torch.Tensor], ta: Mapping[str, torch.Tensor], lam: float) -> LazyScores:
    def top(s: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([s[n].float().max() for n in s]).max()

    t_ts, t_ta = top(ts), top(ta)

    def mix(name: str) -> torch.Tensor:
        a, b = ts[name].float(), ta[name].float()
        a = a / t_ts if t_ts > 0 else torch.zeros_like(a)
        b = b / t_ta if t_ta > 0 else torch.zeros_like(b)
        return lam * a + (1.0 - lam) * b

    return LazyScores(shapes_of(ta), mix)


def _weighted_rank(ts: Mapping[str, torch.Tensor], ta: Mapping[str, torch.Tensor], lam: float) -> LazyScores:
    r_ts, r_ta = DenseRanks(ts, keep=True), DenseRanks(ta, keep=True)

    def mix(name: str) -> torch.Tensor:
        return lam * r_ts.normalized(ts[name]) + (1.0 - lam) * r_ta.normalized(ta[name])

    return LazyScores(shapes_of(ta), mix)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block (restored after).

    The selection scans make tens of thousands of small ops (slices of 256Ki entries). With several
    threads each op waits at a barrier for all of them, and on a busy machine one of them is often
    descheduled: ViT-S/14 selection took 229 s on a loaded 2-core machine with 2 threads and 17 s
    with one. Idle, one thread is slower (ViT-B/16 scans 58 s against 44 to 50 s; README, Selection
    cost). The masks do not depend on it. Also a decorator.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@one_thread()
def stream_select(
    config: SHPEFTConfig,
    k: int,
    task_specific: Mapping[str, torch.Tensor] | None,
    task_agnostic: Mapping[str, torch.Tensor],
) -> Picked:
    """:func:`.selection.select_indices` (same masks), memory-bounded; scores may be :class:`LazyScores`.

    Runs on one thread (:func:`one_thread`)."""
    mode, thr = config.hybrid, config.threshold
    if mode in ("union", "weighted", "task_specific") and config.needs_task_data and task_specific is None:
        raise ValueError(f"hybrid={mode!r} needs task-specific scores: pass a calibration loader.")
    if (
        mode == "task_agnostic"
        or (mode == "union" and config.rho == 0)
        or (mode == "weighted" and config.lam == 0)
    ):
        picked = stream_topk(task_agnostic, k, thr)
    elif (
        mode == "task_specific"
        or (mode == "union" and config.rho == 1)
        or (mode == "weighted" and config.lam == 1)
    ):
        picked = stream_topk(task_specific, k, thr)
    elif mode == "random":
        picked = stream_topk(lazy_random_scores(shapes_of(task_agnostic), config.seed), k, thr)
    elif mode == "weighted" and config.normalize == "max":
        picked = stream_topk(_weighted_max(task_specific, task_agnostic, config.lam), k, thr)
    elif mode == "weighted" and thr == "global":
        picked = weighted_rank_global(task_specific, task_agnostic, config.lam, k)
    elif mode == "weighted":
        picked = stream_topk(_weighted_rank(task_specific, task_agnostic, config.lam), k, thr)
    else:  # union
        k_ts = round(config.rho * k)
        first = stream_topk(task_specific, k_ts, thr)
        second = stream_topk(task_agnostic, k - k_ts, thr, taken=first)
        picked = {n: torch.sort(torch.cat([first[n], second[n]])).values for n in first}
    return {n: v.to(torch.int64) for n, v in picked.items() if v.numel()}
