"""Each method of the step-cost benchmark as a model, an optimizer and a post-backward hook.

``gps`` is GPS-style gradient masking (dense AdamW with weight decay 0, gradients multiplied by the
mask after ``backward()``); ``shpeft`` selects and injects through the library; ``lora`` goes
through Hugging Face ``peft``; ``floor`` is forward plus input-gradient backward through the frozen
backbone (only the head trains). See the package docstring for what is measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from benchmarks.common import MemoryProbe

from .options import METHODS, StepOptions

__all__ = ["count", "head_names", "optimizer_state_bytes", "prepare_step"]


def head_names(model: nn.Module) -> set[str]:
    from shpeft_monai import SHPEFTConfig
    from shpeft_monai.model import head_parameters

    return set(head_parameters(model, SHPEFTConfig()))


def _input_gradients_from_the_first_layer(model: nn.Module) -> None:
    """Make the backward pass run through the whole frozen backbone, as a sparse method's does.

    The patch embedding's output (timm ViTs) is marked as needing a gradient, so every block computes
    its input gradient and no weight gradient; like a sparse first layer, the patch embedding itself
    computes no gradient of the images. Models without ``patch_embed`` mark their input instead.
    """

    def needs_grad(t: Any) -> Any:
        return t.detach().requires_grad_() if torch.is_tensor(t) and t.is_floating_point() else t

    embed = getattr(model, "patch_embed", None)
    if isinstance(embed, nn.Module):
        embed.register_forward_hook(lambda _m, _args, out: needs_grad(out))
    else:
        model.register_forward_pre_hook(lambda _m, args: tuple(needs_grad(a) for a in args))


def count(params: Sequence[torch.Tensor] | Any) -> int:
    return int(sum(p.numel() for p in params))


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return int(total)


def prepare_step(
    method: str,
    model: nn.Module,
    opts: StepOptions,
    batch: tuple[torch.Tensor, torch.Tensor],
    mask_indices: dict[str, torch.Tensor] | None,
    mem: MemoryProbe,
    sync: Callable[[], None],
) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], None] | None, dict[str, Any]]:
    """Prepare ``model`` for ``method``: returns the model to call, optimizer, post-backward hook, info."""
    head = head_names(model)
    head_params = count(p for n, p in model.named_parameters() if n in head)
    info: dict[str, Any] = {"head_params": head_params, "selected_backbone_weights": None}
    post: Callable[[], None] | None = None
    adamw = dict(lr=opts.lr, weight_decay=opts.weight_decay)

    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), **adamw)
        info["updated_params"] = count(model.parameters())

    elif method == "linear_probe":
        for n, p in model.named_parameters():
            p.requires_grad_(n in head)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **adamw)
        info["updated_params"] = head_params

    elif method == "floor":
        for n, p in model.named_parameters():
            p.requires_grad_(n in head)
        _input_gradients_from_the_first_layer(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **adamw)
        info["updated_params"] = head_params

    elif method == "shpeft":
        from shpeft_monai import SHPEFTConfig, inject, select_mask, trainable_parameters

        cfg = SHPEFTConfig(budget=opts.budget, calibration_batches=opts.calibration_batches)
        mem.reset()
        t0 = time.perf_counter()
        mask = select_mask(model, cfg, [batch], device=batch[0].device, progress=False)
        sync()
        info["selection_s"] = time.perf_counter() - t0
        info["selection_peak_bytes"] = mem.peak()
        info["selection_config"] = {"hybrid": cfg.hybrid, "rho": cfg.rho, "calibration_batches": 1}
        inject(model, mask, cfg)
        opt = torch.optim.AdamW(trainable_parameters(model), **adamw)
        info["selected_backbone_weights"] = int(mask.k)
        info["updated_params"] = int(mask.k) + head_params
        info["_mask"] = {n: i.detach().cpu().clone() for n, i in mask.indices.items()}

    elif method == "gps":
        params = dict(model.named_parameters())
        if mask_indices is None:  # run alone: a magnitude mask of the same budget (cost is the same)
            from shpeft_monai import SHPEFTConfig, select_mask

            cfg = SHPEFTConfig(budget=opts.budget, hybrid="task_agnostic")
            mask_indices = dict(select_mask(model, cfg, progress=False).indices)
        masks: dict[str, torch.Tensor] = {}
        for n, idx in mask_indices.items():
            m = torch.zeros(params[n].numel(), dtype=torch.bool, device=params[n].device)
            m[idx.to(m.device)] = True
            masks[n] = m.view_as(params[n])
        frozen = [p for n, p in params.items() if n not in masks and n not in head]
        for p in model.parameters():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=0.0)
        k = int(sum(int(i.numel()) for i in mask_indices.values()))
        info["selected_backbone_weights"] = k
        info["updated_params"] = k + head_params

        def post() -> None:
            for n, m in masks.items():
                params[n].grad.mul_(m)
            for p in frozen:
                if p.grad is not None:
                    p.grad.zero_()

    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=opts.lora_r, target_modules=["qkv"], modules_to_save=["head"])
        model = get_peft_model(model, config)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, **adamw)
        info["updated_params"] = count(trainable)
        info["lora_config"] = {"r": opts.lora_r, "target_modules": ["qkv"], "modules_to_save": ["head"]}

    else:
        raise ValueError(f"method={method!r} is not one of {METHODS}.")
    return model, opt, post, info
