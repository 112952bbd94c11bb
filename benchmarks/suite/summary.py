"""From finished runs to table rows: mean ± sd over seeds, grouped intervals, paired differences.

The statistics are :mod:`benchmarks.stats` (pure numpy): a cluster bootstrap over the test split's
groups (near-duplicates for Br35H, identical files for the user's data) for each row's seed-averaged
test accuracy, and paired differences, SH-PEFT minus each peer, over the seeds both ran. Runs made by
an older suite carry no per-sample predictions: their rows have no interval (``None``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.stats import grouped_bootstrap, mean_sd, paired_difference

from .config import HYBRIDS
from .plan import RunSpec, val_key

__all__ = ["correctness", "lr_choices", "paired_rows", "summarize", "table_rows", "winners"]


def table_rows(results: list[dict[str, Any]], plan: list[RunSpec]) -> list[dict[str, Any]]:
    """Each planned run's result under the row (group, label) it fills; a run may fill several."""
    by_key = {r["key"]: r for r in results}
    out = []
    for s in plan:
        if s.key in by_key:
            label = f"{s.label} @ lr={s.lr:g}" if s.group == "lr_search" else s.label
            out.append({**by_key[s.key], "group": s.group, "label": label})
    return out


def correctness(
    runs: Sequence[dict[str, Any]], test_items: Sequence[dict[str, Any]] | None
) -> np.ndarray | None:
    """``(S, N)`` 0/1 correctness of the runs' saved test predictions, or None when any is missing."""
    if not test_items or not runs:
        return None
    labels = np.asarray([int(d["label"]) for d in test_items])
    preds = [r.get("test_pred") for r in runs]
    if any(p is None or len(p) != labels.size for p in preds):
        return None
    return (np.asarray(preds) == labels[None, :]).astype(float)


def _grouped(
    rows: dict[tuple[str, str], list[dict[str, Any]]],
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in rows.items()}


def summarize(
    results: list[dict[str, Any]], test_items: Sequence[dict[str, Any]] | None = None, n_boot: int = 2000
) -> list[dict[str, Any]]:
    """One row per (group, label): per-seed and mean ± sd metrics, the grouped 95 % interval of test
    accuracy with its number of groups, costs as ratios to full fine-tuning of the same network."""
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        rows.setdefault((r["group"], r["label"]), []).append(r)
    rows = _grouped(rows)
    full: dict[str, dict[str, list]] = {}
    for r in results:
        if r["method"] == "full" and r["group"] == "methods":
            f = full.setdefault(r["network"], {"t": [], "m": []})
            f["t"].append(r["step_time_s"])
            f["m"].append(r["peak_memory_bytes"])
    ref = {n: (mean_sd(v["t"])[0], mean_sd(v["m"])[0]) for n, v in full.items()}
    groups = [d["group"] for d in test_items] if test_items else None
    out = []
    for (group, label), rs in rows.items():
        r0 = rs[0]
        row: dict[str, Any] = {
            "group": group,
            "label": label,
            "network": r0["network"],
            "method": r0["method"],
            "seeds": [r["seed"] for r in rs],
            "keys": [r["key"] for r in rs],
            "test_accuracy_per_seed": [r["test"]["accuracy"] for r in rs],
        }
        for split in ("val", "test"):
            for m in ("accuracy", "f1_macro", "roc_auc"):
                row[f"{split}_{m}"] = mean_sd([r[split][m] for r in rs])
        correct = correctness(rs, test_items)
        row["test_accuracy_ci"] = (
            None if correct is None else grouped_bootstrap(correct, groups, n_boot=n_boot)
        )
        row["test_accuracy_ci_files"] = (
            None if correct is None else grouped_bootstrap(correct, range(correct.shape[1]), n_boot=n_boot)
        )
        for k in ("selected_backbone_weights", "head_parameters", "share_of_backbone", "artefact_bytes"):
            row[k] = r0[k]
        for k in ("step_time_s", "peak_memory_bytes", "selection_s", "head_warmup_s"):
            row[k] = mean_sd([r.get(k) for r in rs])[0]
        t_ref, m_ref = ref.get(r0["network"], (float("nan"), float("nan")))
        row["time_vs_full"] = row["step_time_s"] / t_ref if t_ref and t_ref == t_ref else None
        mem = row["peak_memory_bytes"]
        row["memory_vs_full"] = mem / m_ref if m_ref and m_ref == m_ref and mem and mem == mem else None
        row["chosen_epochs"] = [r["chosen_epoch"] for r in rs]
        row["lr"] = r0["lr"]
        row["lr_head"] = r0.get("lr_head")
        out.append(row)
    return out


def _val_order(row: dict[str, Any]) -> tuple[float, float]:
    return val_key({"roc_auc": row["val_roc_auc"][0], "accuracy": row["val_accuracy"][0]})


def _reference(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The SH-PEFT row the paired differences start from: among the hybrid rows (``shpeft``, the
    recipe; older suites: union and weighted), the one with the best mean validation score."""
    hybrids = [r for r in rows if r["group"] == "methods" and r["label"] in HYBRIDS]
    return max(hybrids, key=_val_order) if hybrids else None


def _pair(a: dict[str, Any], b: dict[str, Any], by_key: dict[str, dict], items: Sequence[dict], n_boot: int):
    seeds = sorted(set(a["seeds"]) & set(b["seeds"]))
    if not seeds:
        return None
    runs_a = [by_key[k] for k, s in zip(a["keys"], a["seeds"]) if s in seeds]
    runs_b = [by_key[k] for k, s in zip(b["keys"], b["seeds"]) if s in seeds]
    ca, cb = correctness(runs_a, items), correctness(runs_b, items)
    base = {"a": a["label"], "b": b["label"], "group": b["group"], "seeds": seeds}
    if ca is None or cb is None:
        diffs = [ra["test"]["accuracy"] - rb["test"]["accuracy"] for ra, rb in zip(runs_a, runs_b)]
        m, sd = mean_sd(diffs)
        return {
            **base,
            "per_seed": diffs,
            "mean": m,
            "sd": sd,
            "low": None,
            "high": None,
            "excludes_zero": None,
        }
    groups = [d["group"] for d in items]
    return {**base, **paired_difference(ca, cb, groups, n_boot=n_boot)}


def paired_rows(
    summary: list[dict[str, Any]],
    results: list[dict[str, Any]],
    test_items: Sequence[dict[str, Any]] | None,
    n_boot: int = 2000,
) -> list[dict[str, Any]]:
    """SH-PEFT minus each other method of the same network (group ``methods``), and each ablation point
    minus the ablation's centre (the point whose runs are SH-PEFT's), over the seeds both ran."""
    by_key = {r["key"]: r for r in results}
    items = test_items or []
    ref = _reference(summary)
    out = []
    if ref is not None:
        for b in summary:
            if b["group"] == "methods" and b is not ref and b["network"] == ref["network"]:
                out.append(_pair(ref, b, by_key, items, n_boot))
        ref_keys = set(ref["keys"])
        for group in dict.fromkeys(r["group"] for r in summary if r["group"] not in ("methods", "lr_search")):
            points = [r for r in summary if r["group"] == group]
            centre = next((r for r in points if set(r["keys"]) & ref_keys), None)
            if centre is None:
                continue
            out += [_pair(p, centre, by_key, items, n_boot) for p in points if p is not centre]
    return [p for p in out if p is not None]


def winners(summary: list[dict[str, Any]], vit: str) -> dict[str, Any]:
    """Best SH-PEFT setting per ablation and among the methods, by mean VALIDATION AUC then accuracy."""
    out: dict[str, Any] = {}
    for group in sorted({r["group"] for r in summary} - {"lr_search"}):
        rows = [r for r in summary if r["group"] == group and r["method"] == "shpeft" and r["network"] == vit]
        if not rows:
            continue
        best = max(rows, key=_val_order)
        out[group] = {
            "label": best["label"],
            "val_roc_auc": best["val_roc_auc"][0],
            "val_accuracy": best["val_accuracy"][0],
        }
    return out


def lr_choices(results: list[dict[str, Any]], plan: list[RunSpec]) -> dict[str, Any]:
    """Per method: validation score at each grid learning rate (seed 0) and the one chosen."""
    by_key = {r["key"]: r for r in results}
    out: dict[str, Any] = {}
    for s in plan:
        if s.group == "lr_search" and s.key in by_key:
            v = by_key[s.key]["val"]
            out.setdefault(s.label, {"grid": {}, "chosen": None})["grid"][f"{s.lr:g}"] = {
                "val_roc_auc": v["roc_auc"],
                "val_accuracy": v["accuracy"],
            }
        elif s.group == "methods" and s.label in out:
            out[s.label]["chosen"] = s.lr
    return out
