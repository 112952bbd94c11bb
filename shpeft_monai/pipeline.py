"""SH-PEFT end to end on any torch module: score, select an exact budget, inject.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from shpeft_monai import SHPEFTConfig, select_mask, inject, trainable_parameters
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> cfg = SHPEFTConfig(budget=5, hybrid="task_agnostic", head=("2",))
    >>> mask = select_mask(net, cfg)
    >>> mask.k
    5
    >>> _ = inject(net, mask, cfg)
    >>> sum(p.numel() for p in trainable_parameters(net))  # 5 selected + 34 head
    39
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .calibration import calibrate, default_prepare_batch, warm_up_head
from .config import SHPEFTConfig
from .estimators import activation_scores, magnitude_scores
from .model import backbone_fingerprint, eligible_parameters, head_parameters, mask_summary
from .scoring import task_agnostic_scores
from .selection import select_indices
from .sparse import SparseMask
from .streaming import stream_select

__all__ = ["select_mask", "warm_up_head_for_selection"]

logger = logging.getLogger(__name__)


def warm_up_head_for_selection(
    model: nn.Module,
    config: SHPEFTConfig,
    loader: Iterable | None,
    *,
    device: torch.device | str | None = None,
    prepare_batch: Callable = default_prepare_batch,
    progress: bool = True,
) -> bool:
    """The head-only warm-up that :func:`select_mask` runs before calibrating (``ce`` loss,
    ``head_warmup_steps > 0``, task data needed). A run resumed from a saved mask but from no
    checkpoint calls it again, so that its head starts where the uninterrupted run's did."""
    if not (config.needs_task_data and config.calibration_loss == "ce" and config.head_warmup_steps):
        return False
    if loader is None:
        return False
    warm_up_head(
        model,
        loader,
        head_parameters(model, config),
        config.head_warmup_steps,
        device=device or next(model.parameters()).device,
        prepare_batch=prepare_batch,
        progress=progress,
    )
    return True


def select_mask(
    model: nn.Module,
    config: SHPEFTConfig,
    loader: Iterable | None = None,
    *,
    device: torch.device | str | None = None,
    loss_fn: Callable | None = None,
    prepare_batch: Callable = default_prepare_batch,
    progress: bool = True,
    streaming: bool = True,
    micro_batch: int | None = None,
    checkpointing: bool = True,
) -> SparseMask:
    """Select exactly ``config.budget`` backbone weights of ``model`` by SH-PEFT importance.

    ``loader`` supplies task data for the calibration pass; it is required whenever the hybrid mode
    uses task-specific importance. With ``head_warmup_steps > 0`` the head is trained alone first
    (the model's head is changed in place: a better starting point for fine-tuning).

    ``streaming`` (default) reduces gradients as backward produces them and scores one tensor at a
    time (:mod:`.streaming`); ``streaming=False`` is the reference path (every score materialised and
    concatenated), kept for comparison: both give the same mask. ``micro_batch`` splits calibration
    batches into slices of that many samples; ``checkpointing`` (streaming, timm models) recomputes
    block activations in backward instead of keeping them (both: :func:`.calibration.calibrate`).
    """
    t0 = time.perf_counter()
    params = eligible_parameters(model, config)
    n_eligible = sum(p.numel() for p in params.values())
    k = config.budget_for(n_eligible)
    fingerprint = backbone_fingerprint(model, config)
    if streaming:
        ta = magnitude_scores(params, config.agnostic_estimator)
    else:
        ta = task_agnostic_scores(params, config.agnostic_estimator)
    ts = None
    if config.needs_task_data:
        if loader is None:
            raise ValueError(
                f"hybrid={config.hybrid!r} (rho={config.rho}, lam={config.lam}) uses task-specific "
                "importance: pass a calibration loader, or use hybrid='task_agnostic'."
            )
        warm_up_head_for_selection(
            model, config, loader, device=device, prepare_batch=prepare_batch, progress=progress
        )
        if config.task_signal == "activation":
            ts = activation_scores(
                model, loader, params, config, device=device, prepare_batch=prepare_batch, progress=progress
            )
            if not streaming:
                ts = {n: ts[n] for n in ts}
        else:
            ts = calibrate(
                model,
                loader,
                params,
                config,
                device=device,
                loss_fn=loss_fn,
                prepare_batch=prepare_batch,
                progress=progress,
                streaming=streaming,
                micro_batch=micro_batch,
                checkpointing=checkpointing,
            )
    picked = stream_select(config, k, ts, ta) if streaming else select_indices(config, k, ts, ta)
    mask = SparseMask(
        picked,
        {n: tuple(params[n].shape) for n in picked},
        fingerprint,
        meta={"eligible_weights": int(n_eligible), "selection_seconds": time.perf_counter() - t0},
    )
    summary = mask_summary(mask)
    logger.info(
        "SH-PEFT selected %d of %d eligible weights (%.4f%%) in %d tensors in %.1fs; per block: %s",
        mask.k,
        n_eligible,
        100 * mask.k / n_eligible,
        len(mask.indices),
        mask.meta["selection_seconds"],
        summary["by_block"],
    )
    return mask
