"""One run of the suite: prepare a method, train it, choose the epoch on validation, test once.

The model is prepared by ``methods.prepare_method`` (the call the bundle's ``train.yaml`` makes) and
trained by a plain PyTorch loop over ``recipe.param_groups`` (the non-head weights at the run's
learning rate, the head at the recipe's ``lr_head``), with the recipe's schedule, warm-up, label
smoothing and gradient clipping for every method. After each epoch the validation split is scored;
the trainable state of the best epoch (validation ROC-AUC, then accuracy, the earlier epoch on ties)
is restored and the test split is evaluated once. Each run keeps its per-sample test predictions
(predicted class and class probabilities per test file, in the order of the report's ``test_items``)
for the grouped bootstrap.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import MemoryProbe

from .config import SuiteConfig
from .data import Split, batches
from .plan import RunSpec, val_key

__all__ = ["artefact_bytes", "make_optimizer", "run_one"]

logger = logging.getLogger("benchmarks.suite")
SELECTION_RULE = (
    "max validation (mean of roc_auc and balanced accuracy, then accuracy), earliest epoch on ties"
)


@torch.inference_mode()
def _predict(model: nn.Module, split: Split, cfg: SuiteConfig, device: torch.device) -> np.ndarray:
    model.eval()
    probs = [
        torch.softmax(model(x.to(device)).float(), 1).cpu()
        for x, _ in batches(split, cfg.eval_batch_size, None, False)
    ]
    return torch.cat(probs).numpy()


def _metrics(split: Split, probs: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    from shpeft_monai.report import classification_metrics

    m = classification_metrics(split.y.tolist(), probs, class_names)
    return {
        k: m[k] for k in ("n", "accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "confusion_matrix")
    }


def artefact_bytes(model: nn.Module, method: str) -> int:
    """Bytes of what must be stored or sent: SH-PEFT's delta file, else the trainable state."""
    if method == "shpeft":
        from shpeft_monai.io import delta_to_bytes
        from shpeft_monai.model import extract_delta

        return len(delta_to_bytes(extract_delta(model)))
    from safetensors.torch import save

    from shpeft_monai.methods import trainable_state

    return len(save({k: v.contiguous() for k, v in trainable_state(model).items()}))


def make_optimizer(model: nn.Module, spec: RunSpec, recipe: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW over the recipe's parameter groups: the non-head weights at ``spec.lr``, the head at
    ``spec.lr_head`` (weight decays from the recipe)."""
    wd, wd_head = recipe.get("wd_selected", 1e-4), recipe.get("wd_head", 1e-4)
    try:
        from shpeft_monai.recipe import param_groups
    except ImportError:  # older library: one group
        from shpeft_monai.methods import trainable_parameters

        return torch.optim.AdamW(trainable_parameters(model), lr=spec.lr, weight_decay=wd)
    groups = param_groups(model, lr_selected=spec.lr, wd_selected=wd, lr_head=spec.lr_head, wd_head=wd_head)
    return torch.optim.AdamW(groups, lr=spec.lr, weight_decay=wd)


def _lr_factor(step: int, total: int, recipe: dict[str, Any]) -> float:
    try:
        from shpeft_monai.recipe import lr_factor
    except ImportError:
        return 1.0
    return lr_factor(
        step,
        total,
        warmup=recipe.get("warmup", 0.0),
        schedule=recipe.get("schedule", "constant"),
        min_lr_ratio=recipe.get("min_lr_ratio", 0.0),
    )


def _build(spec: RunSpec, cfg: SuiteConfig, n_classes: int, device: torch.device) -> nn.Module:
    from shpeft_monai.networks import create_network

    size = cfg.cnn_img_size if spec.network == cfg.cnn else cfg.img_size
    kwargs = {"img_size": size} if spec.network == cfg.vit else {}
    if spec.network == cfg.vit:
        kwargs.update(cfg.network_kwargs)
    return create_network(spec.network, num_classes=n_classes, pretrained=cfg.pretrained, **kwargs).to(device)


def _prepare(model: nn.Module, spec: RunSpec, cfg: SuiteConfig, data: dict[str, Split], device: torch.device):
    """Head warm-up (the same for every method) then ``prepare_method``; returns model, times, config."""
    from shpeft_monai.calibration import warm_up_head
    from shpeft_monai.config import SHPEFTConfig
    from shpeft_monai.methods import prepare_method
    from shpeft_monai.model import head_parameters

    scfg = SHPEFTConfig.from_dict({**spec.shpeft, "seed": spec.seed} if spec.shpeft else {"seed": spec.seed})
    head = head_parameters(model, scfg)
    gen = torch.Generator().manual_seed(10_000 + spec.seed)
    n_calib = max(scfg.calibration_batches, cfg.head_warmup)
    calib: list = []
    while len(calib) < n_calib:  # cycle over reshuffled passes when the subset is small
        calib += batches(data["train"], cfg.batch_size, gen, True)
    calib = [(x.to(device), y.to(device)) for x, y in calib[:n_calib]]
    t0 = time.perf_counter()
    if spec.warmup and cfg.head_warmup:
        warm_up_head(model, calib, head, cfg.head_warmup, device=device, progress=False)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = prepare_method(
        model,
        spec.method,
        shpeft=scfg,
        calib_loader=calib[: scfg.calibration_batches],
        device=device,
        lora={"r": cfg.lora_r, "alpha": 2 * cfg.lora_r, "target_modules": ["qkv"]},
        progress=False,
    )
    return model, warmup_s, time.perf_counter() - t0, scfg, sum(p.numel() for p in head.values())


def _counts(model: nn.Module, method: str, head_numel: int) -> tuple[int, int, int, int | None]:
    from shpeft_monai.methods import trainable_parameters
    from shpeft_monai.model import get_mask, trainable_report

    n_trainable = sum(p.numel() for p in trainable_parameters(model))
    if method == "shpeft":
        rep = trainable_report(model)
        eligible = int(get_mask(model).meta["eligible_weights"])
        return n_trainable, rep["selected_backbone_weights"], rep["head_parameters"], eligible
    return n_trainable, n_trainable - head_numel, head_numel, None


def run_one(
    spec: RunSpec, cfg: SuiteConfig, data: dict[str, Split], class_names: list[str]
) -> dict[str, Any]:
    """Train one method, choose the epoch on validation, evaluate the test split once."""
    from shpeft_monai.methods import restore_trainable_state, trainable_state

    device = torch.device(cfg.device)
    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed)
    t_run = time.perf_counter()
    model = _build(spec, cfg, len(class_names), device)
    backbone_numel = sum(p.numel() for p in model.parameters())
    model, warmup_s, selection_s, scfg, head_numel = _prepare(model, spec, cfg, data, device)
    backbone_numel -= head_numel
    n_trainable, selected, head_n, eligible = _counts(model, spec.method, head_numel)
    opt = make_optimizer(model, spec, cfg.recipe)
    peaks = [g["lr"] for g in opt.param_groups]
    clip, smoothing = float(cfg.recipe.get("grad_clip", 0.0)), float(cfg.recipe.get("label_smoothing", 0.0))
    steps_per_epoch = -(-data["train"].y.numel() // cfg.batch_size)
    total, step = cfg.epochs * steps_per_epoch, 0
    mem, cuda = MemoryProbe(device), device.type == "cuda"
    step_times: list[float] = []
    peak = None
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    train_gen = torch.Generator().manual_seed(spec.seed)
    for epoch in range(cfg.epochs):
        model.train()
        losses = []
        if epoch == 0:
            mem.reset()
        for x, y in batches(data["train"], cfg.batch_size, train_gen, True):
            x, y = x.to(device), y.to(device)
            for g, lr in zip(opt.param_groups, peaks):
                g["lr"] = lr * _lr_factor(step, total, cfg.recipe)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y, label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
            opt.step()
            if cuda:
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            step += 1
        if epoch == 0:
            peak = mem.peak()
        val = _metrics(data["validation"], _predict(model, data["validation"], cfg, device), class_names)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val": val})
        logger.info(
            "  %s seed %d epoch %d: loss %.4f val acc %.4f auc %.4f",
            spec.label,
            spec.seed,
            epoch,
            history[-1]["train_loss"],
            val["accuracy"],
            val["roc_auc"],
        )
        if best is None or val_key(val) > val_key(best["val"]):  # strict: ties keep the earlier epoch
            best = {"epoch": epoch, "val": val, "state": trainable_state(model)}
    assert best is not None
    restore_trainable_state(model, best["state"])
    probs = _predict(model, data["test"], cfg, device)  # once, at the chosen epoch
    test = _metrics(data["test"], probs, class_names)
    timed = step_times[1:] if len(step_times) > 1 else step_times
    return {
        "key": spec.key,
        "label": spec.label,
        "group": spec.group,
        "network": spec.network,
        "method": spec.method,
        "shpeft": scfg.to_dict() if spec.method == "shpeft" else None,
        "shpeft_eligible": eligible,
        "head_warmup": bool(spec.warmup and cfg.head_warmup),
        "seed": spec.seed,
        "lr": spec.lr,
        "lr_head": spec.lr_head,
        "chosen_epoch": best["epoch"],
        "selection_rule": SELECTION_RULE,
        "val": best["val"],
        "test": test,
        "test_pred": probs.argmax(1).astype(int).tolist(),
        "test_prob": np.round(probs, 5).tolist(),
        "history": history,
        "trainable_total": int(n_trainable),
        "selected_backbone_weights": int(selected),
        "head_parameters": int(head_n),
        "backbone_parameters": int(backbone_numel),
        "share_of_backbone": selected / max(backbone_numel, 1),
        "step_time_s": float(np.median(timed)) if timed else None,
        "peak_memory_bytes": peak,
        "memory_measure": mem.how,
        "head_warmup_s": warmup_s,
        "selection_s": selection_s,
        "artefact_bytes": artefact_bytes(model, spec.method),
        "run_s": time.perf_counter() - t_run,
    }
