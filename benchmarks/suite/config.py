"""Configurations of the accuracy suite, its methods and ablation points, and the SH-PEFT recipe.

The method defaults (hybrid rule and ratio, budget, learning rates and weight decays of the selected
values and of the head, schedule, warm-up, label smoothing, gradient clipping, head warm-up) are read
from :data:`shpeft_monai.recipe.DEFAULTS`, so the suite measures the recipe the bundle ships. Every
method gets the same schedule, warm-up, label smoothing and clipping; what differs is what it trains
and its learning rate (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = [
    "ABLATIONS",
    "CNN",
    "CONFIGS",
    "DEFAULT_METHODS",
    "HISTORICAL",
    "HYBRIDS",
    "METHODS_CPU",
    "VIT",
    "SuiteConfig",
    "ablation_specs",
    "config_dict",
    "is_recipe_method",
    "lr_grid",
    "method_spec",
    "recipe_defaults",
    "run_settings",
    "shpeft_settings",
]

VIT = "vit_small_patch14_dinov2"
CNN = "tf_efficientnet_lite0"

# fallback when shpeft_monai.recipe is missing (the values the bundle used before the recipe module)
_RECIPE_FALLBACK: dict[str, Any] = {
    "hybrid": "weighted",
    "rho": 0.5,
    "lam": 0.5,
    "budget": 1e-4,
    "head_warmup_steps": 10,
    "lr_selected": 1e-2,
    "wd_selected": 1e-4,
    "lr_head": 1e-2,
    "wd_head": 1e-4,
    "schedule": "constant",
    "warmup": 0.0,
    "min_lr_ratio": 0.0,
    "grad_clip": 0.0,
    "label_smoothing": 0.0,
}


def recipe_defaults() -> dict[str, Any]:
    """``shpeft_monai.recipe.DEFAULTS`` as a dict (a documented fallback when the module is absent)."""
    try:
        from shpeft_monai.recipe import DEFAULTS
    except ImportError:
        return dict(_RECIPE_FALLBACK)
    if hasattr(DEFAULTS, "to_dict"):
        return dict(DEFAULTS.to_dict())
    return {f.name: getattr(DEFAULTS, f.name) for f in fields(DEFAULTS)}


@dataclass(frozen=True)
class SuiteConfig:
    """Everything shared by the runs of one suite.

    ``recipe`` is the training recipe of every run (``shpeft_monai.recipe.DEFAULTS`` when empty):
    SH-PEFT trains at its ``lr_selected`` / ``lr_head``; the masks and peers get their learning rate
    chosen on validation from ``lr_grid`` / ``lr_grid_full`` (seed ``seeds[0]``), the head at the
    recipe's ``lr_head`` (the linear probe's grid is its head's rate).
    """

    name: str = "cpu"
    device: str = "cpu"
    dataset: str = "br35h"  # "br35h" or a folder / CSV / datalist JSON (python -m benchmarks.suite --dataset)
    grouping: str = "content"  # groups of user data for the split and the bootstrap
    vit: str = VIT
    cnn: str = CNN
    pretrained: bool = True
    network_kwargs: dict[str, Any] = field(default_factory=dict)  # timm kwargs (tests: a 2-block ViT)
    img_size: int = 112
    cnn_img_size: int = 112
    train_subset: int = 600  # 0 = whole split; stratified subset otherwise (the same for every seed)
    val_subset: int = 0
    test_subset: int = 0
    epochs: int = 5
    batch_size: int = 32
    eval_batch_size: int = 64
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    ablation_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    calibration_batches: int = 4
    recipe: dict[str, Any] = field(default_factory=dict)
    # around the rates the 70 px suite chose on validation (masks 1e-3..1e-2, BitFit and LoRA 1e-3,
    # full fine-tuning 1e-5, linear probe 1e-2 at the edge of its grid); full fine-tuning, the reference
    # the paper claims to beat, and the cheap linear probe get three points
    lr_grid: tuple[float, ...] = (1e-3, 1e-2)  # masks at SH-PEFT's budget, BitFit, LoRA
    lr_grid_full: tuple[float, ...] = (3e-6, 1e-5, 3e-5)  # full fine-tuning of the whole backbone
    lr_grid_probe: tuple[float, ...] = (3e-3, 1e-2, 3e-2)  # linear probe (the head's rate)
    lora_r: int = 8
    threads: int = 2
    methods: tuple[str, ...] = ()
    ablations: tuple[str, ...] = ()
    n_boot: int = 2000
    note: str = ""

    def __post_init__(self) -> None:
        if not self.recipe:
            object.__setattr__(self, "recipe", recipe_defaults())
        if not self.seeds:
            raise ValueError("SuiteConfig.seeds is empty: give at least one seed, e.g. --seeds 0")

    @property
    def head_warmup(self) -> int:
        return int(self.recipe.get("head_warmup_steps", 10))

    @property
    def budget(self) -> float:
        return self.recipe.get("budget", 1e-4)


# SH-PEFT (the recipe's hybrid) first: it is the row every paired difference starts from
METHODS_CPU = (
    "shpeft",
    "full",
    "linear_probe",
    "bitfit",
    "lora",
    "random",
    "task_agnostic",
    "task_specific_per_row",
)
DEFAULT_METHODS = (
    *METHODS_CPU,
    "shpeft_union",
    "shpeft_weighted",
    "task_specific",
    "cnn_shpeft",
    "cnn_full",
    "cnn_linear_probe",
)
ABLATIONS = ("budget", "rho", "estimator", "calibration_batches", "calibration_loss")
HYBRIDS = ("shpeft", "shpeft_union", "shpeft_weighted")  # SH-PEFT rows the ablations may centre on
# names of committed results made by earlier versions of the suite (python -m benchmarks.suite --render)
HISTORICAL = ("cpu70", "cpu_small", "cpu_per_row")

CONFIGS: dict[str, SuiteConfig] = {
    # 2 CPU cores, a few hours: ViT-S/14 at 112 px (64 tokens), 600 stratified training images, the whole
    # validation (450) and test (452) splits, 5 epochs of batch 32 (95 steps), 5 seeds
    "cpu": SuiteConfig(
        methods=METHODS_CPU, ablations=("rho", "estimator", "calibration_batches", "calibration_loss")
    ),
    # a GPU: 224 px, the whole split, 10 epochs
    "full": SuiteConfig(
        name="full",
        device="cuda",
        img_size=224,
        cnn_img_size=224,
        train_subset=0,
        epochs=10,
        calibration_batches=8,
        lr_grid=(1e-4, 1e-3, 1e-2),
        lr_grid_full=(1e-6, 1e-5, 1e-4),
        lr_grid_probe=(1e-3, 1e-2, 1e-1),
        methods=DEFAULT_METHODS,
        ablations=ABLATIONS,
    ),
    # the unit tests
    "tiny": SuiteConfig(
        name="tiny",
        img_size=28,
        cnn_img_size=32,
        train_subset=16,
        val_subset=16,
        test_subset=16,
        epochs=2,
        batch_size=8,
        eval_batch_size=16,
        seeds=(0,),
        ablation_seeds=(0,),
        calibration_batches=1,
        lr_grid=(1e-3,),
        lr_grid_full=(1e-4,),
        lr_grid_probe=(1e-3,),
        n_boot=200,
        methods=("shpeft", "linear_probe"),
        ablations=(),
    ),
}

_TABLE: dict[str, tuple[str, dict[str, Any]]] = {
    "shpeft": ("shpeft", {}),  # the recipe's hybrid rule
    "shpeft_union": ("shpeft", {"hybrid": "union"}),
    "shpeft_weighted": ("shpeft", {"hybrid": "weighted"}),
    "shpeft_union_l2": ("shpeft", {"hybrid": "union", "task_estimator": "l2"}),
    "task_specific": ("shpeft", {"hybrid": "task_specific"}),
    "task_specific_per_row": ("shpeft", {"hybrid": "task_specific", "threshold": "per_row"}),
    "shpeft_weighted_per_row": ("shpeft", {"hybrid": "weighted", "threshold": "per_row"}),
    "shpeft_union_per_row": ("shpeft", {"hybrid": "union", "threshold": "per_row"}),
    "task_agnostic": ("shpeft", {"hybrid": "task_agnostic"}),
    "random": ("shpeft", {"hybrid": "random"}),
    "full": ("full", {}),
    "linear_probe": ("linear_probe", {}),
    "bitfit": ("bitfit", {}),
    "lora": ("lora", {}),
}


def method_spec(name: str, cfg: SuiteConfig) -> tuple[str, str, dict[str, Any]]:
    """(network, library method, SH-PEFT overrides) of a method name (``cnn_`` prefix: the CNN)."""
    network = cfg.cnn if name.startswith("cnn_") else cfg.vit
    base = name.removeprefix("cnn_")
    if base not in _TABLE:
        raise ValueError(f"unknown method {name!r}; known: {sorted(_TABLE)} (prefix cnn_ for the CNN)")
    method, shpeft = _TABLE[base]
    return network, method, dict(shpeft)


def is_recipe_method(name: str) -> bool:
    """The SH-PEFT hybrids train at the recipe's learning rate (no grid: it was chosen on validation)."""
    return name.removeprefix("cnn_") in HYBRIDS


def lr_grid(cfg: SuiteConfig, name: str, method: str) -> tuple[float, ...]:
    """Learning rates tried on validation for method ``name`` (library ``method``)."""
    if is_recipe_method(name):
        return (float(cfg.recipe["lr_selected"]),)
    if method == "full":
        return cfg.lr_grid_full
    if method == "linear_probe":
        return cfg.lr_grid_probe
    return cfg.lr_grid


def ablation_specs(name: str, hybrid: str = "weighted") -> list[tuple[str, dict[str, Any], bool]]:
    """(label, SH-PEFT overrides, head warm-up) per ablation point, around the ``hybrid`` rule."""
    u = {"hybrid": hybrid}
    if name == "budget":
        return [(f"budget={b:g}", {**u, "budget": b}, True) for b in (1e-5, 1e-4, 1e-3, 1e-2)]
    if name == "rho":  # the hybrid ratio: rho (union) or lam (weighted), the task-specific share
        knob = "lam" if hybrid == "weighted" else "rho"
        return [(f"{knob}={r:g}", {**u, knob: r}, True) for r in (0.0, 0.25, 0.5, 0.75, 1.0)]
    if name == "estimator":  # |g| or g**2 of calibration gradients, or the forward-only |w| x |x|
        points = [(f"estimator={e}", {**u, "task_estimator": e}, True) for e in ("l1", "l2")]
        return [*points, ("estimator=activation", {**u, "task_signal": "activation"}, True)]
    if name == "calibration_batches":
        return [(f"calibration_batches={n}", {**u, "calibration_batches": n}, True) for n in (1, 4, 16)]
    if name == "calibration_loss":
        return [
            ("calibration_loss=ce+warmup", {**u, "calibration_loss": "ce"}, True),
            ("calibration_loss=ce,no_warmup", {**u, "calibration_loss": "ce"}, False),
            ("calibration_loss=supcon", {**u, "calibration_loss": "supcon"}, True),
        ]
    raise ValueError(f"unknown ablation {name!r}; known: {ABLATIONS}")


def shpeft_settings(cfg: SuiteConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """The complete SH-PEFT settings of a run (so that equal settings give equal run keys)."""
    from shpeft_monai.config import SHPEFTConfig

    r = cfg.recipe
    base = {
        "hybrid": r.get("hybrid", "weighted"),
        "rho": r.get("rho", 0.5),
        "lam": r.get("lam", 0.5),
        "budget": r.get("budget", 1e-4),
        "calibration_batches": cfg.calibration_batches,
        "calibration_loss": "ce",
        "head_warmup_steps": 0,  # the suite warms every method's head up the same way beforehand
    }
    return SHPEFTConfig.from_dict({**base, **overrides}).to_dict()


def config_dict(cfg: SuiteConfig) -> dict[str, Any]:
    """The configuration as JSON-able data (tuples as lists)."""
    d = asdict(cfg)
    for k, v in d.items():
        if isinstance(v, tuple):
            d[k] = list(v)
    return d


# what only plans runs: changing these keeps the finished runs (each is keyed by its own settings)
PLANNING_FIELDS = (
    "methods",
    "ablations",
    "seeds",
    "ablation_seeds",
    "lr_grid",
    "lr_grid_full",
    "lr_grid_probe",
    "note",
    "n_boot",
    "name",
)


def run_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The configuration fields that change what a finished run measured."""
    return {k: v for k, v in cfg.items() if k not in PLANNING_FIELDS}
