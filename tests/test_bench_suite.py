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


def _fake(spec, auc):
    return {"key": spec.key, "val": {"roc_auc": auc, "accuracy": auc}}


def test_learning_rate_is_chosen_on_validation_then_reused_for_every_seed():
    cfg = replace(
        suite.CONFIGS["cpu"],
        methods=("shpeft_union", "full"),
        ablations=("budget",),
        seeds=(0, 1, 2),
        lr_grid=(1e-4, 1e-3),
        lr_grid_full=(1e-5, 1e-4),
    )
    plan = suite.plan_runs(cfg, {})
    # first only the seed-0 grids; ablations wait for the union's learning rate
    assert [(s.label, s.lr, s.seed) for s in plan] == [
        ("shpeft_union", 1e-4, 0),
        ("shpeft_union", 1e-3, 0),
        ("full", 1e-5, 0),
        ("full", 1e-4, 0),
    ]
    scores = {
        ("shpeft_union", 1e-4): 0.8,
        ("shpeft_union", 1e-3): 0.6,
        ("full", 1e-5): 0.5,
        ("full", 1e-4): 0.7,
    }
    results = {s.key: _fake(s, scores[(s.label, s.lr)]) for s in plan}
    plan = suite.plan_runs(cfg, results)
    methods = [(s.label, s.lr, s.seed) for s in plan if s.group == "methods"]
    assert methods == [("shpeft_union", 1e-4, s) for s in (0, 1, 2)] + [("full", 1e-4, s) for s in (0, 1, 2)]
    # seed 0 at the chosen lr IS the grid run (same key): no run twice
    grid_keys = {s.key for s in plan if s.group == "lr_search"}
    assert {s.key for s in plan if s.group == "methods" and s.seed == 0} <= grid_keys
    assert not [s for s in plan if s.group == "budget"]  # ablations wait for the union's seeds
    results |= {s.key: _fake(s, 0.8) for s in plan if s.key not in results}
    plan = suite.plan_runs(cfg, results)
    ablation = [s for s in plan if s.group == "budget"]
    assert {s.lr for s in ablation} == {1e-4}
    # the ablation point equal to the default budget is the union's run, not a new one
    default_point = next(s for s in ablation if s.shpeft["budget"] == cfg.budget)
    union0 = next(s for s in plan if s.group == "methods" and s.label == "shpeft_union" and s.seed == 0)
    assert default_point.key == union0.key
    other = next(s for s in ablation if s.shpeft["budget"] != cfg.budget)
    assert other.key != union0.key


def test_lr_ties_go_to_the_smaller_learning_rate():
    cfg = replace(suite.CONFIGS["cpu"], methods=("lora",), ablations=(), seeds=(0,), lr_grid=(1e-4, 1e-3))
    grid = suite.plan_runs(cfg, {})
    results = {s.key: _fake(s, 0.75) for s in grid}
    assert suite.chosen_lr(results, grid) == 1e-4


def test_ablations_centre_on_the_hybrid_rule_that_won_on_validation():
    cfg = replace(
        suite.CONFIGS["cpu"],
        methods=("shpeft_union", "shpeft_weighted"),
        ablations=("rho",),
        seeds=(0, 1),
        lr_grid=(1e-4, 1e-3),
    )
    score = {("shpeft_union", 1e-4): 0.7, ("shpeft_union", 1e-3): 0.6}
    score |= {("shpeft_weighted", 1e-4): 0.5, ("shpeft_weighted", 1e-3): 0.8}
    results: dict = {}
    for _ in range(3):  # grids, then seeds: fill in whatever is planned
        for s in suite.plan_runs(cfg, results):
            results.setdefault(s.key, _fake(s, score[(s.label, s.lr)] if s.group != "rho" else 0.5))
    ablation = [s for s in suite.plan_runs(cfg, results) if s.group == "rho"]
    assert [s.label for s in ablation] == [f"lam={x:g}" for x in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert {s.shpeft["hybrid"] for s in ablation} == {"weighted"} and {s.lr for s in ablation} == {1e-3}


def test_resume_keeps_runs_when_only_the_plan_changes() -> None:
    base = suite._cfg_dict(suite.CONFIGS["cpu"])
    wider = suite._cfg_dict(replace(suite.CONFIGS["cpu"], lr_grid=(1e-4, 1e-3, 1e-2), seeds=(0, 1)))
    assert suite._run_settings(wider) == suite._run_settings(base)
    for change in ({"epochs": 5}, {"img_size": 112}, {"train_subset": 0}):
        other = suite._cfg_dict(replace(suite.CONFIGS["cpu"], **change))
        assert suite._run_settings(other) != suite._run_settings(base), change
