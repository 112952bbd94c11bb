"""Validation metrics that mean what they say, and a model-selection score that cannot pick a collapsed model.

:class:`ValidationMetrics` (validation handler) collects the evaluator's probabilities over a run and
puts plain accuracy (not MONAI's per-class mean of (TP+TN)/N), balanced accuracy, macro one-vs-rest
ROC-AUC, cross-entropy and the selection score into ``engine.state.metrics``, where MONAI's stats and
TensorBoard handlers, the training history and :class:`~.checkpoint.BestArtefactSaver` read them.

The selection score is the mean of AUC and balanced accuracy: a model that predicts one class keeps a
high AUC but a balanced accuracy of 1/C, so it loses to any model that separates the classes at its
decision threshold. When AUC is undefined (a class missing from the validation split) the score falls
back to balanced accuracy, with a warning; it is never NaN.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["SELECTION_METRIC", "ValidationMetrics", "selection_score", "validation_metrics"]

logger = logging.getLogger(__name__)

SELECTION_METRIC = "val_selection"


def _gather(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate every rank's validation outputs when running distributed (identity otherwise)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return probs, labels
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (probs, labels))
    return np.concatenate([p for p, _ in parts]), np.concatenate([y for _, y in parts])


def validation_metrics(labels: np.ndarray, probs: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall over the classes present), macro one-vs-rest AUC
    (NaN when undefined) and mean cross-entropy, from integer labels and (N, C) probabilities."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape != (y.shape[0], num_classes):
        raise ValueError(f"probs must be (N={y.shape[0]}, C={num_classes}), got {p.shape}")
    pred = p.argmax(1)
    present = np.unique(y)
    recalls = [float((pred[y == c] == c).mean()) for c in present]
    try:
        auc = float(roc_auc_score(y, p[:, 1]) if num_classes == 2 else roc_auc_score(y, p, multi_class="ovr"))
    except ValueError:  # a class absent from the labels: AUC is undefined
        auc = float("nan")
    loss = float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0)).mean()) if len(y) else float("nan")
    return {
        "val_accuracy": float((pred == y).mean()) if len(y) else float("nan"),
        "val_balanced_accuracy": float(np.mean(recalls)) if recalls else float("nan"),
        "val_auc": auc,
        "val_loss": loss,
    }


def selection_score(metrics: Mapping[str, float]) -> tuple[float, str]:
    """``(score, rule)``: mean of AUC and balanced accuracy, or balanced accuracy when AUC is undefined."""
    auc, bacc = metrics.get("val_auc", math.nan), metrics.get("val_balanced_accuracy", math.nan)
    if math.isfinite(auc) and math.isfinite(bacc):
        return (auc + bacc) / 2.0, "mean of AUC and balanced accuracy"
    if math.isfinite(bacc):
        return bacc, "balanced accuracy (AUC undefined: a class is missing from the validation split)"
    return -math.inf, "undefined (empty validation split)"


class ValidationMetrics:
    """Collect validation probabilities each run; write the metrics and the selection score.

    Attach it FIRST among the evaluator's handlers so that later handlers see the metrics.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        self._warned = False

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        if not engine.has_event_handler(self._completed, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._completed)

    def _reset(self, _: Engine) -> None:
        self._probs: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def _collect(self, engine: Engine) -> None:
        out = engine.state.output
        if isinstance(out, list):  # decollated
            probs = torch.stack([torch.as_tensor(o["pred"]) for o in out])
            labels = torch.stack([torch.as_tensor(o["label"]).reshape(-1)[0] for o in out])
        else:
            probs, labels = out["pred"], out["label"]
        self._probs.append(probs.detach().float().cpu().reshape(-1, self.num_classes))
        self._labels.append(torch.as_tensor(labels).detach().cpu().reshape(-1).long())

    def _completed(self, engine: Engine) -> None:
        probs = torch.cat(self._probs).numpy() if self._probs else np.zeros((0, self.num_classes))
        labels = torch.cat(self._labels).numpy() if self._labels else np.zeros(0, dtype=np.int64)
        probs, labels = _gather(probs, labels)  # sharded validation (DDP): every rank scores all shards
        metrics: dict[str, Any] = validation_metrics(labels, probs, self.num_classes)
        score, rule = selection_score(metrics)
        if not math.isfinite(metrics["val_auc"]) and not self._warned:
            engine.logger.warning("validation AUC is undefined; model selection uses %s", rule)
            self._warned = True
        metrics[SELECTION_METRIC] = score
        engine.state.metrics.update(metrics)
