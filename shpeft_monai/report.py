"""Classification metrics, a markdown report and PNG plots people would rather look at than read.

Metrics: accuracy, macro F1, ROC-AUC (one-vs-rest for more than two classes), per-class precision
and recall, confusion matrix. Plots: confusion matrix, ROC curve, training curves, and where the
selected SH-PEFT weights sit (per block and per tensor type).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .io import METRICS_FILE, atomic_write_text, write_json

__all__ = [
    "classification_metrics",
    "plot_confusion",
    "plot_roc",
    "plot_selection",
    "plot_training_curves",
    "write_report",
]


def classification_metrics(
    labels: Sequence[int], probs: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Metrics from integer labels and (N, C) class probabilities: plain accuracy, balanced accuracy,
    macro F1, ROC-AUC (macro one-vs-rest for more than two classes), per-class precision/recall/F1."""
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0] or p.shape[1] != len(class_names):
        raise ValueError(f"probs must be (N={y.shape[0]}, C={len(class_names)}), got {p.shape}.")
    pred = p.argmax(1)
    classes = list(range(len(class_names)))
    prec, rec, f1s, support = precision_recall_fscore_support(y, pred, labels=classes, zero_division=0)
    try:
        auc = float(
            roc_auc_score(y, p[:, 1]) if len(classes) == 2 else roc_auc_score(y, p, multi_class="ovr")
        )
    except ValueError:  # a class absent from the labels: AUC is undefined (reported as null)
        auc = float("nan")
    return {
        "n": int(y.shape[0]),
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(np.mean([rec[c] for c in np.unique(y)])) if len(y) else float("nan"),
        "f1_macro": float(f1_score(y, pred, labels=classes, average="macro", zero_division=0)),
        "roc_auc": auc,
        "per_class": {
            name: {
                "precision": float(prec[i]),
                "recall": float(rec[i]),
                "f1": float(f1s[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(y, pred, labels=classes).tolist(),
        "class_names": list(class_names),
    }


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(metrics: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    cm = np.asarray(metrics["confusion_matrix"])
    names = metrics["class_names"]
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="black" if v < cm.max() / 2 else "white")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"accuracy {metrics['accuracy']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_roc(labels: Sequence[int], probs: np.ndarray, class_names: Sequence[str], path: Path) -> Path:
    from sklearn.metrics import roc_curve

    plt = _plt()
    y = np.asarray(labels)
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    positives = [1] if len(class_names) == 2 else range(len(class_names))
    for c in positives:
        if (y == c).any() and (y != c).any():
            fpr, tpr, _ = roc_curve(y == c, np.asarray(probs)[:, c])
            ax.plot(fpr, tpr, label=str(class_names[c]))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_training_curves(history: list[dict[str, Any]], path: Path) -> Path:
    plt = _plt()
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(epochs, [h.get("train_loss", np.nan) for h in history], "o-", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    val_keys = sorted({k for h in history for k in h if k.startswith("val_")})
    if val_keys:
        ax2 = ax.twinx()
        for k in val_keys:
            ax2.plot(epochs, [h.get(k, np.nan) for h in history], "s--", label=k)
        ax2.set_ylabel("validation metric")
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_selection(summary: dict[str, Any], path: Path) -> Path:
    """Bar charts of selected weights per block and per tensor type."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, key, title in ((axes[0], "by_block", "per block"), (axes[1], "by_type", "per tensor type")):
        items = list(summary[key].items())
        ax.bar(range(len(items)), [v for _, v in items])
        ax.set_xticks(
            range(len(items)), [k.replace(".weight", "") for k, _ in items], rotation=70, fontsize=7
        )
        ax.set_title(f"selected weights {title} (k={summary['k']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(
    out_dir: str | Path,
    metrics: dict[str, Any],
    *,
    labels: Sequence[int] | None = None,
    probs: np.ndarray | None = None,
    history: list[dict[str, Any]] | None = None,
    selection: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    title: str = "SH-PEFT evaluation",
) -> Path:
    """Write ``metrics.json``, ``report.md`` and the plots into ``out_dir``; returns the report path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {**metrics, **(extra or {})}
    write_json(out / METRICS_FILE, payload)  # standard JSON: an undefined AUC is null
    plots = [plot_confusion(metrics, out / "confusion_matrix.png")]
    if labels is not None and probs is not None:
        plots.append(plot_roc(labels, probs, metrics["class_names"], out / "roc_curve.png"))
    if history:
        plots.append(plot_training_curves(history, out / "training_curves.png"))
    if selection:
        plots.append(plot_selection(selection, out / "selection.png"))
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    for key in ("n", "accuracy", "balanced_accuracy", "f1_macro", "roc_auc"):
        lines.append(
            f"| {key} | {metrics[key]:.4f} |"
            if isinstance(metrics[key], float)
            else f"| {key} | {metrics[key]} |"
        )
    for key, value in (extra or {}).items():
        if isinstance(value, (int, float, str)):
            lines.append(f"| {key} | {value} |")
        elif key == "trained_with" and isinstance(value, dict):
            lines.append(
                f"| {key} | torch {value.get('torch')}, {value.get('cpu')} ({value.get('cpu_capability')}), "
                f"{value.get('threads')} threads{', ' + value['gpu'] if value.get('gpu') else ''} |"
            )
        elif key in ("trained_on", "scored") and isinstance(value, dict):
            lines.append(
                f"| {key} | {value.get('source')} ({value.get('split', 'splits')}, sha256 {str(value.get('sha256'))[:12]}) |"
            )
    lines += ["", "| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
    for name, m in metrics["per_class"].items():
        lines.append(
            f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |"
        )
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
