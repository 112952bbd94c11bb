"""The bundle-seeds report: per-seed figures, grouped intervals and paired differences from run folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import bundle_seeds, stats

IMAGES = [f"/data/img{i}.png" for i in range(6)]
GROUPS = [0, 0, 1, 2, 2, 3]  # near-duplicate groups of the six test files
LABELS = ["a", "b", "a", "b", "b", "a"]


ZEN = {"cpu": "AMD EPYC", "cpu_capability": "AVX2", "threads": 2, "torch": "2.14.1"}
XEON = {**ZEN, "cpu": "Intel Xeon", "cpu_capability": "AVX512"}


def _fake_run(
    root: Path, name: str, correct: list[int], accuracy_json: float | None = None, env: dict | None = None
) -> None:
    out = root / name
    (out / "eval").mkdir(parents=True)
    other = {"a": "b", "b": "a"}
    rows = [[img, y, y if c else other[y], "0.5", "0.5"] for img, y, c in zip(IMAGES, LABELS, correct)]
    with (out / "eval" / "predictions.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([["image", "label", "prediction", "prob_a", "prob_b"], *rows])
    acc = float(np.mean(correct)) if accuracy_json is None else accuracy_json
    (out / "eval" / "metrics.json").write_text(
        json.dumps(
            {"accuracy": acc, "balanced_accuracy": acc, "f1_macro": acc, "roc_auc": 0.9, "trained_with": env}
        )
    )
    test = [{"image": i, "label": 0, "group": g} for i, g in zip(IMAGES, GROUPS)]
    (out / "datalist.json").write_text(json.dumps({"train": [{"image": "t", "label": 0}] * 4, "test": test}))
    run = {"data": {"source": "br35h", "sizes": {}}, "network_name": "vit", "img_size": 112}
    (out / "run.json").write_text(json.dumps(run))


def test_summary_uses_groups_and_pairs_the_same_seeds(tmp_path) -> None:
    sh = {0: [1, 1, 1, 1, 0, 1], 1: [1, 1, 0, 1, 1, 1]}
    peer = {0: [1, 1, 0, 0, 0, 1], 1: [0, 0, 1, 1, 1, 1], 2: [1, 1, 1, 1, 1, 1]}  # seed 2: no SH-PEFT pair
    for s, c in sh.items():
        _fake_run(tmp_path, f"shpeft_s{s}", c)
    for s, c in peer.items():
        _fake_run(tmp_path, f"random_mask_s{s}", c)
    summary = bundle_seeds.summarize(bundle_seeds.collect(tmp_path))
    assert summary["n_test_groups"] == 4 and summary["n_test_files"] == 6 and summary["train_images"] == 4
    m = summary["methods"]["shpeft"]
    assert [r["accuracy"] for r in m["runs"]] == pytest.approx([5 / 6, 5 / 6])
    assert m["grouped_ci"]["n_groups"] == 4
    d = summary["paired_vs_shpeft"]["random_mask"]
    assert d["seeds"] == [0, 1] and d["per_seed"] == pytest.approx([2 / 6, 1 / 6])
    expected = stats.paired_difference(
        np.array([sh[0], sh[1]]), np.array([peer[0], peer[1]]), GROUPS
    )  # the same groups and seeds
    assert d["low"] == pytest.approx(expected["low"]) and d["high"] == pytest.approx(expected["high"])
    text = bundle_seeds.render(summary, "cmd")
    assert "| shpeft | 2 | 83.3, 83.3 |" in text and "| random_mask | 2 | +33.3, +16.7 |" in text


def test_runs_that_scored_other_files_are_refused(tmp_path) -> None:
    _fake_run(tmp_path, "shpeft_s0", [1] * 6)
    _fake_run(tmp_path, "full_finetune_s0", [1] * 6)
    preds = tmp_path / "shpeft_s0" / "eval" / "predictions.csv"  # read after full_finetune_s0
    preds.write_text(preds.read_text().replace("img5", "img9"))
    with pytest.raises(ValueError, match="another test split"):
        bundle_seeds.collect(tmp_path)


def test_ablation_points_override_one_setting_and_skip_the_bundles_own() -> None:
    from shpeft_monai.recipe import DEFAULTS

    points = bundle_seeds.ablation_points(["rho", "estimator", "calibration_loss"], "cpu_demo.yaml")
    assert f"lam={DEFAULTS.lam:g}" not in points and "estimator=l1" not in points  # the shpeft run itself
    assert {"lam=0", "lam=1"} <= set(points) and len([p for p in points if p.startswith("lam=")]) == 4
    assert "calibration_loss=ce+warmup" not in points
    assert points["lam=0.25"][:4] == ["--shpeft#hybrid", "weighted", "--shpeft#lam", "0.25"]
    assert points["calibration_loss=ce+no_warmup"][-2:] == ["--shpeft#head_warmup_steps", "0"]
    assert points["estimator=l2"][-2:] == ["--shpeft#head_warmup_steps", "10"]  # cpu_demo's warm-up
    assert points["estimator=activation"][2:4] == ["--shpeft#task_signal", "activation"]  # forward-only


def test_ablation_runs_are_reported_and_paired(tmp_path) -> None:
    _fake_run(tmp_path, "shpeft_s0", [1, 1, 1, 1, 0, 1])
    _fake_run(tmp_path, "lam=0.25_s0", [1, 0, 1, 1, 0, 1])
    history = [
        {"epoch": e, "val_auc": 0.5 + e / 10, "val_balanced_accuracy": 0.5, "val_selection": s}
        for e, s in ((1, 0.6), (2, 0.7), (3, 0.65))
    ]
    (tmp_path / "shpeft_s0" / "history.json").write_text(json.dumps(history))  # no best_epoch recorded
    (tmp_path / "lam=0.25_s0" / "history.json").write_text(json.dumps(history))
    metrics = tmp_path / "lam=0.25_s0" / "eval" / "metrics.json"
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "best_epoch": 2}))
    summary = bundle_seeds.summarize(bundle_seeds.collect(tmp_path))
    assert list(summary["methods"]) == ["shpeft", "lam=0.25"]
    assert summary["methods"]["lam=0.25"]["runs"][0]["val_auc"] == pytest.approx(0.7)  # the chosen epoch
    assert summary["methods"]["shpeft"]["runs"][0]["val_auc"] == pytest.approx(0.7)  # best val_selection
    assert summary["methods"]["lam=0.25"]["kind"] == "ablation"
    assert summary["paired_vs_shpeft"]["lam=0.25"]["per_seed"] == pytest.approx([1 / 6])


def test_keep_pools_an_earlier_reports_runs_and_refuses_another_split(tmp_path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    _fake_run(first, "shpeft_s0", [1, 1, 1, 1, 0, 1], env=XEON)
    _fake_run(first, "full_finetune_s0", [1, 0, 1, 1, 0, 1])  # a run that did not record it
    earlier = json.loads(json.dumps(bundle_seeds.summarize(bundle_seeds.collect(first))))  # as stored
    _fake_run(second, "shpeft_s1", [1, 1, 0, 1, 1, 1], env=ZEN)
    _fake_run(second, "full_finetune_s1", [0, 0, 0, 1, 1, 1], env=ZEN)
    pooled = bundle_seeds.summarize(bundle_seeds.collect(second, earlier))
    both = bundle_seeds.summarize(bundle_seeds.collect(second))  # without the earlier runs
    assert pooled["methods"]["shpeft"]["seeds"] == [0, 1] and both["methods"]["shpeft"]["seeds"] == [1]
    assert pooled["paired_vs_shpeft"]["full_finetune"]["per_seed"] == pytest.approx([1 / 6, 2 / 6])
    expected = stats.paired_difference(
        np.array([[1, 1, 1, 1, 0, 1], [1, 1, 0, 1, 1, 1]]),
        np.array([[1, 0, 1, 1, 0, 1], [0, 0, 0, 1, 1, 1]]),
        GROUPS,
    )
    assert pooled["paired_vs_shpeft"]["full_finetune"]["low"] == pytest.approx(expected["low"])
    text = bundle_seeds.render(pooled, "cmd")  # each run says where it was trained, kept runs too
    assert "- Intel Xeon (AVX512), 2 threads, torch 2.14.1: shpeft s0\n" in text
    assert "- AMD EPYC (AVX2), 2 threads, torch 2.14.1: shpeft s1, full_finetune s1\n" in text
    assert "- not recorded (trained before runs recorded it): full_finetune s0\n" in text
    only = bundle_seeds.summarize(bundle_seeds.collect(tmp_path / "none", earlier))  # no run folder at all
    assert only["methods"]["shpeft"]["seeds"] == [0] and only["train_images"] == 4

    other = json.loads(json.dumps(earlier))
    other["img_size"] = 224
    with pytest.raises(ValueError, match="another test split or setting"):
        bundle_seeds.collect(second, other)
    old = {k: v for k, v in earlier.items() if k != "test_groups"}
    with pytest.raises(ValueError, match="no per-file results"):
        bundle_seeds.collect(second, old)
