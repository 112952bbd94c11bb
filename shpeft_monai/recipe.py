"""The SH-PEFT training recipe: one set of defaults, optimizer parameter groups, LR schedule, clipping.

Every default of the method that is not a selection switch lives once in :data:`DEFAULTS` (a frozen
:class:`Recipe`). :class:`shpeft_monai.SHPEFTConfig` reads the hybrid rule, its ratios and the head
warm-up from it, the federated sites train through the bundle and so read the same values,
and the bundle reads them through expressions such as ``$recipe.DEFAULTS.lr_selected`` (so
``--lr 0.001`` on the command line still overrides them). The values were chosen on the validation
split of Br35H at the bundle's ``cpu_demo`` configuration (``benchmarks/results/recipe_search.md``).

* :func:`param_groups` / :func:`make_optimizer`: the SH-PEFT selected values (the ``shpeft_delta``
  vectors) and the dense head get their own learning rate and weight decay; for the other methods
  (full, bitfit, lora, linear probe) the split is the head against everything else trainable.
  Nothing that is not trainable reaches the optimizer, and no parameter appears twice.
* :func:`lr_factor` (linear warm-up then cosine decay), :func:`make_lr_scheduler` (a plain
  ``LambdaLR`` for hand-written loops) and :class:`TrainingRecipe`, an ignite handler that sets the
  learning rate of every group from ``engine.state.iteration`` before each step (a resumed run gets
  exactly the uninterrupted schedule without saving scheduler state) and clips the gradient norm on
  ``IterationEvents.BACKWARD_COMPLETED`` (MONAI's ``SupervisedTrainer`` fires it before
  ``optimizer.step``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = [
    "DEFAULTS",
    "LogitAdjustedCrossEntropy",
    "Recipe",
    "TrainingRecipe",
    "loss_function",
    "lr_factor",
    "make_lr_scheduler",
    "make_optimizer",
    "param_groups",
    "split_parameters",
    "warmup_steps",
]

SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class Recipe:
    """Defaults of SH-PEFT selection ratios and training (one instance: :data:`DEFAULTS`).

    Args:
        hybrid: hybrid rule of :class:`~shpeft_monai.SHPEFTConfig` (``weighted`` or ``union``).
        rho: union mode, task-specific share of the budget.
        lam: weighted mode, weight of the task-specific score.
        budget: selected backbone weights (fraction of the eligible weights, or a count).
        head_warmup_steps: head-only optimizer steps before the calibration pass.
        lr_selected: learning rate of the selected values (the ``shpeft_delta`` vectors).
        wd_selected: AdamW weight decay of the selected values (pulls them back to the pretrained
            weights, since a delta starts at zero).
        lr_head: learning rate of the dense classification head.
        wd_head: AdamW weight decay of the head.
        schedule: ``cosine`` (linear warm-up, then cosine decay to ``min_lr_ratio``) or ``constant``
            (linear warm-up, then constant).
        warmup: warm-up length; a float in [0, 1) is a fraction of the total steps, an int a count.
        min_lr_ratio: final learning rate as a fraction of the peak (cosine).
        grad_clip: maximum global gradient norm over the trainable parameters; 0 disables.
        label_smoothing: label smoothing of the cross-entropy training loss.
        optimizer: ``adamw`` (the only choice measured).
    """

    hybrid: Literal["union", "weighted"] = "weighted"
    rho: float = 0.5
    lam: float = 0.75  # best validation on each of seeds 0-2 of 0, 0.25, 0.5, 0.75, 1 (README, Benchmarks)
    budget: float = 1e-4
    head_warmup_steps: int = 20
    lr_selected: float = 1e-2
    wd_selected: float = 1e-4
    lr_head: float = 1e-3
    wd_head: float = 1e-4
    schedule: Literal["constant", "cosine"] = "cosine"
    warmup: float = 0.1
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    optimizer: Literal["adamw"] = "adamw"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Recipe.schedule={self.schedule!r} is not one of {SCHEDULES}.")
        for name in ("lr_selected", "lr_head"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Recipe.{name}={getattr(self, name)!r} must be > 0.")
        for name in ("wd_selected", "wd_head", "grad_clip", "warmup", "min_lr_ratio"):
            if getattr(self, name) < 0:
                raise ValueError(f"Recipe.{name}={getattr(self, name)!r} must be >= 0.")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"Recipe.label_smoothing={self.label_smoothing!r} must lie in [0, 1).")

    def replace(self, **changes: Any) -> Recipe:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


DEFAULTS = Recipe()

_WRAPPERS = ("module.", "_orig_mod.", "base_model.model.")


def _strip_wrappers(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPERS:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def split_parameters(
    model: nn.Module, head_names: Sequence[str] | None = None
) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters of ``model`` by role: ``selected`` (SH-PEFT delta values), ``head``
    (root modules named in ``head_names``, default :data:`shpeft_monai.config.DEFAULT_HEAD`, seen
    through DDP / ``torch.compile`` / ``peft`` wrappers) and ``other`` (everything else trainable:
    the backbone of full fine-tuning, BitFit biases, LoRA adapters). Frozen parameters are left out;
    a parameter shared under two names appears once."""
    if head_names is None:
        from .config import DEFAULT_HEAD

        head_names = DEFAULT_HEAD
    heads = set(head_names)
    out: dict[str, list[tuple[str, nn.Parameter]]] = {"selected": [], "head": [], "other": []}
    for name, p in model.named_parameters():  # named_parameters() already drops duplicates
        if not p.requires_grad:
            continue
        if name.rsplit(".", 1)[-1] == "shpeft_delta":
            out["selected"].append((name, p))
        elif _strip_wrappers(name).split(".", 1)[0] in heads:
            out["head"].append((name, p))
        else:
            out["other"].append((name, p))
    return out


def param_groups(
    model: nn.Module,
    *,
    lr_selected: float = DEFAULTS.lr_selected,
    wd_selected: float = DEFAULTS.wd_selected,
    lr_head: float | None = DEFAULTS.lr_head,
    wd_head: float | None = DEFAULTS.wd_head,
    head_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the non-head trainable parameters (SH-PEFT selected values, or
    what another method trains besides the head) at ``lr_selected`` / ``wd_selected``, and the head
    at ``lr_head`` / ``wd_head`` (``None``: the same as the selected values). Empty groups are
    dropped; each group carries a ``name`` (``selected``, ``other`` or ``head``)."""
    lr_head = lr_selected if lr_head is None else lr_head
    wd_head = wd_selected if wd_head is None else wd_head
    parts = split_parameters(model, head_names)
    groups = [
        {
            "name": "selected",
            "params": [p for _, p in parts["selected"]],
            "lr": lr_selected,
            "weight_decay": wd_selected,
        },
        {
            "name": "other",
            "params": [p for _, p in parts["other"]],
            "lr": lr_selected,
            "weight_decay": wd_selected,
        },
        {"name": "head", "params": [p for _, p in parts["head"]], "lr": lr_head, "weight_decay": wd_head},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameter: prepare the method (inject a mask) first.")
    return groups


def make_optimizer(
    network: nn.Module,
    *,
    lr_selected: float = DEFAULTS.lr_selected,
    wd_selected: float = DEFAULTS.wd_selected,
    lr_head: float | None = DEFAULTS.lr_head,
    wd_head: float | None = DEFAULTS.wd_head,
    head_names: Sequence[str] | None = None,
    optimizer: str = DEFAULTS.optimizer,
) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` of ``network`` (the bundle's ``optimizer`` key)."""
    if optimizer != "adamw":
        raise ValueError(f"optimizer={optimizer!r}: only 'adamw' is supported.")
    groups = param_groups(
        network,
        lr_selected=lr_selected,
        wd_selected=wd_selected,
        lr_head=lr_head,
        wd_head=wd_head,
        head_names=head_names,
    )
    return torch.optim.AdamW(groups, lr=lr_selected, weight_decay=wd_selected)


def warmup_steps(total_steps: int, warmup: float | int) -> int:
    """Warm-up length in steps: a float in [0, 1) is a fraction of ``total_steps``, else a count."""
    if isinstance(warmup, float) and warmup < 1:
        return round(warmup * total_steps)
    return int(warmup)


def lr_factor(
    step: int,
    total_steps: int,
    *,
    warmup: float | int = DEFAULTS.warmup,
    schedule: str = DEFAULTS.schedule,
    min_lr_ratio: float = DEFAULTS.min_lr_ratio,
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based) of ``total_steps``:
    linear warm-up from ``1 / (w + 1)`` to 1 over the first ``w`` steps, then constant or cosine
    decay towards ``min_lr_ratio``, reached one step after the last (so the last step still
    learns). A pure function of ``step``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {SCHEDULES}.")
    total = max(int(total_steps), 1)
    w = min(warmup_steps(total, warmup), total - 1) if total > 1 else 0
    step = max(int(step), 0)
    if step < w:
        return (step + 1) / (w + 1)
    if schedule == "constant":
        return 1.0
    progress = min((step - w) / max(total - w, 1), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    *,
    warmup: float | int = DEFAULTS.warmup,
    schedule: str = DEFAULTS.schedule,
    min_lr_ratio: float = DEFAULTS.min_lr_ratio,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` of :func:`lr_factor`, stepped once per optimizer step (plain loops)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step, total_steps, warmup=warmup, schedule=schedule, min_lr_ratio=min_lr_ratio
        ),
    )


def _trainable(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


class TrainingRecipe:
    """Ignite handler: per-iteration learning-rate schedule and gradient clipping.

    Before each iteration every parameter group gets ``peak_lr * lr_factor(i, total)``, where
    ``peak_lr`` is the group's learning rate when this handler was built (the optimizer as the
    config made it), ``i = engine.state.iteration - 1`` and ``total = max_epochs * epoch_length``.
    Nothing is stored, so a run resumed by ``TrainingCheckpoint`` (which restores the iteration
    counter) continues with exactly the uninterrupted learning rate. With ``grad_clip > 0`` the
    global gradient norm is clipped after the backward pass and before ``optimizer.step`` (gradients
    are unscaled first under AMP).

    Example (bundle, appended to ``train#handlers``)::

        - _target_: shpeft_monai.recipe.TrainingRecipe
          optimizer: '@optimizer'
          schedule: '@lr_schedule'
          warmup: '@lr_warmup'
          grad_clip: '@grad_clip'
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        schedule: str = DEFAULTS.schedule,
        warmup: float | int = DEFAULTS.warmup,
        min_lr_ratio: float = DEFAULTS.min_lr_ratio,
        grad_clip: float = DEFAULTS.grad_clip,
        total_steps: int | None = None,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not one of {SCHEDULES}.")
        if grad_clip < 0:
            raise ValueError(f"grad_clip={grad_clip!r} must be >= 0.")
        self.optimizer = optimizer
        self.peak_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.schedule = schedule
        self.warmup = warmup
        self.min_lr_ratio = float(min_lr_ratio)
        self.grad_clip = float(grad_clip)
        self.total_steps = total_steps

    def total(self, engine: Engine) -> int:
        if self.total_steps is not None:
            return int(self.total_steps)
        return int(engine.state.max_epochs) * int(engine.state.epoch_length)

    def lr_at(self, iteration: int, total: int) -> list[float]:
        """Learning rate of each group at optimizer step ``iteration`` (0-based)."""
        f = lr_factor(
            iteration, total, warmup=self.warmup, schedule=self.schedule, min_lr_ratio=self.min_lr_ratio
        )
        return [lr * f for lr in self.peak_lrs]

    def set_lr(self, engine: Engine) -> None:
        for group, lr in zip(
            self.optimizer.param_groups, self.lr_at(engine.state.iteration - 1, self.total(engine))
        ):
            group["lr"] = lr

    def clip(self, engine: Engine) -> None:
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(_trainable(self.optimizer), self.grad_clip)

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        if not engine.has_event_handler(self.set_lr, Events.ITERATION_STARTED):
            engine.add_event_handler(Events.ITERATION_STARTED, self.set_lr)
        if self.grad_clip > 0:
            from monai.engines.utils import IterationEvents

            if IterationEvents.BACKWARD_COMPLETED not in engine._allowed_events:
                raise ValueError(
                    f"grad_clip={self.grad_clip} needs an engine that fires MONAI's "
                    "IterationEvents.BACKWARD_COMPLETED (e.g. monai.engines.SupervisedTrainer); "
                    "give grad_clip=0 for a plain ignite Engine."
                )
            if not engine.has_event_handler(self.clip, IterationEvents.BACKWARD_COMPLETED):
                engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.clip)


class LogitAdjustedCrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy of ``logits + tau * log(prior)`` (Menon et al. 2021, "Long-tail learning via
    logit adjustment"): training on data whose class prior is ``prior``, the model's own logits
    learn the class-balanced posterior. A federated site whose labels are skewed thus trains the
    head the balanced pooled data would, instead of one biased towards its own majority class.
    The prior is add-one smoothed, ``(n_c + 1) / (N + C)``, so a site without a class still trains."""

    def __init__(self, class_counts: Sequence[int], tau: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing=float(label_smoothing))
        counts = torch.as_tensor([float(c) for c in class_counts])
        if counts.numel() < 2 or not bool((counts >= 0).all()):
            raise ValueError(
                f"logit adjustment needs a count >= 0 for each of >= 2 classes, got {counts.tolist()}"
            )
        prior = (counts + 1) / (counts.sum() + counts.numel())
        self.register_buffer("offset", float(tau) * torch.log(prior))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] != self.offset.numel():
            raise ValueError(f"logits have {logits.shape[-1]} classes, the prior {self.offset.numel()}")
        return super().forward(logits + self.offset.to(logits), target)


def loss_function(
    label_smoothing: float = DEFAULTS.label_smoothing,
    logit_adjustment: float = 0.0,
    class_counts: Sequence[int] | None = None,
) -> nn.Module:
    """The training loss of the recipe: cross-entropy with ``label_smoothing``; with
    ``logit_adjustment`` tau > 0, logit-adjusted by the training data's ``class_counts``
    (:class:`LogitAdjustedCrossEntropy`; no change on balanced data)."""
    if logit_adjustment < 0:
        raise ValueError(f"logit_adjustment={logit_adjustment!r} must be >= 0 (0 = plain cross-entropy)")
    if logit_adjustment == 0:
        return nn.CrossEntropyLoss(label_smoothing=float(label_smoothing))
    if class_counts is None:
        raise ValueError("logit_adjustment > 0 needs the training data's class_counts")
    return LogitAdjustedCrossEntropy(class_counts, logit_adjustment, label_smoothing)
