"""Shared fixtures: quiet, deterministic, 2-thread CPU runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "bundles" / "br35h_shpeft" / "configs"

torch.set_num_threads(2)


@pytest.fixture()
def bundle_configs() -> Path:
    return BUNDLE
