"""Step-cost benchmark: output schema and cost invariants on a tiny ViT (timing is never asserted)."""

from __future__ import annotations

import json

import pytest
import timm

from benchmarks.step_cost import (
    METHODS,
    StepOptions,
    make_report,
    render_markdown,
    render_table,
    run_benchmark,
)
from shpeft_monai import SHPEFTConfig, eligible_parameters

pytest.importorskip("peft")

TINY = {"name": "vit_tiny_patch16_224", "kwargs": {"depth": 2}}
OPTS = StepOptions(batch_size=2, steps=1, warmup=0, img_size=32, threads=2)
KEYS = {
    "model",
    "method",
    "weights",
    "total_params",
    "trainable_params",
    "updated_params",
    "selected_backbone_weights",
    "head_params",
    "step_s",
    "forward_s",
    "backward_s",
    "optimizer_s",
    "peak_bytes",
    "optimizer_state_bytes",
    "grad_bytes",
    "selection_s",
    "memory_method",
    "step_flops_per_sample",
    "saved_for_backward_bytes",
    "time_vs_full",
    "peak_vs_full",
}


@pytest.fixture(scope="module")
def report() -> dict:
    results = run_benchmark({"tiny": TINY}, METHODS, OPTS, isolate=False, log=lambda _: None)
    return make_report(results, OPTS, {"tiny": TINY}, METHODS, isolate=False)


@pytest.fixture(scope="module")
def by_method(report: dict) -> dict[str, dict]:
    return {r["method"]: r for r in report["results"]}


def _expected_k() -> int:
    model = timm.create_model(TINY["name"], num_classes=2, img_size=32, **TINY["kwargs"])
    n = sum(p.numel() for p in eligible_parameters(model, SHPEFTConfig()).values())
    return SHPEFTConfig().budget_for(n)


def test_every_method_reports_the_schema(by_method: dict[str, dict]) -> None:
    assert set(by_method) == set(METHODS)
    for method, r in by_method.items():
        assert "error" not in r, (method, r.get("error"))
        assert set(r) >= KEYS, (method, sorted(KEYS - set(r)))
        assert r["step_s"] > 0 and r["peak_bytes"] >= 0
        assert r["final_loss"] == r["final_loss"]  # finite loss, not NaN
        assert "_mask" not in r


def test_shpeft_trains_exactly_k_plus_head(by_method: dict[str, dict]) -> None:
    sh = by_method["shpeft"]
    assert sh["selected_backbone_weights"] == _expected_k()
    assert sh["trainable_params"] == sh["selected_backbone_weights"] + sh["head_params"]
    assert sh["updated_params"] == sh["trainable_params"]
    assert sh["selection_s"] > 0


def test_shpeft_optimizer_state_is_order_k(by_method: dict[str, dict]) -> None:
    sh, full = by_method["shpeft"], by_method["full"]
    assert sh["optimizer_state_bytes"] * 100 < full["optimizer_state_bytes"]
    # AdamW: two float32 moments per trainable value plus a step scalar per tensor
    assert sh["optimizer_state_bytes"] <= 8 * sh["trainable_params"] + 8 * 256
    assert sh["grad_bytes"] <= 4 * sh["trainable_params"]
    # no dense weight-gradient products: fewer counted FLOPs than full fine-tuning
    assert 0 < sh["step_flops_per_sample"] < full["step_flops_per_sample"]


def test_peers_count_what_they_train(by_method: dict[str, dict]) -> None:
    full, sh = by_method["full"], by_method["shpeft"]
    assert full["trainable_params"] == full["total_params"]
    gps = by_method["gps"]
    assert gps["trainable_params"] == gps["total_params"]  # dense optimizer, masked gradients
    assert gps["selected_backbone_weights"] == sh["selected_backbone_weights"]
    assert gps["updated_params"] == sh["trainable_params"]
    assert gps["optimizer_state_bytes"] == full["optimizer_state_bytes"]
    lora = by_method["lora"]
    assert 0 < lora["trainable_params"] < lora["total_params"]
    probe = by_method["linear_probe"]
    assert probe["trainable_params"] == probe["head_params"] == sh["head_params"]


def test_floor_trains_the_head_and_shpeft_counts_no_more_work(
    report: dict, by_method: dict[str, dict]
) -> None:
    floor, sh, probe = by_method["floor"], by_method["shpeft"], by_method["linear_probe"]
    assert floor["trainable_params"] == floor["updated_params"] == floor["head_params"]
    # the floor runs the backward pass through the backbone (input gradients), the probe does not
    assert floor["step_flops_per_sample"] > probe["step_flops_per_sample"]
    # SH-PEFT's entry gradients are not GEMMs: its counted work never exceeds the floor's
    assert sh["step_flops_per_sample"] <= floor["step_flops_per_sample"]
    assert {"time_vs_floor", "cpu_time_vs_floor", "peak_vs_floor"} <= set(report["targets"]["tiny"])
    # no weight gradient, no saved full inputs: less kept for backward than full fine-tuning
    assert 0 < sh["saved_for_backward_bytes"] < by_method["full"]["saved_for_backward_bytes"]
    assert 0 < floor["saved_for_backward_bytes"] < by_method["full"]["saved_for_backward_bytes"]


def test_report_has_ratios_targets_and_renders(report: dict, by_method: dict[str, dict]) -> None:
    assert by_method["full"]["time_vs_full"] == pytest.approx(1.0)
    assert by_method["full"]["peak_vs_full"] == pytest.approx(1.0)
    t = report["targets"]["tiny"]
    assert {"time_vs_full", "time_vs_lora", "peak_vs_gps", "optimizer_state_is_O_k"} <= set(t)
    assert t["optimizer_state_is_O_k"] is True
    assert {"cpu_count", "torch", "device_name", "torch_threads"} <= set(report["machine"])
    assert report["settings"]["batch_size"] == OPTS.batch_size
    json.loads(json.dumps(report))  # JSON-serialisable as written
    table, md = render_table(report["results"]), render_markdown(report)
    for method in METHODS:
        assert method in table and f"| {method} |" in md


def test_command_line_writes_json_and_markdown(tmp_path, monkeypatch) -> None:
    from benchmarks import step_cost

    monkeypatch.setitem(step_cost.MODELS, "tiny", TINY)
    out = tmp_path / "step_cost.json"
    argv = "--models tiny --methods linear_probe --img-size 32 --batch-size 1 --steps 1 --warmup 0"
    report = step_cost.main([*argv.split(), "--no-isolate", "--no-flops", "--out", str(out)])
    assert json.loads(out.read_text())["results"][0]["method"] == "linear_probe"
    assert out.with_suffix(".md").read_text().startswith("# Train-step cost")
    assert report["settings"]["threads"] == 2


def test_command_line_autocast_bf16_trains_shpeft(tmp_path, monkeypatch) -> None:
    from benchmarks import step_cost

    monkeypatch.setitem(step_cost.MODELS, "tiny", TINY)
    out = tmp_path / "step_cost.json"
    argv = "--models tiny --methods shpeft --img-size 32 --batch-size 2 --steps 1 --warmup 0 --autocast bf16"
    report = step_cost.main([*argv.split(), "--no-isolate", "--no-flops", "--out", str(out)])
    (result,) = report["results"]
    assert report["settings"]["amp"] == "bf16"
    assert "error" not in result and result["final_loss"] == result["final_loss"]
    assert result["trainable_params"] == result["selected_backbone_weights"] + result["head_params"]
