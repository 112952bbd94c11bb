"""PNG plots of a suite report: test metrics per method, and the budget and ratio sweeps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot"]


def _bars(ax: Any, rows: list[dict[str, Any]]) -> None:
    xs = np.arange(len(rows))
    acc = [100 * r["test_accuracy"][0] for r in rows]
    # accuracy: the grouped 95 % interval where the runs kept their predictions, else the sd
    lo, hi = [], []
    for r, a in zip(rows, acc):
        ci = r.get("test_accuracy_ci")
        lo.append(a - 100 * ci["low"] if ci else 100 * r["test_accuracy"][1])
        hi.append(100 * ci["high"] - a if ci else 100 * r["test_accuracy"][1])
    ax.bar(xs - 0.19, acc, 0.38, yerr=[lo, hi], capsize=3, label="test accuracy (grouped 95 % CI)")
    f1 = [100 * r["test_f1_macro"][0] for r in rows]
    ax.bar(
        xs + 0.19,
        f1,
        0.38,
        yerr=[100 * r["test_f1_macro"][1] for r in rows],
        capsize=3,
        label="test macro F1 (sd)",
    )
    ax.set_xticks(xs, [r["label"] for r in rows], rotation=40, ha="right")
    ax.set_ylim(max(0, min(acc + f1) - 15), 100)
    ax.set_ylabel("%")


def plot(report: dict[str, Any], stem: Path) -> list[Path]:
    """Write ``<stem>_methods.png`` and, when those ablations ran, ``<stem>_{budget,rho}.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    summary = report["summary"]
    title = f"{report['machine']['device_name'][:40]}, torch {report['machine']['torch']}"
    rows = [r for r in summary if r["group"] == "methods"]
    if rows:
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows)), 4))
        _bars(ax, rows)
        ax.set_title(f"suite {report['config']['name']}: test metrics over seeds\n{title}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(stem.with_name(stem.name + "_methods.png"))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    for group, xlabel, logx in (
        ("budget", "budget (fraction of eligible weights)", True),
        ("rho", "hybrid ratio: task-specific share (rho for union, lam for weighted)", False),
    ):
        pts = [r for r in summary if r["group"] == group]
        if not pts:
            continue
        xv = [float(r["label"].split("=")[1]) for r in pts]
        order = np.argsort(xv)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for m, name in (
            ("val_roc_auc", "val AUC"),
            ("val_accuracy", "val acc"),
            ("test_accuracy", "test acc"),
        ):
            ax.errorbar(
                [xv[i] for i in order],
                [100 * pts[i][m][0] for i in order],
                yerr=[100 * pts[i][m][1] for i in order],
                marker="o",
                capsize=3,
                label=f"{name} (sd over seeds)",
            )
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("%")
        ax.set_title(f"SH-PEFT: {group} sweep\n{title}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(stem.with_name(stem.name + f"_{group}.png"))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
