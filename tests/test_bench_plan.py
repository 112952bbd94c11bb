"""The plan of the accuracy suite (benchmarks/suite/plan.py): methods x seeds x learning rates.

No training: the plan is a pure function of the configuration and the finished runs' validation
scores, which these tests fake.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from benchmarks.suite import CONFIGS, chosen_lr, config_dict, plan_runs, recipe_defaults, run_settings

CPU = CONFIGS["cpu"]


def _fake(spec, auc):
    return {"key": spec.key, "val": {"roc_auc": auc, "accuracy": auc}}


def _fill(cfg, score, rounds=4):
    """Finish whatever is planned, ``rounds`` times (grids, then seeds, then ablations)."""
    results: dict = {}
    for _ in range(rounds):
        for s in plan_runs(cfg, results):
            results.setdefault(s.key, _fake(s, score(s)))
    return results


def test_cpu_configuration_is_the_informative_one():
    assert (CPU.img_size, CPU.epochs, CPU.batch_size) == (112, 5, 32)
    assert CPU.train_subset >= 600 and CPU.val_subset == 0 and CPU.test_subset == 0
    assert CPU.seeds == (0, 1, 2, 3, 4) and CPU.ablation_seeds == CPU.seeds
    assert set(CPU.methods) == {
        "shpeft",
        "full",
        "linear_probe",
        "bitfit",
        "lora",
        "random",
        "task_agnostic",
        "task_specific_per_row",
    }
    assert set(CPU.ablations) == {"rho", "estimator", "calibration_batches", "calibration_loss"}


def test_shpeft_runs_the_recipe_and_peers_search_their_grid_on_seed_zero():
    recipe = recipe_defaults()
    assert CPU.recipe == recipe
    first = plan_runs(CPU, {})
    assert {s.seed for s in first} == {0} and {s.group for s in first} == {"lr_search"}
    grids = {name: [s.lr for s in first if s.label == name] for name in CPU.methods}
    assert grids["shpeft"] == [recipe["lr_selected"]]
    assert grids["full"] == list(CPU.lr_grid_full) and grids["linear_probe"] == list(CPU.lr_grid_probe)
    for name in ("bitfit", "lora", "random", "task_agnostic", "task_specific_per_row"):
        assert grids[name] == list(CPU.lr_grid)
    sh = next(s for s in first if s.label == "shpeft")
    assert sh.shpeft["hybrid"] == recipe["hybrid"] and sh.shpeft["budget"] == recipe["budget"]
    assert sh.lr_head == recipe["lr_head"]
    probe = [s for s in first if s.label == "linear_probe"]
    assert all(s.lr_head == s.lr for s in probe)  # the probe's grid is its head's rate


def test_every_method_runs_five_seeds_at_its_validation_chosen_rate():
    results = _fill(replace(CPU, ablations=()), lambda s: 0.9 if s.lr == CPU.lr_grid[1] else 0.7)
    plan = plan_runs(replace(CPU, ablations=()), results)
    seeds = [s for s in plan if s.group == "methods"]
    assert Counter(s.label for s in seeds) == dict.fromkeys(CPU.methods, 5)
    for s in seeds:
        if s.label in ("bitfit", "lora", "random", "task_agnostic", "task_specific_per_row"):
            assert s.lr == CPU.lr_grid[1]
    grid_keys = {s.key for s in plan if s.group == "lr_search"}
    assert {s.key for s in seeds if s.seed == 0} <= grid_keys  # seed 0 at the chosen rate is not rerun
    assert len({s.key for s in plan}) == len(plan) - len(CPU.methods)


def test_ablations_centre_on_shpeft_with_the_same_seeds_and_reuse_its_runs():
    results = _fill(CPU, lambda s: 0.8)
    plan = plan_runs(CPU, results)
    centre = {s.key for s in plan if s.group == "methods" and s.label == "shpeft"}
    for abl in CPU.ablations:
        points = [s for s in plan if s.group == abl]
        assert {s.seed for s in points} == set(CPU.ablation_seeds)
        assert {s.lr for s in points} == {CPU.recipe["lr_selected"]}
        assert len(centre & {s.key for s in points}) == len(CPU.ablation_seeds)  # one point is the centre
    knob = "lam" if CPU.recipe["hybrid"] == "weighted" else "rho"  # the ratio of the recipe's rule
    ratio = sorted({s.label for s in plan if s.group == "rho"})
    assert ratio == [f"{knob}={x:g}" for x in (0.0, 0.25, 0.5, 0.75, 1.0)]


def test_lr_ties_go_to_the_smaller_learning_rate():
    cfg = replace(CPU, methods=("lora",), ablations=(), seeds=(0,))
    grid = plan_runs(cfg, {})
    assert chosen_lr({s.key: _fake(s, 0.75) for s in grid}, grid) == min(cfg.lr_grid)


def test_ablations_centre_on_the_hybrid_rule_that_won_on_validation():
    cfg = replace(CPU, methods=("shpeft_union", "shpeft_weighted"), ablations=("rho",), seeds=(0, 1))
    results = _fill(cfg, lambda s: 0.5 if s.group == "rho" else {"shpeft_union": 0.7}.get(s.label, 0.8))
    ablation = [s for s in plan_runs(cfg, results) if s.group == "rho"]
    assert {s.shpeft["hybrid"] for s in ablation} == {"weighted"}


def test_resume_keeps_runs_when_only_the_plan_changes():
    base = config_dict(CPU)
    wider = config_dict(replace(CPU, lr_grid=(1e-4, 1e-3, 1e-2), seeds=(0, 1), methods=("shpeft",)))
    assert run_settings(wider) == run_settings(base)
    for change in ({"epochs": 3}, {"img_size": 70}, {"train_subset": 0}, {"dataset": "/data/x"}):
        assert run_settings(config_dict(replace(CPU, **change))) != run_settings(base), change
    other_recipe = {**CPU.recipe, "lr_selected": 1e-3}
    assert run_settings(config_dict(replace(CPU, recipe=other_recipe))) != run_settings(base)
