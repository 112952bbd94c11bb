"""Label-skewed, grouped split of one datalist over simulated sites (simulation and demo deployment).

A real federation never needs this: each hospital lists its own images. The simulation driver and
the loopback deployment write one bundle datalist per site from the Br35H split with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["site_datalists", "site_partition"]


def site_partition(
    records: Sequence[Mapping[str, Any]], num_sites: int, *, skew: float = 0.6, seed: int = 0
) -> list[list[dict[str, Any]]]:
    """Label-skewed, grouped split of ``records`` over ``num_sites`` sites.

    Site ``i`` receives a share of class ``c`` proportional to ``linspace(1 - skew, 1 + skew)`` over the
    sites, reversed for every other class and rotated for more than two classes (for two classes and three sites with skew 0.6: 13/33/53 % of class 0 and
    53/33/13 % of class 1). Whole near-duplicate groups (the ``group`` key; a record without one is its
    own group) are assigned, largest deficit first, so no group crosses sites.
    """
    if num_sites < 1 or not 0 <= skew < 1:
        raise ValueError(f"num_sites={num_sites} must be >= 1 and skew={skew} in [0, 1)")
    rng = np.random.default_rng(seed)
    groups: dict[Any, list[dict[str, Any]]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.get("group", f"_single{i}"), []).append(dict(r))
    by_class: dict[int, list[Any]] = {}
    for g, members in groups.items():
        by_class.setdefault(int(members[0]["label"]), []).append(g)
    base = np.linspace(1 - skew, 1 + skew, num_sites) if num_sites > 1 else np.ones(1)
    sites: list[list[dict[str, Any]]] = [[] for _ in range(num_sites)]
    classes = sorted(by_class)
    for ci, c in enumerate(classes):
        share = np.roll(base if ci % 2 == 0 else base[::-1], ci // 2)
        share = share / share.sum()
        gs = sorted(by_class[c], key=str)
        order = rng.permutation(len(gs))
        total = sum(len(groups[g]) for g in gs)
        target = share * total
        have = np.zeros(num_sites)
        # largest groups first for a tight fit; the shuffle breaks ties among equal sizes (stable sort)
        for j in sorted(order, key=lambda j: -len(groups[gs[j]])):
            site = int(np.argmax(target - have))
            sites[site] += groups[gs[j]]
            have[site] += len(groups[gs[j]])
    return [sorted(s, key=lambda r: r["image"]) for s in sites]


def site_datalists(
    out: str | Path,
    n: int,
    *,
    train_per_site: int = 0,
    val_per_site: int = 0,
    skew: float = 0.6,
    seed: int = 0,
    source: str = "br35h",
) -> list[Path]:
    """One bundle datalist JSON per site (``training`` and ``validation``) from ``source``'s split:
    a stand-in for the lists each hospital writes for its own images."""
    from shpeft_monai.data import load_split, subsample
    from shpeft_monai.io import write_json

    splits = load_split(source)
    train = site_partition(splits["train"], n, skew=skew, seed=seed)
    val = site_partition(splits["validation"], n, skew=skew, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        t, v = train[i], val[i]
        if train_per_site and len(t) > train_per_site:
            t = subsample(t, train_per_site, seed=seed)
        if val_per_site and len(v) > val_per_site:
            v = subsample(v, val_per_site, seed=seed)
        p = out / f"site{i}.json"
        write_json(p, {"training": t, "validation": v})
        paths.append(p)
    return paths
