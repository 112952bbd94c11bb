"""Contract of the accuracy benchmark (benchmarks/suite) on Br35H at a tiny configuration.

Checks the schema of the results, that the test metrics come from the epoch chosen on validation,
that SH-PEFT trains exactly k selected weights plus the head, and that the committed results of the
earlier suite still render. Timing is never asserted.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.suite import CONFIGS, VIT, render_markdown, run_suite, val_key
from shpeft_monai.networks import PRETRAINED

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    try:
        PRETRAINED[VIT]()
    except Exception as exc:
        pytest.skip(f"pretrained ViT-S/14 weights unavailable: {exc}")
    cfg = replace(
        CONFIGS["tiny"],
        train_subset=8,
        val_subset=12,
        test_subset=12,
        epochs=2,
        batch_size=4,
        eval_batch_size=12,
        methods=("shpeft", "linear_probe"),
    )
    out = tmp_path_factory.mktemp("suite")
    rep = run_suite(cfg, out, command="pytest")
    rep["_out"] = out
    return rep


def test_files_and_schema(report):
    out = report["_out"]
    data = json.loads((out / "suite_tiny.json").read_text())
    assert (out / "suite_tiny.md").is_file()
    assert (out / "suite_tiny_methods.png").is_file()
    assert {"config", "command", "machine", "dataset", "test_items", "runs", "summary", "paired"} <= set(data)
    assert {"torch", "device_name"} <= set(data["machine"])
    assert [r["label"] for r in data["runs"]] == ["shpeft", "linear_probe"]
    assert len(data["test_items"]) == 12 and all("group" in d for d in data["test_items"])
    for r in data["runs"]:
        for split in ("val", "test"):
            assert {"accuracy", "f1_macro", "roc_auc", "n"} <= set(r[split])
        assert r["test"]["n"] == 12 and len(r["test_pred"]) == 12
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
        assert row["test_accuracy_ci"]["n_groups"] == len({d["group"] for d in data["test_items"]})


def test_test_metrics_come_from_the_validation_chosen_epoch(report):
    for r in report["runs"]:
        keys = [val_key(h["val"]) for h in r["history"]]
        best = max(range(len(keys)), key=lambda i: (keys[i], -i))  # earliest epoch on ties
        assert r["chosen_epoch"] == best
        assert r["val"] == r["history"][best]["val"]
        assert "test" not in r["history"][0]  # no per-epoch test scores are ever computed


def test_shpeft_trains_exactly_k_plus_head(report):
    r = next(r for r in report["runs"] if r["method"] == "shpeft")
    assert r["trainable_total"] == r["selected_backbone_weights"] + r["head_parameters"]
    assert r["selected_backbone_weights"] == round(r["shpeft"]["budget"] * r["shpeft_eligible"])
    lp = next(r for r in report["runs"] if r["method"] == "linear_probe")
    assert lp["selected_backbone_weights"] == 0
    assert lp["trainable_total"] == lp["head_parameters"]


def test_the_earlier_suites_results_still_render():
    for name in ("cpu70", "cpu_small", "cpu_per_row"):
        report = json.loads((RESULTS / f"suite_{name}.json").read_text())
        md = render_markdown(report)
        assert md.startswith("# Suite") and "| method |" in md
