"""Fine-tuning methods behind one switch, so that bundles and benchmarks compare like with like.

``shpeft`` (and its single-criterion references through ``SHPEFTConfig.hybrid``), ``full``,
``linear_probe`` (head only), ``bitfit`` (biases and head) and ``lora`` (Hugging Face ``peft``).
Every method leaves ``requires_grad`` set on exactly what it trains, so the optimizer is always
built from :func:`trainable_parameters` and the saved artefact is what the method trained.

BatchNorm running statistics are buffers, not parameters. Every method but ``full`` keeps them at
the pretrained values (BatchNorm stays in eval mode even when the trainer calls ``train()``), so the
artefact alone rebuilds the trained model; ``full`` updates them and saves them with its weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .config import SHPEFTConfig
from .io import LAST_STATE_FILE, MASK_FILE, load_mask, save_mask
from .model import head_parameters, inject, mask_summary
from .pipeline import select_mask, warm_up_head_for_selection

__all__ = [
    "METHODS",
    "freeze_norm_statistics",
    "prepare_method",
    "restore_trainable_state",
    "trainable_parameters",
    "trainable_state",
]

logger = logging.getLogger(__name__)
METHODS = ("shpeft", "full", "linear_probe", "bitfit", "lora")


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters the chosen method trains (the optimizer's whole content)."""
    return [p for p in model.parameters() if p.requires_grad]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Named CPU copies of what training changes: the trainable parameters and the running
    statistics of BatchNorm layers that are not frozen (the resumable and saved state)."""
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats and not _stats_frozen(module):
            prefix = f"{name}." if name else ""
            state.update({prefix + b: t for b, t in module.named_buffers(recurse=False) if t is not None})
    return {n: t.detach().to("cpu").clone() for n, t in state.items()}


def restore_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state") -> None:
    """Copy a :func:`trainable_state` back into ``model`` by name (shapes must match)."""
    named = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    bad = [n for n, t in state.items() if n not in named or named[n].shape != t.shape]
    if bad:
        raise ValueError(
            f"{source}: saved tensors {bad[:5]} do not fit the network (another method or model?)."
        )
    with torch.no_grad():
        for n, t in state.items():
            named[n].copy_(t.to(named[n].device))


def _keep_eval(module: nn.Module, _args: Any) -> None:
    module.training = False


def _stats_frozen(module: nn.Module) -> bool:
    return any(h is _keep_eval for h in module._forward_pre_hooks.values())


def freeze_norm_statistics(model: nn.Module) -> int:
    """Keep every BatchNorm layer of ``model`` in eval mode (pretrained running statistics, no
    batch statistics), whatever ``model.train()`` says. Returns the number of layers frozen."""
    frozen = 0
    for module in model.modules():
        if isinstance(module, _BatchNorm) and not _stats_frozen(module):
            module.register_forward_pre_hook(_keep_eval)
            frozen += 1
    return frozen


def _freeze_except(model: nn.Module, keep: Iterable[nn.Parameter]) -> None:
    keep_ids = {id(p) for p in keep}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep_ids)


def _lora(model: nn.Module, head: list[str], options: dict[str, Any]) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise ImportError("method='lora' needs the `peft` package: pip install 'shpeft-monai[peft]'") from exc
    present = [h for h in head if hasattr(model, h)]
    cfg = LoraConfig(
        r=int(options.get("r", 8)),
        lora_alpha=int(options.get("alpha", 16)),
        lora_dropout=float(options.get("dropout", 0.0)),
        target_modules=list(options.get("target_modules", ["qkv"])),
        modules_to_save=present,
    )
    return get_peft_model(model, cfg)


def prepare_method(
    model: nn.Module,
    method: str = "shpeft",
    *,
    shpeft: SHPEFTConfig | dict[str, Any] | None = None,
    calib_loader: Iterable | None = None,
    output_dir: str | Path | None = None,
    device: torch.device | str | None = None,
    lora: dict[str, Any] | None = None,
    progress: bool = True,
) -> nn.Module:
    """Make ``model`` train only what ``method`` trains; returns the model to optimise.

    For ``shpeft`` the mask is selected once and saved to ``output_dir/mask.safetensors``; when that
    file exists (a resumed run) it is loaded instead, so a resumed run trains the same weights.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}.")
    cfg = shpeft if isinstance(shpeft, SHPEFTConfig) else SHPEFTConfig.from_dict(dict(shpeft or {}))
    if device is not None:
        model = model.to(device)
    head = list(head_parameters(model, cfg).values())
    if not head and method != "full":
        raise ValueError(
            f"no head parameters found under {cfg.head}: set `shpeft#head` to the classifier's module name."
        )
    if method == "full":
        _freeze_except(model, model.parameters())
    elif method == "linear_probe":
        _freeze_except(model, head)
    elif method == "bitfit":
        _freeze_except(model, head + [p for n, p in model.named_parameters() if n.endswith("bias")])
    elif method == "lora":
        model = _lora(model, list(cfg.head), dict(lora or {}))
    else:
        mask_file = Path(output_dir) / MASK_FILE if output_dir else None
        if mask_file is not None and mask_file.is_file():
            mask = load_mask(mask_file).mask
            logger.info("SH-PEFT: resuming with the saved mask %s (k=%d)", mask_file, mask.k)
            if not (Path(output_dir) / LAST_STATE_FILE).is_file():
                # stopped after selection, before the first checkpoint: start the head where it was
                warm_up_head_for_selection(model, cfg, calib_loader, device=device, progress=progress)
        else:
            mask = select_mask(model, cfg, calib_loader, device=device, progress=progress)
            if mask_file is not None:
                save_mask(mask_file, mask, cfg.to_dict(), mask.meta)
        inject(model, mask, cfg)
        summary = mask_summary(mask)
        logger.info("SH-PEFT mask: %d weights; by type %s", mask.k, summary["by_type"])
    if method != "full" and (frozen := freeze_norm_statistics(model)):
        logger.info("kept %d BatchNorm layers at their pretrained statistics", frozen)
    n_train = sum(p.numel() for p in trainable_parameters(model))
    logger.info("method=%s trains %d parameters", method, n_train)
    model._shpeft_method = method
    return model
