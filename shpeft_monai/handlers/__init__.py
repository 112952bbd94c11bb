"""MONAI / Ignite handlers that plug SH-PEFT into MONAI's engines."""

from __future__ import annotations

from .checkpoint import BestArtefactSaver, TrainingCheckpoint
from .report import ClassificationReport, PredictionWriter, TrainingHistory
from .selection import SHPEFTSelection
from .validation import ValidationMetrics, selection_score, validation_metrics

__all__ = [
    "BestArtefactSaver",
    "ClassificationReport",
    "PredictionWriter",
    "SHPEFTSelection",
    "TrainingCheckpoint",
    "TrainingHistory",
    "ValidationMetrics",
    "selection_score",
    "validation_metrics",
]
