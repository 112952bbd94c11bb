"""Bounded calibration pass: task-specific gradient statistics without any optimizer step on them.

Runs ``config.calibration_batches`` batches through the model in eval mode (no dropout, frozen
norm statistics), back-propagates the task loss into the eligible tensors only, and accumulates L1
or L2 gradient statistics (or their Taylor variants). By default the statistics stream: a
post-accumulate-grad hook reduces each dense gradient into its accumulator the moment backward has
produced it and frees it, so the pass never holds all gradients at once (bit-identical to reducing
after backward). Two calibration losses:

* ``ce``: cross-entropy through the classification head; with ``head_warmup_steps > 0`` the head is
  first trained alone for that many steps so that a random head does not drive the gradients;
* ``supcon``: a head-free supervised contrastive loss on pooled features (as GPS does); needs a
  timm-style ``forward_features`` / ``forward_head(..., pre_logits=True)``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import SHPEFTConfig
from .scoring import _check_finite, accumulate_gradient

__all__ = [
    "activation_checkpointing",
    "calibrate",
    "default_prepare_batch",
    "supervised_contrastive_loss",
    "warm_up_head",
]

logger = logging.getLogger(__name__)


def default_prepare_batch(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``{"image", "label"}`` dicts (MONAI) or ``(x, y)`` pairs -> tensors on ``device``."""
    if isinstance(batch, Mapping):
        x, y = batch["image"], batch["label"]
    else:
        x, y = batch[0], batch[1]
    y = torch.as_tensor(y).reshape(-1).long()
    return torch.as_tensor(x).to(device), y.to(device)


def supervised_contrastive_loss(
    features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) over one batch of pooled features."""
    z = F.normalize(features.float(), dim=1)
    logits = z @ z.T / temperature
    n = z.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    count = positives.sum(1)
    valid = count > 0
    if not bool(valid.any()):
        return (z * 0).sum()  # no positive pair in this batch: zero loss, zero gradient
    per_anchor = -(log_prob.masked_fill(~positives, 0).sum(1)[valid]) / count[valid]
    return per_anchor.mean()


def _pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise TypeError(
            f"calibration_loss='supcon' needs forward_features/forward_head (timm models); "
            f"{type(model).__name__} has none. Use calibration_loss='ce'."
        )
    return model.forward_head(model.forward_features(x), pre_logits=True)


def _batches(loader: Iterable, n: int, what: str) -> Iterable:
    it = itertools.islice(loader, n)
    first = next(it, None)
    if first is None:
        raise ValueError(f"the {what} loader yielded no batches; give it at least one batch of task data.")
    return itertools.chain([first], it)


def warm_up_head(
    model: nn.Module,
    loader: Iterable,
    head: Mapping[str, nn.Parameter],
    steps: int,
    *,
    device: torch.device,
    lr: float = 1e-3,
    prepare_batch: Callable = default_prepare_batch,
    progress: bool = True,
) -> None:
    """Train the head alone for ``steps`` steps (backbone frozen), cycling over the loader."""
    if steps <= 0 or not head:
        return
    states = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(head.values()), lr=lr, weight_decay=0.0)
    was_training = model.training
    model.eval()
    data = itertools.cycle(list(_batches(loader, steps, "head warm-up")))
    try:
        for _ in tqdm(range(steps), desc="head warm-up", disable=not progress, leave=False):
            x, y = prepare_batch(next(data), device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for p, s in states.items():
            p.requires_grad_(s)
        model.train(was_training)


def _reduce(grad: torch.Tensor, weight: torch.Tensor, estimator: str, taylor: bool) -> torch.Tensor:
    """One batch's statistic of a dense gradient, computed in place where the gradient is float32."""
    g = grad.detach()
    g = g if g.dtype == torch.float32 else g.float()
    if taylor:
        g.mul_(weight.detach().float())
    return g.abs_() if estimator == "l1" else g.square_()


def _streaming_hooks(
    params: Mapping[str, nn.Parameter], acc: dict[str, torch.Tensor], config: SHPEFTConfig, state: dict
) -> list:
    """Reduce each gradient into its accumulator as soon as backward has produced it, then free it."""

    def make(name: str) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if not state["last"] or p.grad is None:
                return  # a micro-batch before the last: the batch gradient is still being summed
            grad, p.grad = p.grad, None
            _check_finite(name, grad, f"gradient (calibration batch {state['batch']}) of")
            value = _reduce(grad, p, config.task_estimator, config.taylor)
            del grad
            if name in acc:
                acc[name].add_(value)
            else:  # first batch: the statistic is the accumulator (0 + x == x exactly)
                acc[name] = value

        return hook

    return [p.register_post_accumulate_grad_hook(make(n)) for n, p in params.items()]


@contextlib.contextmanager
def activation_checkpointing(model: nn.Module, enable: bool = True) -> Iterator[bool]:
    """Within the block, a timm model recomputes each block's activations in backward instead of
    keeping them (``set_grad_checkpointing``, non-reentrant only, so that every parameter still gets
    its gradient); other models are left alone. Yields whether checkpointing is on. In eval mode
    the recomputation repeats the same operations on the same inputs, so gradients are unchanged."""
    setter = getattr(model, "set_grad_checkpointing", None)
    on = False
    if enable and callable(setter):
        try:
            from timm.layers import use_reentrant_ckpt

            if not use_reentrant_ckpt():
                before = bool(getattr(model, "grad_checkpointing", False))
                setter(True)
                on = True
        except (ImportError, NotImplementedError, AssertionError, AttributeError):
            on = False
    try:
        yield on
    finally:
        if on:
            setter(before)


def _micro_batches(
    x: torch.Tensor, y: torch.Tensor, size: int | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if not size or size >= x.shape[0]:
        return [(x, y)]
    return list(zip(torch.split(x, size), torch.split(y, size)))


def calibrate(
    model: nn.Module,
    loader: Iterable,
    params: Mapping[str, nn.Parameter],
    config: SHPEFTConfig,
    *,
    device: torch.device | str | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    prepare_batch: Callable = default_prepare_batch,
    progress: bool = True,
    streaming: bool = True,
    micro_batch: int | None = None,
    checkpointing: bool = True,
) -> dict[str, torch.Tensor]:
    """Accumulate task-specific importance of ``params`` over the first calibration batches.

    With ``streaming`` (default) each dense gradient is reduced into its float32 accumulator by a
    post-accumulate-grad hook as soon as the backward pass has produced it, and freed at once: at
    most one dense gradient is alive besides the accumulators, which are created on first use. The
    result is bit-identical to ``streaming=False`` (all gradients first, then the reduction).
    ``micro_batch`` (streaming, ``ce`` loss only) runs each batch in slices of that many samples,
    each loss scaled by its share of the batch, and reduces the summed gradient after the last
    slice: the same estimator (the batch gradient) with a fraction of the activation memory, at the
    price of one dense gradient per tensor during the batch and float rounding of the sum (masks can
    differ from the whole-batch ones in near-ties). ``checkpointing`` (default) recomputes a timm
    model's blocks in backward instead of keeping their activations (one more forward per batch,
    same gradients; see :func:`activation_checkpointing`).

    Returns:
        name -> float32 CPU tensor of the same shape, ``sum |g|`` (l1) or ``sum g^2`` (l2), or the
        Taylor variants.

    Raises:
        ValueError: the loader yields no batch, or ``micro_batch`` with ``supcon``.
        FloatingPointError: a loss or gradient is NaN/Inf.
    """
    if micro_batch is not None and (micro_batch < 1 or not streaming or config.calibration_loss != "ce"):
        raise ValueError(
            f"micro_batch={micro_batch!r}: give an int >= 1 with streaming=True and calibration_loss='ce' "
            "(a contrastive loss does not split over micro-batches), or None."
        )
    device = torch.device(device) if device is not None else next(model.parameters()).device
    states = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    acc: dict[str, torch.Tensor] = {}
    if not streaming:
        acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    state = {"last": True, "batch": 0}
    ce = loss_fn or F.cross_entropy
    handles: list = []
    model.eval()
    ckpt = contextlib.ExitStack()
    try:
        ckpt.enter_context(activation_checkpointing(model, checkpointing and streaming))
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        if streaming:
            handles = _streaming_hooks(params, acc, config, state)
        batches = _batches(loader, config.calibration_batches, "calibration")
        for i, batch in enumerate(
            tqdm(
                batches,
                total=config.calibration_batches,
                desc="calibration",
                disable=not progress,
                leave=False,
            )
        ):
            state["batch"] = i
            x, y = prepare_batch(batch, device)
            parts = _micro_batches(x, y, micro_batch)
            for j, (xs, ys) in enumerate(parts):  # one slice's activations alive at a time
                if config.calibration_loss == "supcon":
                    loss = supervised_contrastive_loss(_pooled_features(model, xs), ys)
                else:
                    loss = ce(model(xs), ys)
                if len(parts) > 1:
                    loss = loss * (xs.shape[0] / x.shape[0])
                _backward(loss, i, state, last=j == len(parts) - 1)
            if not streaming:
                for n, p in params.items():
                    if p.grad is not None:
                        _check_finite(n, p.grad, f"gradient (calibration batch {i}) of")
                        accumulate_gradient(acc[n], p.grad, p, config.task_estimator, config.taylor)
                        p.grad = None
    finally:
        ckpt.close()
        for h in handles:
            h.remove()
        for p, s in states.items():
            p.requires_grad_(s)
            p.grad = None
        model.train(was_training)
    for n, p in params.items():  # tensors the loss never reached
        if n not in acc:
            acc[n] = torch.zeros_like(p, dtype=torch.float32)
    return {n: acc.pop(n).to("cpu") for n in params}


def _backward(loss: torch.Tensor, i: int, state: dict, *, last: bool) -> None:
    if not bool(torch.isfinite(loss)):
        raise FloatingPointError(
            f"calibration loss is {loss.item()} at batch {i}: check the input data for NaN/Inf."
        )
    state["last"] = last
    loss.backward()
