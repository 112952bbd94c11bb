"""The plan of a suite: which runs (method x learning rate x seed, ablation points) are needed.

Each method first runs seed ``cfg.seeds[0]`` at every learning rate of its grid; once those are
finished, the other seeds run at the rate that won on validation (ties: the smaller rate), and the
seed-0 run at that rate is one of the seeds. SH-PEFT's grid is the recipe's single rate (it was chosen
on validation by the recipe search). The ablations centre on the SH-PEFT row with the best mean
validation score, at its learning rate, and run ``cfg.ablation_seeds``; an ablation point equal to the
centre is the centre's run (same key), not a new one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import (
    HYBRIDS,
    SuiteConfig,
    ablation_specs,
    lr_grid,
    method_spec,
    shpeft_settings,
)

__all__ = ["RunSpec", "ablation_centre", "chosen_lr", "plan_runs", "val_key"]


@dataclass(frozen=True)
class RunSpec:
    """One training run: a method (with its SH-PEFT settings) on one network, learning rates and seed."""

    label: str  # table row, e.g. "shpeft" or "lam=0.25"
    group: str  # "lr_search", "methods" or the ablation's name
    network: str
    method: str
    shpeft: dict[str, Any] = field(default_factory=dict)  # complete SH-PEFT settings (method "shpeft")
    warmup: bool = True
    seed: int = 0
    lr: float = 1e-4  # the trained weights besides the head (the head itself for the linear probe)
    lr_head: float = 1e-2

    @property
    def key(self) -> str:
        """Identity of the training run: equal settings share one run whatever the row they fill."""
        body = [self.network, self.method, self.shpeft, self.warmup, self.seed, self.lr, self.lr_head]
        return hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]


def val_key(m: dict[str, Any]) -> tuple[float, float]:
    """Validation ordering: the bundle's selection score (mean of AUC and balanced accuracy, so a
    collapsed model never wins; balanced accuracy alone when AUC is undefined), then accuracy.
    Results without balanced accuracy (the historical JSON files) use accuracy in its place."""
    from shpeft_monai.handlers.validation import selection_score

    auc = m.get("roc_auc")
    bacc = m.get("balanced_accuracy", m.get("accuracy"))
    score, _ = selection_score(
        {"val_auc": float("nan") if auc is None else auc, "val_balanced_accuracy": bacc}
    )
    return (score, m["accuracy"])


def chosen_lr(results: dict[str, dict[str, Any]], specs: list[RunSpec]) -> float | None:
    """The grid point whose seed-0 run scored best on validation (None until all have run)."""
    if not all(s.key in results for s in specs):
        return None
    best = max(specs, key=lambda s: (val_key(results[s.key]["val"]), -s.lr))  # ties: the smaller lr
    return best.lr


def _spec(cfg: SuiteConfig, name: str, group: str, seed: int, lr: float) -> RunSpec:
    network, method, overrides = method_spec(name, cfg)
    shpeft = shpeft_settings(cfg, overrides) if method == "shpeft" else {}
    lr_head = lr if method == "linear_probe" else float(cfg.recipe["lr_head"])
    return RunSpec(name, group, network, method, shpeft, True, seed, lr, lr_head)


def plan_runs(cfg: SuiteConfig, results: dict[str, dict[str, Any]] | None = None) -> list[RunSpec]:
    """Every run the suite needs given the finished ``results`` (by run key)."""
    results = results or {}
    runs: list[RunSpec] = []
    s0 = cfg.seeds[0]
    hybrids: dict[str, list[RunSpec]] = {}
    for name in cfg.methods:
        _, method, _ = method_spec(name, cfg)
        grid = [_spec(cfg, name, "lr_search", s0, lr) for lr in lr_grid(cfg, name, method)]
        runs += grid
        lr = chosen_lr(results, grid)
        if lr is None:
            continue
        seeds = [_spec(cfg, name, "methods", s, lr) for s in cfg.seeds]
        runs += seeds
        if name in HYBRIDS:
            hybrids[name] = seeds
    centre = ablation_centre(cfg, hybrids, results)
    if centre is None or not cfg.ablations:
        return runs
    for abl in cfg.ablations:
        for label, overrides, warm in ablation_specs(abl, centre.shpeft["hybrid"]):
            shpeft = shpeft_settings(cfg, {**_centre_overrides(centre), **overrides})
            runs += [
                RunSpec(label, abl, centre.network, "shpeft", shpeft, warm, s, centre.lr, centre.lr_head)
                for s in cfg.ablation_seeds
            ]
    return runs


def _centre_overrides(centre: RunSpec) -> dict[str, Any]:
    keep = ("hybrid", "rho", "lam", "budget", "task_estimator", "threshold", "calibration_batches")
    return {k: centre.shpeft[k] for k in keep if k in centre.shpeft}


def ablation_centre(
    cfg: SuiteConfig, hybrids: dict[str, list[RunSpec]], results: dict[str, dict[str, Any]]
) -> RunSpec | None:
    """The seed-0 run of the SH-PEFT row (among ``cfg.methods``) with the best mean validation
    (ROC-AUC, accuracy) over its seeds; None while some of them are pending. Without an SH-PEFT row in
    the suite: the recipe's hybrid at the recipe's learning rate."""
    wanted = [h for h in HYBRIDS if h in cfg.methods]
    if not wanted:
        return _spec(cfg, "shpeft", "centre", cfg.seeds[0], float(cfg.recipe["lr_selected"]))
    if any(h not in hybrids or any(s.key not in results for s in hybrids[h]) for h in wanted):
        return None

    def score(h: str) -> tuple[float, float]:
        keys = [val_key(results[s.key]["val"]) for s in hybrids[h]]
        return float(np.mean([k[0] for k in keys])), float(np.mean([k[1] for k in keys]))

    return hybrids[max(wanted, key=score)][0]
