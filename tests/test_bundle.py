"""The MONAI bundle through MONAI's own config workflow, with tiny settings (real data, real weights)."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from monai.bundle import ConfigWorkflow

from shpeft_monai import data as sdata
from shpeft_monai import load_delta
from shpeft_monai.io import load_mask

TINY = {
    "img_size": 28,
    "train_subset": 16,
    "val_subset": 8,
    "test_subset": 8,
    "batch_size": 8,
    "num_workers": 0,
    "max_epochs": 1,
    "shpeft#calibration_batches": 1,
    "shpeft#head_warmup_steps": 1,
}


def _chain(exc: BaseException) -> str:
    """All messages of an exception and its causes (MONAI wraps errors raised in configs)."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def _run(configs, run_id: str, **override) -> ConfigWorkflow:
    wf = ConfigWorkflow(
        config_file=[str(c) for c in configs], run_id=run_id, workflow_type=None, **{**TINY, **override}
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.conftest import BUNDLE

    out = tmp_path_factory.mktemp("run")
    _run([BUNDLE / "train.yaml"], "training", output_dir=str(out))
    return BUNDLE, out


def test_training_writes_delta_mask_history(trained) -> None:
    _, out = trained
    delta = load_delta(out / "best_delta.safetensors")
    mask = load_mask(out / "mask.safetensors").mask
    assert delta.mask.fingerprint == mask.fingerprint
    assert 2000 <= delta.mask.k <= 2300  # 0.01 % of ViT-S/14's eligible weights
    assert delta.head_numel == 384 * 2 + 2
    assert (out / "best_delta.safetensors").stat().st_size < 100_000  # never a full checkpoint
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1] and "val_auc" in history[0] and "val_selection" in history[0]


def test_resume_restores_same_mask_and_continues(trained, tmp_path) -> None:
    bundle, out = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    before = load_mask(resumed / "mask.safetensors").mask.fingerprint
    wf = _run([bundle / "train.yaml"], "training", output_dir=str(resumed), max_epochs=2)
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 2
    assert load_mask(resumed / "mask.safetensors").mask.fingerprint == before
    from shpeft_monai import get_mask

    assert get_mask(wf.parser.get_parsed_content("network")).fingerprint == before
    assert [h["epoch"] for h in json.loads((resumed / "history.json").read_text())] == [1, 2]


def test_evaluation_report_is_well_formed(trained) -> None:
    bundle, out = trained
    _run([bundle / "train.yaml", bundle / "evaluate.yaml"], "evaluating", output_dir=str(out))
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 8 and 0.0 <= metrics["accuracy"] <= 1.0
    assert sum(map(sum, metrics["confusion_matrix"])) == 8
    assert metrics["selected_backbone_weights"] > 0 and metrics["artefact_bytes"] > 0
    for png in ("confusion_matrix.png", "roc_curve.png", "training_curves.png", "selection.png"):
        assert (out / "eval" / png).read_bytes()[:4] == b"\x89PNG"
    assert "| accuracy |" in (out / "eval" / "report.md").read_text()


def test_inference_csv_and_unreadable_files(trained, tmp_path) -> None:
    bundle, out = trained
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted((sdata.br35h_root() / "yes").iterdir())[:3]:
        shutil.copy(p, images / p.name)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(Exception) as info:
        _run(
            [bundle / "train.yaml", bundle / "inference.yaml"],
            "inference",
            output_dir=str(out),
            input_dir=str(images),
        )
    assert "broken.jpg" in _chain(info.value) and "skip_bad" in _chain(info.value)
    _run(
        [bundle / "train.yaml", bundle / "inference.yaml"],
        "inference",
        output_dir=str(out),
        input_dir=str(images),
        skip_bad_samples=True,
    )
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 3 and {r["prediction"] for r in rows} <= {"no_tumour", "tumour"}
    for r in rows:
        assert abs(float(r["prob_no_tumour"]) + float(r["prob_tumour"]) - 1) < 1e-4


def test_label_out_of_range_fails_before_training(tmp_path) -> None:
    from tests.conftest import BUNDLE

    split = sdata.load_split("br35h")
    bad = {k: [dict(r) for r in v[:8]] for k, v in split.items()}
    bad["train"][3]["label"] = 5
    (tmp_path / "list.json").write_text(json.dumps(bad))
    with pytest.raises(Exception) as info:
        _run(
            [BUNDLE / "train.yaml"],
            "training",
            output_dir=str(tmp_path / "o"),
            dataset=str(tmp_path / "list.json"),
            train_subset=0,
            val_subset=0,
            test_subset=0,
        )
    assert "label 5" in _chain(info.value) and "no training image" in _chain(info.value)
    assert not (tmp_path / "o" / "mask.safetensors").exists()  # failed before selection and training
