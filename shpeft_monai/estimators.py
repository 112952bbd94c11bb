"""Lazy importance scores: task-agnostic magnitude and the forward-only task-specific estimator.

* :func:`magnitude_scores`: ``|w|`` (l1) or ``w**2`` (l2), computed per tensor when selection reads
  it (the values of :func:`.scoring.task_agnostic_scores`, never all at once);
* :func:`activation_scores`: the forward-only estimator of FPS (Yang, Wei and Lin, "FPS:
  Feedforward-based Parameter Selection for Efficient Fine-Tuning", arXiv:2510.27359),
  ``I(w) = E_x[|w| * |a(x)|]`` with ``a`` the input activation that ``w`` multiplies. For a Linear
  weight entry ``(r, c)`` that is ``|W[r, c]| * mean |x[..., c]|`` over every calibration token (all
  batch and token positions); for a Conv kernel entry ``(o, i, ...)`` ``|W[o, i, ...]|`` times the mean
  ``|x|`` of the input channel it reads (over batch and space; grouped convolutions map ``i`` to its
  group's channel; padding is ignored). ``l2`` uses ``w**2 * mean x**2``. Statistics come from forward
  hooks over ``config.calibration_batches`` batches under ``torch.no_grad()``: no backward pass, no
  loss, no labels, only one input-channel vector per layer. Parameters that are not the weight of a
  ``nn.Linear`` or convolution (biases, norms, position embeddings, class tokens, or a weight used
  through ``F.linear`` elsewhere) are scored as if their input were the constant 1, the exact value for
  a bias: ``|p|`` (l1) or ``p**2`` (l2).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import default_prepare_batch
from .config import SHPEFTConfig
from .scoring import _check_finite
from .streaming import LazyScores

__all__ = ["activation_scores", "activation_statistics", "magnitude_scores"]

_CONV = nn.modules.conv._ConvNd


def magnitude_scores(params: Mapping[str, torch.Tensor], estimator: str = "l1") -> LazyScores:
    """``|w|`` or ``w**2`` of each tensor, float32 on CPU, computed on access (NaN/Inf refused)."""

    checked: set[str] = set()

    def score(name: str) -> torch.Tensor:
        w = params[name].detach().to("cpu", torch.float32)
        if name not in checked:  # selection reads each tensor several times: check it once
            _check_finite(name, w, "pretrained weight")
            checked.add(name)
        return w.abs() if estimator == "l1" else w.square()

    return LazyScores({n: p.shape for n, p in params.items()}, score)


def _owners(model: nn.Module, params: Mapping[str, torch.Tensor]) -> dict[str, nn.Module]:
    by_id = {id(p): n for n, p in params.items()}
    out: dict[str, nn.Module] = {}
    for module in model.modules():
        if isinstance(module, (nn.Linear, _CONV)) and id(module.weight) in by_id:
            out[by_id[id(module.weight)]] = module
    return out


def activation_statistics(
    model: nn.Module,
    loader: Iterable,
    params: Mapping[str, torch.Tensor],
    config: SHPEFTConfig,
    *,
    device: torch.device | str | None = None,
    prepare_batch: Callable = default_prepare_batch,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Mean ``|x|`` (l1) or ``x**2`` (l2) per input channel of every Linear/Conv owning a tensor of
    ``params``, over the calibration batches (float64 on CPU, one vector per layer).

    Raises:
        ValueError: the loader yields no batch. FloatingPointError: an activation is NaN/Inf.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    owners = _owners(model, params)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(owners, 0)
    l2 = config.task_estimator == "l2"

    def make(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, _out: object) -> None:
            x = inputs[0].detach()
            channel = x.dim() - 1 if isinstance(module, nn.Linear) else 1
            dims = tuple(d for d in range(x.dim()) if d != channel)
            # one reduction, no copy of the activation (a float64 sum would materialise one)
            s = torch.linalg.vector_norm(x, 2.0 if l2 else 1.0, dim=dims, dtype=torch.float32)
            s = (s.square() if l2 else s).double()
            if not bool(torch.isfinite(s).all()):
                raise FloatingPointError(
                    f"input activation of {name!r} has NaN/Inf: check the calibration data."
                )
            sums[name] = sums[name] + s if name in sums else s
            counts[name] += x.numel() // x.shape[channel]

        return hook

    was_training = model.training
    handles = [m.register_forward_hook(make(n)) for n, m in owners.items()]
    model.eval()
    try:
        it = itertools.islice(loader, config.calibration_batches)
        seen = 0
        with torch.no_grad():
            for batch in tqdm(it, total=config.calibration_batches, desc="activations", disable=not progress):
                x, _ = prepare_batch(batch, device)
                model(x)
                seen += 1
        if not seen:
            raise ValueError(
                "the calibration loader yielded no batches; give it at least one batch of task data."
            )
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: (sums[n] / counts[n]).cpu() for n in owners if counts[n]}


def _per_entry(module: nn.Module, stat: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The input-channel statistic broadcast to the weight's shape (out, in[/groups], *kernel)."""
    if isinstance(module, nn.Linear):
        return stat.view(1, -1)
    groups, out = module.groups, shape[0]
    per_group = shape[1]
    channel = (torch.arange(out) // (out // groups)).unsqueeze(1) * per_group + torch.arange(per_group)
    return stat[channel].view(out, per_group, *([1] * (len(shape) - 2)))


def activation_scores(
    model: nn.Module,
    loader: Iterable,
    params: Mapping[str, torch.Tensor],
    config: SHPEFTConfig,
    *,
    device: torch.device | str | None = None,
    prepare_batch: Callable = default_prepare_batch,
    progress: bool = True,
) -> LazyScores:
    """FPS task-specific scores of ``params`` (see the module docstring), computed per tensor on access."""
    stats = activation_statistics(
        model, loader, params, config, device=device, prepare_batch=prepare_batch, progress=progress
    )
    owners = _owners(model, params)
    magnitude = magnitude_scores(params, config.task_estimator)

    def score(name: str) -> torch.Tensor:
        w = magnitude[name]
        if name not in stats:  # not a Linear/Conv weight, or never reached: input taken as 1
            return w
        return w.mul_(_per_entry(owners[name], stats[name].float(), w.shape))

    return LazyScores(magnitude.shapes, score)
