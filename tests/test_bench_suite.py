"""Contract of the accuracy benchmark (benchmarks/suite.py) on a tiny configuration.

Checks the schema of the results, that the test metrics come from the epoch chosen on validation,
and that SH-PEFT trains exactly k selected weights plus the head. Timing is never asserted.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from shpeft_monai.networks import PRETRAINED

suite = pytest.importorskip("benchmarks.suite")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    try:
        PRETRAINED[suite.VIT]()
    except Exception as exc:
        pytest.skip(f"pretrained ViT-S/14 weights unavailable: {exc}")
    cfg = replace(
        suite.CONFIGS["tiny"],
        train_subset=8,
        val_subset=12,
        test_subset=12,
        epochs=2,
        batch_size=4,
        eval_batch_size=12,
        methods=("shpeft_union", "linear_probe"),
    )
    out = tmp_path_factory.mktemp("suite")
    rep = suite.run_suite(cfg, out, command="pytest")
    rep["_out"] = out
    return rep


def test_files_and_schema(report):
    out = report["_out"]
    data = json.loads((out / "suite_tiny.json").read_text())
    assert (out / "suite_tiny.md").is_file()
    assert (out / "suite_tiny_methods.png").is_file()
    assert {"config", "command", "machine", "runs", "summary", "winners"} <= set(data)
    assert {"torch", "device_name"} <= set(data["machine"])
    assert [r["label"] for r in data["runs"]] == ["shpeft_union", "linear_probe"]
    for r in data["runs"]:
        for split in ("val", "test"):
            assert {"accuracy", "f1_macro", "roc_auc", "n"} <= set(r[split])
        assert r["test"]["n"] == 12
        for k in (
            "selected_backbone_weights",
            "head_parameters",
            "share_of_backbone",
            "artefact_bytes",
            "step_time_s",
            "selection_s",
            "chosen_epoch",
        ):
            assert k in r
    for row in data["summary"]:
        mean, std = row["test_accuracy"]
        assert 0.0 <= mean <= 1.0 and std >= 0.0


def test_test_metrics_come_from_the_validation_chosen_epoch(report):
    for r in report["runs"]:
        keys = [suite._val_key(h["val"]) for h in r["history"]]
        best = max(range(len(keys)), key=lambda i: (keys[i], -i))  # earliest epoch on ties
        assert r["chosen_epoch"] == best
        assert r["val"] == r["history"][best]["val"]
        assert "test" not in r["history"][0]  # no per-epoch test scores are ever computed


def test_shpeft_trains_exactly_k_plus_head(report):
    r = next(r for r in report["runs"] if r["method"] == "shpeft")
    assert r["trainable_total"] == r["selected_backbone_weights"] + r["head_parameters"]
    assert r["selected_backbone_weights"] == round(1e-4 * r["shpeft_eligible"])
    lp = next(r for r in report["runs"] if r["method"] == "linear_probe")
    assert lp["selected_backbone_weights"] == 0
    assert lp["trainable_total"] == lp["head_parameters"]
