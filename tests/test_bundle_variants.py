"""Every overlay of the bundle parses and means what it says; each method trains what it claims; the 3D
overlay runs end to end on its stand-in task."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from torch import nn

from shpeft_monai import SHPEFTConfig, load_delta
from shpeft_monai.data import load_medical_image, load_split
from shpeft_monai.methods import METHODS, trainable_parameters
from shpeft_monai.model import eligible_parameters, get_mask, head_parameters
from tests.conftest import BUNDLE, REPO

OVERLAYS = BUNDLE / "overlays"
ALL_OVERLAYS = sorted(p.name for p in OVERLAYS.glob("*.yaml"))
# overlay -> (method, shpeft#hybrid) it must select
METHOD_OVERLAYS = {
    "full_finetune.yaml": ("full", "weighted"),
    "linear_probe.yaml": ("linear_probe", "weighted"),
    "bitfit.yaml": ("bitfit", "weighted"),
    "lora.yaml": ("lora", "weighted"),
    "task_specific.yaml": ("shpeft", "task_specific"),
    "task_agnostic.yaml": ("shpeft", "task_agnostic"),
    "random_mask.yaml": ("shpeft", "random"),
    "gps_per_row.yaml": ("shpeft", "task_specific"),
    "efficientnet_lite0.yaml": ("shpeft", "weighted"),
}
TINY = {
    "img_size": 28,
    "train_subset": 16,
    "val_subset": 8,
    "batch_size": 8,
    "num_workers": 0,
    "max_epochs": 1,
    "shpeft#calibration_batches": 1,
    "shpeft#head_warmup_steps": 1,
}


def _parser(*overlays: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "train.yaml"), *(str(OVERLAYS / o) for o in overlays)])
    parser.update(overrides)
    return parser


def _run(configs: list[Path], **overrides) -> ConfigWorkflow:
    wf = ConfigWorkflow(
        config_file=[str(c) for c in configs], run_id="training", workflow_type=None, **overrides
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


# ---- fast: every overlay parses --------------------------------------------------------------------------


def test_every_method_overlay_is_listed() -> None:
    assert set(METHOD_OVERLAYS) <= set(ALL_OVERLAYS)


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_overlay_parses_and_builds_a_valid_config(overlay) -> None:
    first = (OVERLAYS / overlay).read_text().splitlines()[0]
    assert first.startswith("# ") and len(first) > 20, f"{overlay}: start with a one-line comment"
    parser = _parser(overlay)
    assert parser.get_parsed_content("method") in METHODS
    assert isinstance(parser.get_parsed_content("network_name"), str)
    assert Path(parser.get_parsed_content("output_dir")).is_absolute()
    SHPEFTConfig.from_dict(parser.get_parsed_content("shpeft"))  # validates every switch


@pytest.mark.parametrize("overlay", sorted(METHOD_OVERLAYS))
def test_method_overlay_selects_its_method(overlay) -> None:
    parser = _parser(overlay)
    method, hybrid = METHOD_OVERLAYS[overlay]
    assert parser.get_parsed_content("method") == method
    assert SHPEFTConfig.from_dict(parser.get_parsed_content("shpeft")).hybrid == hybrid


def test_method_overlays_write_to_their_own_output_dir() -> None:
    dirs = [_parser(o).get_parsed_content("output_dir") for o in sorted(METHOD_OVERLAYS)]
    default = _parser().get_parsed_content("output_dir")
    assert len(set(dirs)) == len(dirs) and default not in dirs


def test_efficientnet_overlay_builds_the_cnn_without_img_size() -> None:
    from shpeft_monai import bundle as sb
    from shpeft_monai.run_record import RunRecord

    parser = _parser("efficientnet_lite0.yaml")
    assert parser.get_parsed_content("network_name") == "tf_efficientnet_lite0"
    run = RunRecord(
        network_name="tf_efficientnet_lite0",
        img_size=112,  # the resize only: a CNN takes any input size
        spatial_dims=2,
        num_classes=3,
        class_names=("a", "b", "c"),
        method="shpeft",
        lora={},
        preprocessing={"mean": [0.5] * 3, "std": [0.5] * 3},
        data={},
        datalist_sha256="",
        datalist={},
    )
    assert sb.build_network(run).get_classifier().out_features == 3


def test_multi_gpu_overlay_holds_only_ddp_samplers_and_steps() -> None:
    """Rank-0-only handlers are gated in train.yaml (model-zoo style), not by list position in the overlay."""
    overlay = (OVERLAYS / "multi_gpu.yaml").read_text()
    assert "#_disabled_" not in overlay and "handlers#" not in overlay
    parser = _parser("multi_gpu.yaml")
    gated = {h["_target_"] for h in parser["train#handlers"] if h.get("_disabled_") == "@is_not_rank0"}
    assert gated == {
        "ignite.handlers.ProgressBar",
        "StatsHandler",
        "TensorBoardStatsHandler",
        "shpeft_monai.handlers.TrainingHistory",
    }
    every_rank = {h["_target_"] for h in parser["train#handlers"] if "_disabled_" not in h}
    assert {"ValidationHandler", "shpeft_monai.handlers.TrainingCheckpoint"} <= every_rank
    validate = {h["_target_"]: h.get("_disabled_") for h in parser["validate#handlers"]}
    assert validate["shpeft_monai.handlers.BestArtefactSaver"] == "@is_not_rank0"
    assert validate["shpeft_monai.handlers.ValidationMetrics"] is None  # every rank computes its metrics
    assert parser["network#_target_"] == "torch.nn.parallel.DistributedDataParallel"
    assert parser["network#module"] == "@peft_network"
    assert parser["train#dataloader#sampler"] == "@train#sampler"
    assert parser["validate#dataloader#sampler"] == "@validate#sampler"
    assert "sampler" not in parser["train#calib_loader"]  # every rank calibrates on the same batches
    assert parser.get_parsed_content("dist_backend") == "nccl"


def test_volume3d_overlay() -> None:
    parser = _parser("volume3d.yaml")
    assert parser.get_parsed_content("spatial_dims") == 3
    assert parser["network_def#_target_"] == "monai.networks.nets.DenseNet121"
    assert parser.get_parsed_content("class_names") == ["original", "flipped"]
    assert "class_layers" in SHPEFTConfig.from_dict(parser.get_parsed_content("shpeft")).head


# ---- the 3D stand-in task --------------------------------------------------------------------------------


def _standin_module():
    spec = importlib.util.spec_from_file_location(
        "make_volume_standin", REPO / "scripts" / "make_volume_standin.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_volume_standin", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    return _standin_module().build(tmp_path_factory.mktemp("volume3d_data"))


def test_standin_labels_are_superior_inferior_flips(standin) -> None:
    splits = load_split(standin)
    assert all(splits[s] for s in ("train", "validation", "test"))
    groups = {s: {r["group"] for r in recs} for s, recs in splits.items()}
    assert not (groups["train"] & groups["validation"] or groups["train"] & groups["test"])
    records = [r for recs in splits.values() for r in recs]
    originals = {r["image"]: r for r in records if r["label"] == 0}
    assert len(originals) * 2 == len(records)
    for path in list(originals)[:3]:
        flipped = path.replace("_original.nii.gz", "_flipped.nii.gz")
        a, b = load_medical_image(path, 3), load_medical_image(flipped, 3)
        assert a.shape[0] == 1 and a.ndim == 4
        np.testing.assert_array_equal(a[..., ::-1], b)
        assert not np.array_equal(a, b)


def test_volume3d_trains_one_epoch(standin, tmp_path) -> None:
    """SH-PEFT on a random-init MONAI DenseNet121 (Conv3d kernels) over real NIfTI volumes: plumbing only."""
    out = tmp_path / "run"
    wf = _run(
        [BUNDLE / "train.yaml", OVERLAYS / "volume3d.yaml"],
        dataset=str(standin),
        output_dir=str(out),
        train_subset=4,
        val_subset=4,
        max_epochs=1,
        batch_size=4,
        **{"shpeft#calibration_batches": 1, "shpeft#head_warmup_steps": 1},
    )
    network = wf.parser.get_parsed_content("network")
    mask = get_mask(network)
    head = network.class_layers.out
    assert (
        sum(p.numel() for p in trainable_parameters(network))
        == mask.k + head.weight.numel() + head.bias.numel()
    )
    assert all(len(mask.shapes[n]) == 5 for n in mask.indices)  # Conv3d kernels only
    delta = load_delta(out / "best_delta.safetensors")
    assert delta.mask.fingerprint == mask.fingerprint
    assert delta.meta["class_names"] == ["original", "flipped"]


# ---- slow: one tiny epoch per method overlay, trainable counts by definition -----------------------------


def _expected_trainable(method: str, base: nn.Module, cfg: SHPEFTConfig, lora: dict) -> int:
    head = sum(p.numel() for p in head_parameters(base, cfg).values())
    if method == "full":
        return sum(p.numel() for p in base.parameters())
    if method == "linear_probe":
        return head
    if method == "bitfit":
        head_names = set(head_parameters(base, cfg))
        return head + sum(
            p.numel() for n, p in base.named_parameters() if n.endswith("bias") and n not in head_names
        )
    if method == "lora":
        targets = [
            m
            for n, m in base.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in lora["target_modules"]
        ]
        return head + sum(int(lora["r"]) * (m.in_features + m.out_features) for m in targets)
    n_eligible = sum(p.numel() for p in eligible_parameters(base, cfg).values())
    return head + cfg.budget_for(n_eligible)


@pytest.mark.slow
@pytest.mark.parametrize("overlay", sorted(METHOD_OVERLAYS))
def test_method_overlay_trains_what_it_claims(overlay, tmp_path) -> None:
    overrides = {**TINY, "output_dir": str(tmp_path / "run")}
    wf = _run([BUNDLE / "train.yaml", OVERLAYS / overlay], **overrides)
    method, _ = METHOD_OVERLAYS[overlay]
    network = wf.parser.get_parsed_content("network")
    n_trained = sum(p.numel() for p in trainable_parameters(network))
    optimizer = wf.parser.get_parsed_content("optimizer")
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == n_trained

    reference = _parser(overlay, **overrides)  # a fresh, untouched base network
    base = reference.get_parsed_content("network_def")
    cfg = SHPEFTConfig.from_dict(reference.get_parsed_content("shpeft"))
    assert n_trained == _expected_trainable(method, base, cfg, reference.get_parsed_content("lora"))

    out = tmp_path / "run"
    if method == "shpeft":
        assert get_mask(network).k == load_delta(out / "best_delta.safetensors").mask.k
    else:
        assert (out / "best_trainable.safetensors").is_file()
    assert (out / "history.json").is_file()
    with torch.no_grad():  # the trained network still runs
        network.eval()(torch.zeros(1, 3, 28, 28))
