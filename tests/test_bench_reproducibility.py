"""The reproducibility report: which saved deltas are byte-identical to the first run's, and by how much the others differ."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from benchmarks import reproducibility
from shpeft_monai import SparseDelta, SparseMask, save_delta

ENV = {"cpu": "AMD EPYC", "cpu_capability": "AVX2", "threads": 2}


def _save(root, name: str, delta: SparseDelta, env: dict, loss: float) -> None:
    (root / name).mkdir(parents=True)
    save_delta(root / name / "best_delta.safetensors", dataclasses.replace(delta, meta={"environment": env}))
    (root / name / "history.json").write_text(json.dumps([{"epoch": 1, "train_loss": loss}]))


def test_identical_runs_and_the_size_of_a_difference(tmp_path) -> None:
    mask = SparseMask({"w": torch.tensor([0, 2, 5])}, {"w": (2, 3)}, "base-a")
    ref = SparseDelta(mask, {"w": torch.tensor([0.1, -0.2, 0.3])}, {"head.weight": torch.ones(2, 3)})
    _save(tmp_path, "machine", ref, ENV, 0.5)
    _save(tmp_path, "machine_again", ref, ENV, 0.5)
    nudged = dataclasses.replace(ref, values={"w": torch.tensor([0.1, -0.2, 0.3 + 1e-3])})
    _save(tmp_path, "plain_kernels", nudged, {**ENV, "cpu_capability": "DEFAULT"}, 0.51)
    other_base = dataclasses.replace(ref, mask=SparseMask(mask.indices, mask.shapes, "base-b"))
    _save(tmp_path, "one_thread", other_base, {**ENV, "threads": 1}, 0.5)

    result = reproducibility.compare(tmp_path)
    rows = result["variants"]
    assert result["cpu"] == "AMD EPYC" and list(rows) == list(reproducibility.VARIANTS)
    assert result["largest_value"] == pytest.approx(0.3)
    assert rows["machine_again"]["same_values"] and rows["machine_again"]["max_abs_diff_values"] == 0.0
    plain = rows["plain_kernels"]
    assert plain["same_base_weights"] and plain["same_mask"] and not plain["same_values"]
    assert (
        plain["max_abs_diff_values"] == pytest.approx(1e-3, rel=1e-3) and plain["cpu_capability"] == "DEFAULT"
    )
    assert not rows["one_thread"]["same_base_weights"] and rows["one_thread"]["threads"] == 1
    text = reproducibility.render(result, "cmd")
    assert (
        "| plain_kernels | DEFAULT | 2 | identical | identical | differ | 1.00e-03 / 0.00e+00 | 0.51 |"
        in text
    )
    assert "| one_thread | AVX2 | 1 | differ | identical | identical | 0.00e+00 / 0.00e+00 | 0.5 |" in text


def test_no_finished_run_is_an_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="no finished variant"):
        reproducibility.compare(tmp_path)
