"""Handlers that record training curves, write the evaluation report and the inference CSV."""

from __future__ import annotations

import csv
import io as _io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..io import HISTORY_FILE, PREDICTIONS_FILE, atomic_write_text, write_json
from ..report import classification_metrics, write_report

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["ClassificationReport", "PredictionWriter", "TrainingHistory"]


def _batch_outputs(engine: Engine) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """Logits, labels and source paths of the current iteration (batched or decollated output)."""
    out = engine.state.output
    if isinstance(out, list):  # decollated
        logits = torch.stack([o["pred"] for o in out])
        labels = torch.stack([torch.as_tensor(o["label"]) for o in out]) if "label" in out[0] else None
    else:
        logits, labels = out["pred"], out.get("label")
    batch = engine.state.batch
    paths = batch.get("path") if isinstance(batch, dict) else None
    return (
        logits.detach().float().cpu(),
        None if labels is None else labels.reshape(-1).cpu(),
        list(paths or []),
    )


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    buf = _io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


class TrainingHistory:
    """Per-epoch mean training loss and the validator's metrics, saved to ``history.json``."""

    def __init__(self, output_dir: str | Path, validator: Engine | None = None) -> None:
        self.path = Path(output_dir) / HISTORY_FILE
        self.validator = validator
        self.history: list[dict[str, Any]] = []
        self._losses: list[float] = []

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        if engine.has_event_handler(self._epoch, Events.EPOCH_COMPLETED):
            return
        if self.path.is_file():  # a resumed run keeps its earlier epochs
            self.history = json.loads(self.path.read_text())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _iteration(self, engine: Engine) -> None:
        out = engine.state.output
        loss = out[0]["loss"] if isinstance(out, list) else out["loss"]
        self._losses.append(float(torch.as_tensor(loss).detach()))

    def _epoch(self, engine: Engine) -> None:
        row: dict[str, Any] = {
            "epoch": engine.state.epoch,
            "train_loss": float(np.mean(self._losses or [np.nan])),
        }
        if self.validator is not None:
            metrics = self.validator.state.metrics.items()
            row.update({(k if k.startswith("val_") else f"val_{k}"): float(v) for k, v in metrics})
        self._losses = []
        self.history = [h for h in self.history if h["epoch"] < row["epoch"]] + [row]
        write_json(self.path, self.history)  # standard JSON: an undefined metric is null, never NaN


class _RunCollector:
    """Reset on start, collect every iteration, write on completion (attached once per engine)."""

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        if not engine.has_event_handler(self._completed, Events.COMPLETED):
            engine.add_event_handler(Events.STARTED, self._reset)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
            engine.add_event_handler(Events.COMPLETED, self._completed)

    def _reset(self, engine: Engine) -> None:
        raise NotImplementedError

    def _collect(self, engine: Engine) -> None:
        raise NotImplementedError

    def _completed(self, engine: Engine) -> None:
        raise NotImplementedError


class ClassificationReport(_RunCollector):
    """Collect probabilities over an evaluation run and write metrics, report and plots."""

    def __init__(
        self,
        output_dir: str | Path,
        class_names: Sequence[str],
        history_file: str | Path | None = None,
        selection: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        title: str = "SH-PEFT evaluation",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.history_file = Path(history_file) if history_file else None
        self.selection = selection
        self.extra = dict(extra or {})
        self.title = title
        self.metrics: dict[str, Any] | None = None

    def _reset(self, _: Engine) -> None:
        self._probs: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._paths: list[str] = []

    def _collect(self, engine: Engine) -> None:
        logits, labels, paths = _batch_outputs(engine)
        if labels is None:
            raise ValueError("ClassificationReport needs labels; use PredictionWriter for unlabelled data.")
        self._probs.append(torch.softmax(logits, dim=1))
        self._labels.append(labels)
        self._paths += paths or [""] * len(labels)

    def _completed(self, engine: Engine) -> None:
        probs = torch.cat(self._probs).numpy()
        labels = torch.cat(self._labels).numpy()
        self.metrics = classification_metrics(labels, probs, self.class_names)
        history = (
            json.loads(self.history_file.read_text())
            if self.history_file and self.history_file.is_file()
            else None
        )
        path = write_report(
            self.output_dir,
            self.metrics,
            labels=labels,
            probs=probs,
            history=history,
            selection=self.selection,
            extra=self.extra,
            title=self.title,
        )
        _write_csv(
            self.output_dir / PREDICTIONS_FILE,
            ["image", "label", "prediction", *(f"prob_{c}" for c in self.class_names)],
            [
                [path, self.class_names[int(y)], self.class_names[int(p.argmax())], *(f"{v:.6f}" for v in p)]
                for path, y, p in zip(self._paths, labels, probs)
            ],
        )  # per-sample audit trail (and what grouped bootstrap intervals are computed from)
        engine.state.report = {**self.metrics, **self.extra}
        engine.logger.info(
            "evaluation: accuracy %.4f, macro F1 %.4f, AUC %.4f -> %s",
            self.metrics["accuracy"],
            self.metrics["f1_macro"],
            self.metrics["roc_auc"],
            path,
        )


class PredictionWriter(_RunCollector):
    """Write ``path, predicted class, probabilities...`` for every input to a CSV file."""

    def __init__(self, csv_path: str | Path, class_names: Sequence[str]) -> None:
        self.csv_path = Path(csv_path)
        self.class_names = list(class_names)

    def _reset(self, _: Engine) -> None:
        self._rows: list[list[Any]] = []

    def _collect(self, engine: Engine) -> None:
        logits, _, paths = _batch_outputs(engine)
        probs = torch.softmax(logits, dim=1)
        for i, p in enumerate(probs):
            self._rows.append(
                [
                    paths[i] if i < len(paths) else "",
                    self.class_names[int(p.argmax())],
                    *(f"{v:.6f}" for v in p.tolist()),
                ]
            )

    def _completed(self, engine: Engine) -> None:
        _write_csv(
            self.csv_path, ["image", "prediction", *(f"prob_{c}" for c in self.class_names)], self._rows
        )
        engine.logger.info("wrote %d predictions to %s", len(self._rows), self.csv_path)
