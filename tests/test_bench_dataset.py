"""The suite on data the user brings (``python -m benchmarks.suite --dataset <folder>``), end to end.

A 3-class folder of tiny generated PNGs (two byte-identical copies among them, so that the content
groups are not all singletons), a 2-block random-init ViT, one epoch, two methods, one seed: the
JSON keeps per-sample test predictions with their groups, and the markdown carries the interval
columns. Timing is never asserted.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from benchmarks.suite import CONFIGS, run_suite

CLASSES = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_data")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(12):
            img = rng.integers(0, 60, size=(20, 20, 3), dtype=np.uint8)
            img[..., c] += 150  # a class-specific colour: learnable
            Image.fromarray(img).save(root / name / f"{i:02d}.png")
    shutil.copy(root / "alpha" / "00.png", root / "alpha" / "00_copy.png")
    return root


@pytest.fixture(scope="module")
def report(folder, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SHPEFT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    cfg = replace(
        CONFIGS["tiny"],
        name="tiny_own",
        dataset=str(folder),
        vit="vit_tiny_patch16_224",
        pretrained=False,
        network_kwargs={"depth": 2},
        img_size=32,
        train_subset=0,
        val_subset=0,
        test_subset=0,
        epochs=1,
        batch_size=8,
        seeds=(0,),
        methods=("shpeft", "linear_probe"),
        ablations=(),
        n_boot=200,
    )
    out = tmp_path_factory.mktemp("results")
    try:
        rep = run_suite(cfg, out, command="pytest")
    finally:
        mp.undo()
    rep["_out"] = out
    return rep


def test_json_keeps_per_sample_test_predictions_with_groups(report):
    data = json.loads((report["_out"] / "suite_tiny_own.json").read_text())
    items = data["test_items"]
    assert items and {"image", "label", "group"} <= set(items[0])
    assert data["dataset"]["class_names"] == list(CLASSES)
    assert data["dataset"]["sizes"]["test"] == len(items)
    for run in data["runs"]:
        assert len(run["test_pred"]) == len(items) == run["test"]["n"]
        assert np.asarray(run["test_prob"]).shape == (len(items), len(CLASSES))
        acc = np.mean(np.asarray(run["test_pred"]) == [d["label"] for d in items])
        assert acc == pytest.approx(run["test"]["accuracy"])


def test_summary_has_grouped_intervals_and_paired_differences(report):
    rows = [r for r in report["summary"] if r["group"] == "methods"]
    assert {r["label"] for r in rows} == {"shpeft", "linear_probe"}
    n_groups = len({str(d["group"]) for d in report["test_items"]})
    for r in rows:
        ci = r["test_accuracy_ci"]
        assert ci["n_groups"] == n_groups and ci["low"] <= ci["estimate"] <= ci["high"]
    (pair,) = [p for p in report["paired"] if p["group"] == "methods"]
    assert (pair["a"], pair["b"]) == ("shpeft", "linear_probe")
    assert pair["n_groups"] == n_groups and pair["low"] <= pair["mean"] <= pair["high"]


def test_markdown_has_the_interval_columns(report):
    md = (report["_out"] / "suite_tiny_own.md").read_text()
    for column in ("test acc % per seed", "95 % CI (grouped)", "test groups", "CI excludes 0"):
        assert column in md
    assert "| shpeft − linear_probe |" in md
    assert "macro one-vs-rest" in md  # three classes
