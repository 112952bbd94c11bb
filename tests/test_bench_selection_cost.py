"""benchmarks/selection_cost.py on a tiny timm ViT: schema, exact budget, streaming equals reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("timm")

from benchmarks.selection_cost import ESTIMATORS, _differing, measure_selection, render
from benchmarks.step_cost.options import StepOptions

SPEC = {
    "key": "tiny",
    "name": "vit_tiny_patch16_224",
    "pretrained": False,
    "kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 2},
}


def test_every_estimator_measures_and_streaming_equals_reference() -> None:
    opts = StepOptions(batch_size=2, img_size=32, budget=50, threads=None, calibration_batches=1)
    rows = {e: measure_selection(SPEC, e, opts, micro_batch=1) for e in ESTIMATORS}
    ref = rows["gradient_reference"].pop("_mask")
    for est, row in rows.items():
        mask = row.pop("_mask", None)
        assert row["k"] == 50 and row["peak_bytes"] >= 0 and row["selection_s"] > 0, est
        if est in ("gradient_streaming", "gradient_plain"):
            assert _differing(mask, ref) == 0, est
    text = render([dict(r, differs_from_reference=0) for r in rows.values()], "# t")
    assert text.count("| tiny |") == len(ESTIMATORS)


def test_differing_counts_both_sides() -> None:
    a = {"w": torch.tensor([1, 2, 3])}
    b = {"w": torch.tensor([2, 3, 4]), "v": torch.tensor([0])}
    assert _differing(a, b) == 1  # entry 1
    assert _differing(b, a) == 2  # entries 4 and v[0]
    with pytest.raises(ValueError, match="estimator"):
        measure_selection(SPEC, "nope", StepOptions(), micro_batch=1)
