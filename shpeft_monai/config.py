"""Every switch of SH-PEFT (METHOD.md section 2) in one validated, JSON-serialisable dataclass.

The paper gives no formulas or hyper-parameters, so each unknown is a documented switch here and the
benchmark suite decides the defaults with evidence. The hybrid rule, its ratios, the budget and the
head warm-up default to :data:`shpeft_monai.recipe.DEFAULTS` (one set of defaults shared with the
bundle and the federated app).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .recipe import DEFAULTS as _RECIPE

__all__ = ["DEFAULT_ELIGIBLE", "DEFAULT_HEAD", "SHPEFTConfig"]

# Weight matrices of Linear and Conv layers (ViT qkv/proj/fc1/fc2, patch embedding, CNN kernels).
DEFAULT_ELIGIBLE: tuple[str, ...] = ("linear", "conv")
# Root modules trained densely as the new classification head (timm, torchvision and MONAI names).
DEFAULT_HEAD: tuple[str, ...] = ("head", "classifier", "fc", "class_layers", "last_linear")

_CHOICES: dict[str, tuple[str, ...]] = {
    "hybrid": ("union", "weighted", "task_specific", "task_agnostic", "random"),
    "task_estimator": ("l1", "l2"),
    "task_signal": ("gradient", "activation"),
    "agnostic_estimator": ("l1", "l2"),
    "normalize": ("rank", "max"),
    "threshold": ("global", "per_tensor", "per_row"),
    "calibration_loss": ("ce", "supcon"),
}
_KINDS = ("linear", "conv", "bias", "norm", "embedding")


@dataclass(frozen=True)
class SHPEFTConfig:
    """Configuration of SH-PEFT selection and training.

    Args:
        budget: selected backbone weights; a float in (0, 1) is a fraction of the eligible weights
            (default 1e-4 = 0.01 %), an int >= 1 an exact count.
        hybrid: ``union`` (a share ``rho`` of the budget by task-specific importance, the rest by
            task-agnostic importance, duplicates refilled), ``weighted`` (top-k of
            ``lam * norm(I_ts) + (1 - lam) * norm(I_ta)``), or the single-criterion references
            ``task_specific`` (GPS-style), ``task_agnostic`` (magnitude) and ``random``.
        rho: union mode, share of the budget taken by task-specific importance.
        lam: weighted mode, weight of the task-specific score.
        normalize: weighted mode, how each score is made comparable: global ``rank`` in [0, 1] or
            division by its ``max``.
        task_estimator: ``l1`` accumulates ``|g|`` over calibration batches, ``l2`` ``g**2``.
        task_signal: what the task-specific score is made of: ``gradient`` (calibration backward
            passes, the estimator above) or ``activation`` (forward only, FPS-style
            ``|w| * mean |input activation|``, or ``w**2 * mean x**2`` with ``l2``; no backward pass,
            no labels; see :mod:`shpeft_monai.estimators`).
        taylor: use the first-order Taylor term ``|g*w|`` (l1) or ``(g*w)**2`` (l2) instead.
        agnostic_estimator: ``l1`` scores ``|w|``, ``l2`` ``w**2`` of the pretrained weights.
        threshold: ``global`` top-k over all eligible tensors, ``per_tensor`` (the budget split in
            proportion to tensor size), ``per_row`` (the budget split evenly over output rows, at
            least one weight per row: GPS-style).
        eligible: which tensors can be selected, by kind: ``linear`` and ``conv`` weight matrices,
            ``bias``, ``norm`` (norm scales/shifts), ``embedding`` (position embedding, class token).
        include: regular expressions; when non-empty, only parameter names matching one are eligible.
        exclude: regular expressions of parameter names never eligible.
        head: root module names trained densely as the classification head.
        calibration_batches: batches of task data in the calibration pass (no optimizer step).
        calibration_loss: ``ce`` (cross-entropy through the head) or ``supcon`` (head-free supervised
            contrastive loss on pooled features, as GPS does).
        head_warmup_steps: optimizer steps on the head alone before calibrating with ``ce``, so
            that gradients are not driven by a random head (default
            ``recipe.DEFAULTS.head_warmup_steps``; the head of the model is changed in place, so
            give 0 to select twice on the same model from the same starting point).
        seed: seeds the random mask and tie-breaking.

    Example:
        >>> cfg = SHPEFTConfig(budget=2200, hybrid="union", rho=0.5)
        >>> SHPEFTConfig.from_json(cfg.to_json()) == cfg
        True
    """

    budget: float | int = _RECIPE.budget
    hybrid: Literal["union", "weighted", "task_specific", "task_agnostic", "random"] = _RECIPE.hybrid
    rho: float = _RECIPE.rho
    lam: float = _RECIPE.lam
    normalize: Literal["rank", "max"] = "rank"
    task_estimator: Literal["l1", "l2"] = "l1"
    task_signal: Literal["gradient", "activation"] = "gradient"
    taylor: bool = False
    agnostic_estimator: Literal["l1", "l2"] = "l1"
    threshold: Literal["global", "per_tensor", "per_row"] = "global"
    eligible: tuple[str, ...] = DEFAULT_ELIGIBLE
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    head: tuple[str, ...] = DEFAULT_HEAD
    calibration_batches: int = 8
    calibration_loss: Literal["ce", "supcon"] = "ce"
    head_warmup_steps: int = _RECIPE.head_warmup_steps
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("eligible", "include", "exclude", "head"):  # accept lists from YAML/JSON
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"SHPEFTConfig.{name}={value!r} is not one of {allowed}.")
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b):
            raise ValueError(f"SHPEFTConfig.budget={b!r}: give a fraction in (0, 1) or a count >= 1.")
        if isinstance(b, float) and b.is_integer() and b >= 1:
            object.__setattr__(self, "budget", int(b))
        elif isinstance(b, float) and not 0.0 < b < 1.0:
            raise ValueError(
                f"SHPEFTConfig.budget={b!r}: a float budget is a fraction and must lie in (0, 1) "
                "(1e-4 is 0.01 %); give an int for an exact count."
            )
        if isinstance(self.budget, int) and self.budget < 1:
            raise ValueError(f"SHPEFTConfig.budget={b!r}: a count must be >= 1.")
        for name in ("rho", "lam"):
            v = getattr(self, name)
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"SHPEFTConfig.{name}={v!r} must lie in [0, 1].")
        unknown = set(self.eligible) - set(_KINDS)
        if not self.eligible or unknown:
            raise ValueError(f"SHPEFTConfig.eligible={self.eligible!r}: use a non-empty subset of {_KINDS}.")
        if self.taylor and self.task_signal == "activation":
            raise ValueError(
                "SHPEFTConfig.taylor=True is a gradient estimator; task_signal='activation' already "
                "multiplies by |w|. Use taylor=False or task_signal='gradient'."
            )
        if self.calibration_batches < 1:
            raise ValueError(f"SHPEFTConfig.calibration_batches={self.calibration_batches!r} must be >= 1.")
        if self.head_warmup_steps < 0:
            raise ValueError(f"SHPEFTConfig.head_warmup_steps={self.head_warmup_steps!r} must be >= 0.")

    @property
    def needs_task_data(self) -> bool:
        """Whether selection needs a calibration pass over task data."""
        if self.hybrid == "union":
            return self.rho > 0
        if self.hybrid == "weighted":
            return self.lam > 0
        return self.hybrid == "task_specific"

    def budget_for(self, n_eligible: int) -> int:
        """The exact number of weights to select among ``n_eligible``."""
        if n_eligible < 1:
            raise ValueError("no eligible weights: check SHPEFTConfig.eligible/include/exclude.")
        k = self.budget if isinstance(self.budget, int) else max(1, round(self.budget * n_eligible))
        if k > n_eligible:
            raise ValueError(
                f"SHPEFTConfig.budget={self.budget!r} asks for {k} weights but only {n_eligible} are "
                "eligible; lower the budget or widen `eligible`/`include`."
            )
        return int(k)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("eligible", "include", "exclude", "head"):
            d[name] = list(d[name])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SHPEFTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SHPEFTConfig keys {unknown}; known keys are {sorted(known)}.")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> SHPEFTConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> SHPEFTConfig:
        return dataclasses.replace(self, **changes)
