"""Validation metrics against scikit-learn, and a model-selection rule that never picks a collapsed model
and never freezes on an undefined metric."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
from torch import nn

from shpeft_monai.handlers import BestArtefactSaver, ValidationMetrics, selection_score, validation_metrics
from shpeft_monai.report import classification_metrics


def _probs(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    logits = rng.normal(size=(n, c))
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


def test_multiclass_metrics_match_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 60)
    p = _probs(rng, 60, 4)
    m = validation_metrics(y, p, 4)
    assert m["val_accuracy"] == pytest.approx(accuracy_score(y, p.argmax(1)))
    assert m["val_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))
    assert m["val_auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["val_loss"] == pytest.approx(-np.mean(np.log(p[np.arange(60), y])))
    report = classification_metrics(y, p, ["a", "b", "c", "d"])
    assert report["accuracy"] == pytest.approx(
        m["val_accuracy"]
    )  # plain accuracy, not MONAI's per-class mean
    assert report["balanced_accuracy"] == pytest.approx(m["val_balanced_accuracy"])
    assert report["roc_auc"] == pytest.approx(m["val_auc"])


def test_a_collapsed_model_is_never_chosen_over_a_sound_one() -> None:
    y = np.array([0] * 50 + [1] * 50)
    ranks = np.linspace(0.55, 0.95, 100)  # ranks tumour above normal almost always: AUC ~0.99 ...
    ranks[:50] -= 0.4
    collapsed = np.stack([1 - ranks * 0 - 0.2, ranks * 0 + 0.2], 1)  # ... but always predicts class 0
    collapsed[:, 1] += ranks * 1e-3
    collapsed[:, 0] = 1 - collapsed[:, 1]
    sound = np.stack([1 - ranks, ranks], 1)
    sound[np.arange(0, 100, 7), :] = sound[np.arange(0, 100, 7), ::-1]  # some errors: lower AUC
    m_collapsed, m_sound = validation_metrics(y, collapsed, 2), validation_metrics(y, sound, 2)
    assert m_collapsed["val_auc"] > m_sound["val_auc"]  # AUC alone would choose the collapsed model
    assert m_collapsed["val_balanced_accuracy"] == 0.5
    assert selection_score(m_sound)[0] > selection_score(m_collapsed)[0]


def test_undefined_auc_falls_back_to_balanced_accuracy() -> None:
    y = np.array([0, 0, 0, 2, 2])  # class 1 missing from validation
    p = _probs(np.random.default_rng(1), 5, 3)
    m = validation_metrics(y, p, 3)
    assert math.isnan(m["val_auc"])
    score, rule = selection_score(m)
    assert score == m["val_balanced_accuracy"] and "balanced accuracy" in rule


class _Evaluator(Engine):
    """An evaluator that replays fixed validation outputs, one list per epoch."""

    def __init__(self, epochs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.epochs = epochs
        super().__init__(
            lambda e, i: {
                "pred": self.epochs[e.state.epoch - 1][0],
                "label": self.epochs[e.state.epoch - 1][1],
            }
        )


def test_best_artefact_follows_the_selection_score_without_freezing(tmp_path) -> None:
    """Epoch 1 has an undefined AUC (NaN): later better epochs must still replace its artefact."""
    net = nn.Linear(3, 2)
    y_missing = torch.tensor([0, 0, 0])
    y = torch.tensor([0, 0, 1, 1])
    good = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
    epochs = [(torch.tensor([[0.4, 0.6]] * 3), y_missing), (good.flip(1), y), (good, y)]
    engine = _Evaluator(epochs)
    ValidationMetrics(num_classes=2).attach(engine)
    BestArtefactSaver(tmp_path, net, meta={"class_names": ["a", "b"]}).attach(engine)
    saved = []
    for epoch in range(1, 4):
        engine.state.max_epochs = None
        engine.run([0], max_epochs=epoch)
        path = tmp_path / "best_trainable.safetensors"
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            saved.append(json.loads(f.metadata()["meta"])["epoch"])
    assert saved == [1, 1, 3]  # epoch 1 is saved (score 0, never NaN), 2 ties it, 3 wins
