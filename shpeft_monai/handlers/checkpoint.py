"""Checkpoints that hold only what was trained, written atomically.

* :class:`BestArtefactSaver` (validation handler): when the key validation metric improves, saves
  the SH-PEFT delta (``best_delta.safetensors``, the inference and federated artefact); for other
  methods the trained parameters (``best_trainable.safetensors``). Never a full SH-PEFT checkpoint.
* :class:`TrainingCheckpoint` (training handler): after every epoch saves the trainable state, the
  optimizer state and the trainer's counters in one atomic file (``last_state.pt``, read back with
  ``weights_only=True``; ``last_trainer.json`` is a readable copy of the counters); with
  ``resume=True`` a restarted run
  loads them on start and continues from the next epoch. The mask comes back from
  ``mask.safetensors`` (see ``prepare_method``), so the resumed run trains the same weights.
"""

from __future__ import annotations

import io as _io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from ..io import (
    BEST_DELTA_FILE,
    BEST_TRAINABLE_FILE,
    LAST_STATE_FILE,
    LAST_TRAINER_FILE,
    atomic_write_bytes,
    dumps_json,
    save_delta,
    write_json,
)
from ..methods import restore_trainable_state, trainable_state
from ..model import bare_module, extract_delta, is_injected
from .validation import SELECTION_METRIC

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["BestArtefactSaver", "TrainingCheckpoint", "load_trainable_state", "saved_meta"]


def _save_trainable(path: Path, network: torch.nn.Module, meta: dict[str, Any]) -> None:
    data = save(trainable_state(bare_module(network)), metadata={"meta": dumps_json(meta, indent=None)})
    atomic_write_bytes(path, data)


def saved_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta`` a best artefact (delta or trainable state) was saved with: epoch, best metric."""
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("meta", "{}"))


def load_trainable_state(network: torch.nn.Module, path: str | Path) -> None:
    """Copy saved trainable parameters (and BatchNorm statistics) into ``network`` by name."""
    restore_trainable_state(bare_module(network), load_file(str(path)), source=str(path))


class BestArtefactSaver:
    """Save the trained artefact whenever the validation selection score (``metric_name``, default the
    :mod:`.validation` score that cannot pick a collapsed model) reaches a new best (higher is better).

    The best value so far is read back from an existing artefact on attach, so a resumed run never
    replaces a better artefact with a worse one.
    """

    def __init__(
        self,
        output_dir: str | Path,
        network: torch.nn.Module,
        meta: dict[str, Any] | None = None,
        metric_name: str = SELECTION_METRIC,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.network = bare_module(network)
        self.meta = dict(meta or {})
        self.metric_name = metric_name
        self.best: float | None = None

    def _previous_best(self) -> float | None:
        for name in (BEST_DELTA_FILE, BEST_TRAINABLE_FILE):
            path = self.output_dir / name
            if path.is_file():
                meta = saved_meta(path)
                if meta.get("best_metric") is not None:
                    return float(meta["best_metric"])
        return None

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        if not engine.has_event_handler(self._maybe_save, Events.EPOCH_COMPLETED):
            self.best = self._previous_best()
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._maybe_save)

    def _maybe_save(self, engine: Engine) -> None:
        value = float(engine.state.metrics.get(self.metric_name, float("nan")))
        if not math.isfinite(value):  # never NaN (see ValidationMetrics); -inf still saves a first artefact
            value = -math.inf
        if self.best is not None and not value > self.best:
            return
        self.best = value
        meta = {
            **self.meta,
            "epoch": engine.state.epoch,
            "best_metric": value if math.isfinite(value) else None,
            "metric_name": self.metric_name,
        }
        if is_injected(self.network):
            path = save_delta(self.output_dir / BEST_DELTA_FILE, extract_delta(self.network, meta))
        else:
            path = self.output_dir / BEST_TRAINABLE_FILE
            _save_trainable(path, self.network, meta)
        engine.logger.info("saved best artefact %s (epoch %d, metric %.4f)", path, meta["epoch"], value)


class TrainingCheckpoint:
    """Save the resumable state after each epoch; optionally resume from it on start."""

    def __init__(
        self,
        output_dir: str | Path,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        resume: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.network = bare_module(network)
        self.optimizer = optimizer
        self.resume = resume

    @property
    def files(self) -> tuple[Path, Path]:
        return self.output_dir / LAST_STATE_FILE, self.output_dir / LAST_TRAINER_FILE

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        if not engine.has_event_handler(self._save, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._save)
            if self.resume:
                engine.add_event_handler(Events.STARTED, self._load)

    def _save(self, engine: Engine) -> None:
        """One atomic file holds the trainable state, the optimizer state and the counters, so a kill
        at any moment leaves either the previous epoch's complete state or this one's, never a mix."""
        state_file, trainer = self.files
        counters = {
            "epoch": engine.state.epoch,
            "iteration": engine.state.iteration,
            "max_epochs": engine.state.max_epochs,
        }
        buf = _io.BytesIO()
        state = {"trainable": trainable_state(self.network), "optimizer": self.optimizer.state_dict()}
        torch.save({**state, **counters}, buf)
        atomic_write_bytes(state_file, buf.getvalue())
        write_json(trainer, counters)  # a readable marker; the state file is authoritative

    def _load(self, engine: Engine) -> None:
        state_file, _ = self.files
        if not state_file.is_file() or engine.state.epoch > 0:  # nothing saved, or already running
            return
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        restore_trainable_state(self.network, state["trainable"], source=str(state_file))
        self.optimizer.load_state_dict(state["optimizer"])
        engine.state.epoch = int(state["epoch"])
        engine.state.iteration = int(state["iteration"])
        engine.logger.info("resumed from %s at epoch %d", self.output_dir, engine.state.epoch)
