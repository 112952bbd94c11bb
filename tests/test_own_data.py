"""A user's own folder end to end through the bundle: classes from the data, a self-describing run that
evaluation and inference read from ``--output_dir`` alone, refusals that name both values, readable errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from PIL import Image

from shpeft_monai import load_delta
from shpeft_monai.errors import RunConfigError, user_error_in

from .conftest import BUNDLE, REPO

CLASSES = ("glioma", "meningioma", "normal")
TINY = {
    "img_size": 28,
    "batch_size": 8,
    "num_workers": 0,
    "max_epochs": 1,
    "shpeft#calibration_batches": 1,
    "shpeft#head_warmup_steps": 1,
}


def _make_folder(root: Path, classes=CLASSES, per_class: int = 10, seed: int = 0) -> Path:
    """A folder per class of small distinct PNGs (class-dependent brightness so a model can learn)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 60, (40, 40), dtype=np.uint8) + 60 * c
            Image.fromarray(arr.astype(np.uint8)).save(root / name / f"{name}_{i}.png")
    return root


def _workflow(configs, run_id: str, **override) -> ConfigWorkflow:
    wf = ConfigWorkflow(config_file=[str(c) for c in configs], run_id=run_id, workflow_type=None, **override)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def _error(exc_info) -> BaseException:
    err = user_error_in(exc_info.value)
    assert err is not None, f"not a user-facing error: {exc_info.value!r}"
    return err


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    data = _make_folder(tmp_path_factory.mktemp("data") / "mri")
    out = tmp_path_factory.mktemp("run")
    _workflow([BUNDLE / "train.yaml"], "training", dataset=str(data), output_dir=str(out), **TINY)
    return data, out


def test_classes_and_data_identity_come_from_the_folder(own_run) -> None:
    data, out = own_run
    run = json.loads((out / "run.json").read_text())
    assert run["class_names"] == list(CLASSES) and run["num_classes"] == 3
    assert run["img_size"] == 28 and run["data"]["source"] == str(data)
    delta = load_delta(out / "best_delta.safetensors")
    assert delta.meta["class_names"] == list(CLASSES)  # the artefact describes itself
    assert delta.meta["data"]["sha256"] == run["data"]["sha256"]
    env = delta.meta["environment"]  # where it was trained: float results depend on it
    assert (
        env["torch"] == torch.__version__ and env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    )
    assert delta.head_numel == 384 * 3 + 3


def test_evaluating_reads_everything_from_output_dir(own_run) -> None:
    data, out = own_run
    _workflow([BUNDLE / "train.yaml", BUNDLE / "evaluate.yaml"], "evaluating", output_dir=str(out))
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    test_split = json.loads((out / "datalist.json").read_text())["test"]
    assert metrics["n"] == len(test_split) and metrics["class_names"] == list(CLASSES)
    assert set(metrics["per_class"]) == set(CLASSES)
    assert metrics["scored"]["source"] == str(data) and metrics["scored"]["split"] == "test"
    assert metrics["trained_with"] == load_delta(out / "best_delta.safetensors").meta["environment"]
    report = (out / "eval" / "report.md").read_text()
    assert f"| trained_with | torch {torch.__version__}, " in report
    assert report.startswith("# mri (test split)") and "Br35H" not in report
    rows = list(csv.DictReader((out / "eval" / "predictions.csv").open()))  # the per-sample audit trail
    assert [r["image"] for r in rows] == [r["image"] for r in test_split]
    assert [r["label"] for r in rows] == [CLASSES[r["label"]] for r in test_split]
    accuracy = sum(r["label"] == r["prediction"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(metrics["accuracy"])


def test_inference_writes_the_runs_class_names(own_run, tmp_path) -> None:
    data, out = own_run
    _workflow(
        [BUNDLE / "train.yaml", BUNDLE / "inference.yaml"],
        "inference",
        output_dir=str(out),
        input_dir=str(data / "normal"),
    )
    rows = list(csv.reader((out / "predictions.csv").open()))
    assert rows[0] == ["image", "prediction", *(f"prob_{c}" for c in CLASSES)]
    assert len(rows) == 11 and all(len(r) == 5 and r[1] in CLASSES for r in rows[1:])


@pytest.mark.parametrize(("key", "value"), [("img_size", 56), ("num_classes", 2), ("method", "full")])
def test_conflicting_value_at_evaluation_is_refused_naming_both(own_run, key, value) -> None:
    _, out = own_run
    with pytest.raises(Exception) as info:
        _workflow(
            [BUNDLE / "train.yaml", BUNDLE / "evaluate.yaml"],
            "evaluating",
            output_dir=str(out),
            **{key: value},
        )
    err = _error(info)
    assert isinstance(err, RunConfigError) and key in str(err) and repr(value) in str(err)


def test_other_data_only_when_asked_and_named(own_run, tmp_path) -> None:
    _, out = own_run
    other = _make_folder(tmp_path / "external", classes=CLASSES[:2], per_class=3, seed=5)
    with pytest.raises(Exception) as info:
        _workflow(
            [BUNDLE / "train.yaml", BUNDLE / "evaluate.yaml"],
            "evaluating",
            output_dir=str(out),
            dataset_dir=str(other),
        )
    assert "--eval_data" in str(_error(info))
    wf = _workflow(
        [BUNDLE / "train.yaml", BUNDLE / "evaluate.yaml"],
        "evaluating",
        output_dir=str(out),
        eval_data=str(other),
        eval_dir=str(tmp_path / "ext_eval"),
    )
    metrics = json.loads((tmp_path / "ext_eval" / "metrics.json").read_text())
    assert metrics["n"] == 6 and metrics["scored"]["source"] == str(other)
    assert (tmp_path / "ext_eval" / "report.md").read_text().startswith("# external (all images)")
    assert wf.parser.get_parsed_content("run").scored["split"] == "all"


def test_explicit_class_count_that_disagrees_is_refused_before_training(tmp_path) -> None:
    data = _make_folder(tmp_path / "four", classes=("a", "b", "c", "d"), per_class=6)
    out = tmp_path / "out"
    with pytest.raises(Exception) as info:
        _workflow(
            [BUNDLE / "train.yaml"], "training", dataset_dir=str(data), output_dir=str(out), num_classes=2
        )
    msg = str(_error(info))
    assert "2" in msg and "4" in msg and "a, b, c, d" in msg
    assert not (out / "mask.safetensors").exists()  # refused before selection or training


def test_training_into_a_run_with_other_settings_is_refused(own_run) -> None:
    data, out = own_run
    with pytest.raises(Exception) as info:
        _workflow(
            [BUNDLE / "train.yaml"],
            "training",
            dataset=str(data),
            output_dir=str(out),
            **{**TINY, "img_size": 56},
        )
    msg = str(_error(info))
    assert "img_size" in msg and "28" in msg and "56" in msg


def test_edited_datalist_is_refused(own_run, tmp_path) -> None:
    import shutil

    _, out = own_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    listing = json.loads((copy / "datalist.json").read_text())
    listing["test"][0]["label"] = (listing["test"][0]["label"] + 1) % 3
    (copy / "datalist.json").write_text(json.dumps(listing))
    with pytest.raises(Exception) as info:
        _workflow([BUNDLE / "train.yaml", BUNDLE / "evaluate.yaml"], "evaluating", output_dir=str(copy))
    assert "edited" in str(_error(info))


def test_bundle_error_ends_readably_with_nonzero_exit(tmp_path) -> None:
    """The last lines a user sees state the problem; no traceback unless SHPEFT_TRACEBACK=1."""
    data = _make_folder(tmp_path / "four", classes=("a", "b", "c", "d"), per_class=6)
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        str(BUNDLE / "train.yaml"),
        "--dataset_dir",
        str(data),
        "--num_classes",
        "2",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    env = {k: v for k, v in os.environ.items() if k != "SHPEFT_TRACEBACK"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode != 0
    tail = proc.stderr.strip().splitlines()[-6:]
    assert any("num_classes" in line for line in tail), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Failed to evaluate" not in proc.stderr
    assert "SHPEFT_TRACEBACK=1" in tail[-1]


def test_a_training_subset_smaller_than_the_classes_is_refused_naming_the_option(own_run, tmp_path) -> None:
    data, _ = own_run
    with pytest.raises(Exception) as info:
        _workflow(
            [BUNDLE / "train.yaml"],
            "training",
            dataset=str(data),
            output_dir=str(tmp_path),
            **{**TINY, "train_subset": 2},
        )
    err = _error(info)
    assert isinstance(err, RunConfigError) and "train_subset=2" in str(err) and "3 classes" in str(err)
    assert not (tmp_path / "run.json").exists()  # nothing written
