"""Accuracy benchmark: SH-PEFT against full fine-tuning and PEFT peers on Br35H, with the ablations.

METHOD.md section 4 ("Comparing honestly") as a program:

* one committed grouped split (``shpeft_monai.data.load_split("br35h")``), the same stratified
  training subset, resolution, augmentation (random left-right flip), epochs and seeds for every
  method;
* every method is prepared by the library call the bundle uses (``methods.prepare_method``) and
  trained by a plain PyTorch loop over ``methods.trainable_parameters`` (AdamW, cross-entropy): the
  same prepared model the bundle's MONAI ``SupervisedTrainer`` would train;
* the checkpoint is chosen on the validation split only (best validation ROC-AUC, ties broken by
  validation accuracy, then the earlier epoch); its trainable state is kept in memory and the test
  split is evaluated once per run, at that checkpoint. The best test score over epochs is never
  looked at;
* every method starts from the same head warm-up (``--head-warmup`` steps on the head alone on the
  same batches), so the SH-PEFT hybrid's warm head is no head start over its peers; SH-PEFT then
  calibrates with ``head_warmup_steps=0`` (the head is already warm);
* per run: test accuracy, macro F1, ROC-AUC, selected backbone weights, head parameters, their share
  of the backbone, median train-step time, peak memory of the training steps, selection time and
  the bytes of the artefact that must be stored (SH-PEFT: the delta file; others: the trainable
  state as safetensors). Time and memory are reported as ratios to full fine-tuning of the same
  network in the same run.

Images are decoded and resized once into an in-memory tensor cache (``$SHPEFT_CACHE_DIR/bench``);
augmentation is a per-batch random flip of cached tensors, so JPEG decoding does not dominate.

Run ``python -m benchmarks.suite`` (``--config cpu``) or ``--config full --device cuda``; results go
to ``benchmarks/results/suite_<config>.{json,md}`` and PNG plots beside them. Finished runs are
kept in the JSON and skipped when the command is run again (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CLASS_NAMES = ["no_tumour", "tumour"]
VIT = "vit_small_patch14_dinov2"
CNN = "tf_efficientnet_lite0"
logger = logging.getLogger("benchmarks.suite")


# ----------------------------------------------------------------------------------------------
# configurations


@dataclass(frozen=True)
class SuiteConfig:
    """Everything shared by the runs of one suite."""

    name: str = "cpu"
    device: str = "cpu"
    img_size: int = 112
    cnn_img_size: int = 112
    train_subset: int = 400  # 0 = whole split; stratified subset otherwise (same for every seed)
    val_subset: int = 0
    test_subset: int = 0
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 64
    seeds: tuple[int, ...] = (0, 1, 2)
    ablation_seeds: tuple[int, ...] = (0,)
    budget: float = 1e-4
    calibration_batches: int = 4
    head_warmup: int = 10
    # learning rate per method chosen on VALIDATION (seed 0) from a grid; other seeds reuse the winner
    # (one decade each side of the usual setting: a winner at the edge of a narrower grid hid better ones)
    lr_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2)  # PEFT methods (sparse values, LoRA, biases, head)
    lr_grid_full: tuple[float, ...] = (1e-6, 1e-5, 1e-4)  # full fine-tuning of the whole backbone
    weight_decay: float = 1e-4
    lora_r: int = 8
    threads: int = 2
    methods: tuple[str, ...] = ()
    ablations: tuple[str, ...] = ()
    note: str = ""


DEFAULT_METHODS = (
    "shpeft_union",
    "shpeft_weighted",
    "task_specific",
    "task_specific_per_row",
    "task_agnostic",
    "random",
    "full",
    "linear_probe",
    "bitfit",
    "lora",
    "cnn_shpeft_union",
    "cnn_full",
    "cnn_linear_probe",
)
ABLATIONS = ("budget", "rho", "estimator", "calibration_batches", "calibration_loss")

CONFIGS: dict[str, SuiteConfig] = {
    # 2 CPU cores in about an hour: 70 px (25 tokens for ViT-S/14), 320 training and 240 validation
    # images, the whole test split, 3 epochs
    "cpu": SuiteConfig(
        img_size=70, train_subset=320, val_subset=240, methods=DEFAULT_METHODS, ablations=ABLATIONS
    ),
    # what finished on a shared, heavily loaded 2-core machine (see docs/benchmarks.md)
    "cpu_small": SuiteConfig(
        name="cpu_small",
        img_size=56,
        cnn_img_size=64,
        train_subset=160,
        val_subset=160,
        test_subset=0,
        epochs=2,
        seeds=(0,),
        calibration_batches=2,
        head_warmup=5,
        lr_grid=(1e-3,),
        lr_grid_full=(1e-4,),
        methods=(
            "shpeft_union",
            "task_specific",
            "task_agnostic",
            "random",
            "full",
            "linear_probe",
            "bitfit",
            "lora",
        ),
        ablations=("budget", "rho"),
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
        head_warmup=20,
        methods=DEFAULT_METHODS,
        ablations=ABLATIONS,
    ),
    # the unit test
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
        calibration_batches=1,
        head_warmup=1,
        lr_grid=(1e-3,),
        lr_grid_full=(1e-4,),
        methods=("shpeft_union", "linear_probe"),
        ablations=(),
    ),
}


@dataclass(frozen=True)
class RunSpec:
    """One training run: a method (with its SH-PEFT settings) on one network, learning rate and seed."""

    label: str  # table row, e.g. "shpeft_union" or "budget=0.001"
    group: str  # "methods" or the ablation's name
    network: str
    method: str
    shpeft: dict[str, Any] = field(default_factory=dict)  # complete SH-PEFT settings (method "shpeft")
    warmup: bool = True
    seed: int = 0
    lr: float = 1e-4

    @property
    def key(self) -> str:
        """Identity of the training run: equal settings share one run whatever the row they fill."""
        body = [self.network, self.method, self.shpeft, self.warmup, self.seed, self.lr]
        return hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]


def _method_spec(name: str) -> tuple[str, str, dict[str, Any]]:
    network = CNN if name.startswith("cnn_") else VIT
    base = name.removeprefix("cnn_")
    table: dict[str, tuple[str, dict[str, Any]]] = {
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
    if base not in table:
        raise ValueError(f"unknown method {name!r}; known: {sorted(table)} (prefix cnn_ for the CNN)")
    method, shpeft = table[base]
    return network, method, dict(shpeft)


def _ablation_specs(
    name: str, cfg: SuiteConfig, hybrid: str = "union"
) -> list[tuple[str, dict[str, Any], bool]]:
    """(label, SH-PEFT overrides, head warm-up) per ablation point, around the ``hybrid`` rule."""
    u = {"hybrid": hybrid}
    if name == "budget":
        return [(f"budget={b:g}", {**u, "budget": b}, True) for b in (1e-5, 1e-4, 1e-3, 1e-2)]
    if name == "rho":  # the hybrid ratio: rho (union) or lam (weighted), the task-specific share
        knob = "lam" if hybrid == "weighted" else "rho"
        return [(f"{knob}={r:g}", {**u, knob: r}, True) for r in (0.0, 0.25, 0.5, 0.75, 1.0)]
    if name == "estimator":
        return [(f"estimator={e}", {**u, "task_estimator": e}, True) for e in ("l1", "l2")]
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

    base = {
        "budget": cfg.budget,
        "calibration_batches": cfg.calibration_batches,
        "calibration_loss": "ce",
        "head_warmup_steps": 0,  # the suite warms every method's head up the same way beforehand
    }
    return SHPEFTConfig.from_dict({**base, **overrides}).to_dict()


def _lr_grid(cfg: SuiteConfig, method: str) -> tuple[float, ...]:
    return cfg.lr_grid_full if method == "full" else cfg.lr_grid


def chosen_lr(results: dict[str, dict[str, Any]], specs: list[RunSpec]) -> float | None:
    """The grid point whose seed-0 run scored best on validation (None until all have run)."""
    if not all(s.key in results for s in specs):
        return None
    best = max(specs, key=lambda s: (_val_key(results[s.key]["val"]), -s.lr))  # ties: the smaller lr
    return best.lr


HYBRIDS = ("shpeft_union", "shpeft_weighted")  # the SH-PEFT hybrid rules the ablations may centre on


def plan_runs(cfg: SuiteConfig, results: dict[str, dict[str, Any]] | None = None) -> list[RunSpec]:
    """Every run the suite needs given the finished ``results`` (by key).

    Each method first runs seed ``cfg.seeds[0]`` at every learning rate of its grid; once those are
    done, the other seeds run at the learning rate that won on validation. The ablations centre on
    the SH-PEFT hybrid rule (union or weighted, among ``cfg.methods``) with the better mean
    validation score over its seeds, at that method's learning rate; they wait until it is known.
    Without either in the suite they centre on union at the first grid point.
    """
    results = results or {}
    runs: list[RunSpec] = []
    s0, rest = cfg.seeds[0], cfg.seeds[1:]
    hybrids: dict[str, tuple[float, list[RunSpec]]] = {}
    for name in cfg.methods:
        network, method, overrides = _method_spec(name)
        shpeft = shpeft_settings(cfg, overrides) if method == "shpeft" else {}
        grid = [
            RunSpec(name, "lr_search", network, method, shpeft, True, s0, lr) for lr in _lr_grid(cfg, method)
        ]
        runs += grid
        lr = chosen_lr(results, grid)
        if lr is None:
            continue
        seeds = [RunSpec(name, "methods", network, method, shpeft, True, s, lr) for s in (s0, *rest)]
        runs += seeds
        if name in HYBRIDS:
            hybrids[name] = (lr, seeds)
    centre = ablation_centre(cfg, hybrids, results)
    if centre is None:
        return runs
    hybrid, lr = centre
    for abl in cfg.ablations:
        for label, overrides, warm in _ablation_specs(abl, cfg, hybrid):
            shpeft = shpeft_settings(cfg, overrides)
            runs += [RunSpec(label, abl, VIT, "shpeft", shpeft, warm, s, lr) for s in cfg.ablation_seeds]
    return runs


def ablation_centre(
    cfg: SuiteConfig, hybrids: dict[str, tuple[float, list[RunSpec]]], results: dict[str, dict[str, Any]]
) -> tuple[str, float] | None:
    """(hybrid rule, lr) of the better SH-PEFT hybrid method on validation; None while pending."""
    wanted = [h for h in HYBRIDS if h in cfg.methods]
    if not wanted:
        return "union", cfg.lr_grid[0]
    if any(h not in hybrids or any(s.key not in results for s in hybrids[h][1]) for h in wanted):
        return None

    def score(h: str) -> tuple[float, float]:
        vals = [results[s.key]["val"] for s in hybrids[h][1]]
        return (
            float(np.mean([_val_key(v)[0] for v in vals])),
            float(np.mean([_val_key(v)[1] for v in vals])),
        )

    best = max(wanted, key=score)
    return _method_spec(best)[2]["hybrid"], hybrids[best][0]


# ----------------------------------------------------------------------------------------------
# data: decode once, keep tensors


@dataclass
class Split:
    x: torch.Tensor  # (N, 3, S, S) float16, normalised
    y: torch.Tensor  # (N,) int64


def _cache_split(items: list[dict[str, Any]], img_size: int, network: str, tag: str) -> Split:
    from shpeft_monai._assets import cache_dir
    from shpeft_monai.data import image_transforms
    from shpeft_monai.networks import preprocessing

    norm = preprocessing(network)
    ident = json.dumps([[d["image"] for d in items], img_size, norm["mean"], norm["std"]])
    digest = hashlib.sha1(ident.encode()).hexdigest()[:16]
    path = cache_dir() / "bench" / f"{tag}_{img_size}_{digest}.pt"
    if path.is_file():
        data = torch.load(path)
        return Split(data["x"], data["y"])
    tf = image_transforms(img_size, train=False, mean=norm["mean"], std=norm["std"])
    xs, ys = [], []
    t0 = time.perf_counter()
    for i, d in enumerate(items):
        out = tf(dict(d))
        xs.append(torch.as_tensor(out["image"]).to(torch.float16))
        ys.append(int(d["label"]))
        if (i + 1) % 200 == 0:
            logger.info("decoded %d/%d %s images", i + 1, len(items), tag)
    split = Split(torch.stack(xs), torch.tensor(ys, dtype=torch.long))
    logger.info("decoded %d %s images at %d px in %.0fs", len(items), tag, img_size, time.perf_counter() - t0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"x": split.x, "y": split.y}, tmp)
    os.replace(tmp, path)
    return split


def load_data(cfg: SuiteConfig, network: str) -> dict[str, Split]:
    from shpeft_monai.data import load_split, subsample

    splits = load_split("br35h")
    sizes = {"train": cfg.train_subset, "validation": cfg.val_subset, "test": cfg.test_subset}
    size = cfg.cnn_img_size if network == CNN else cfg.img_size
    out = {}
    for name, n in sizes.items():
        items = splits[name] if not n else subsample(splits[name], n, seed=0)
        out[name] = _cache_split(items, size, network, name)
    return out


def _batches(split: Split, batch_size: int, gen: torch.Generator | None, flip: bool) -> list:
    n = split.y.numel()
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    out = []
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        x = split.x[idx].float()
        if flip:
            f = torch.rand(idx.numel(), generator=gen) < 0.5
            x = torch.where(f[:, None, None, None], x.flip(-1), x)
        out.append((x, split.y[idx]))
    return out


# ----------------------------------------------------------------------------------------------
# one run


def _memory_probe(device: torch.device) -> Any:
    try:
        from benchmarks.step_cost import _Memory

        return _Memory(device)
    except Exception:
        return None


@torch.inference_mode()
def _predict(model: nn.Module, split: Split, cfg: SuiteConfig, device: torch.device) -> np.ndarray:
    model.eval()
    probs = []
    for x, _ in _batches(split, cfg.eval_batch_size, None, False):
        probs.append(torch.softmax(model(x.to(device)).float(), 1).cpu())
    return torch.cat(probs).numpy()


def _metrics(split: Split, probs: np.ndarray) -> dict[str, Any]:
    from shpeft_monai.report import classification_metrics

    m = classification_metrics(split.y.tolist(), probs, CLASS_NAMES)
    return {k: m[k] for k in ("n", "accuracy", "f1_macro", "roc_auc", "confusion_matrix")}


def _val_key(m: dict[str, Any]) -> tuple[float, float]:
    auc = m["roc_auc"] if m["roc_auc"] == m["roc_auc"] else -1.0  # NaN -> worst
    return (auc, m["accuracy"])


def _artefact_bytes(model: nn.Module, method: str) -> int:
    if method == "shpeft":
        from shpeft_monai.io import delta_to_bytes
        from shpeft_monai.model import extract_delta

        return len(delta_to_bytes(extract_delta(model)))
    from safetensors.torch import save

    from shpeft_monai.methods import trainable_state

    return len(save({k: v.contiguous() for k, v in trainable_state(model).items()}))


def run_one(spec: RunSpec, cfg: SuiteConfig, data: dict[str, Split]) -> dict[str, Any]:
    """Train one method, choose the epoch on validation, evaluate the test split once."""
    from shpeft_monai.calibration import warm_up_head
    from shpeft_monai.config import SHPEFTConfig
    from shpeft_monai.methods import (
        prepare_method,
        restore_trainable_state,
        trainable_parameters,
        trainable_state,
    )
    from shpeft_monai.model import get_mask, head_parameters, trainable_report
    from shpeft_monai.networks import create_network

    device = torch.device(cfg.device)
    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed)
    t_run = time.perf_counter()
    size = cfg.cnn_img_size if spec.network == CNN else cfg.img_size
    kwargs = {"img_size": size} if spec.network == VIT else {}
    model = create_network(spec.network, num_classes=len(CLASS_NAMES), **kwargs).to(device)
    shpeft = {**(spec.shpeft or shpeft_settings(cfg, {})), "seed": spec.seed}
    scfg = SHPEFTConfig.from_dict(shpeft)
    head = head_parameters(model, scfg)
    head_numel = sum(p.numel() for p in head.values())
    backbone_numel = sum(p.numel() for p in model.parameters()) - head_numel
    gen = torch.Generator().manual_seed(10_000 + spec.seed)
    n_calib = max(scfg.calibration_batches, cfg.head_warmup)
    calib: list = []
    while len(calib) < n_calib:  # cycle over reshuffled passes when the subset is small
        calib += _batches(data["train"], cfg.batch_size, gen, True)
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
    selection_s = time.perf_counter() - t0
    params = trainable_parameters(model)
    n_trainable = sum(p.numel() for p in params)
    if spec.method == "shpeft":
        rep = trainable_report(model)
        selected, head_n = rep["selected_backbone_weights"], rep["head_parameters"]
        eligible = int(get_mask(model).meta["eligible_weights"])
    else:
        head_n = head_numel
        selected = n_trainable - head_numel
        eligible = None
    lr = spec.lr
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    mem = _memory_probe(device)
    step_times: list[float] = []
    peak = None
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    train_gen = torch.Generator().manual_seed(spec.seed)
    for epoch in range(cfg.epochs):
        model.train()
        losses = []
        batches = _batches(data["train"], cfg.batch_size, train_gen, True)
        if epoch == 0 and mem is not None:
            mem.reset()
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - t0)
            losses.append(loss.item())
        if epoch == 0 and mem is not None:
            peak = mem.peak()
        val = _metrics(data["validation"], _predict(model, data["validation"], cfg, device))
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
        if best is None or _val_key(val) > _val_key(best["val"]):  # strict: ties keep the earlier epoch
            best = {
                "epoch": epoch,
                "val": val,
                "state": trainable_state(model),  # what training changed (BatchNorm statistics too)
            }
    assert best is not None
    restore_trainable_state(model, best["state"])
    test = _metrics(data["test"], _predict(model, data["test"], cfg, device))  # once, at the chosen epoch
    timed = step_times[1:] if len(step_times) > 1 else step_times
    return {
        "key": spec.key,
        "label": spec.label,
        "group": spec.group,
        "network": spec.network,
        "method": spec.method,
        "shpeft": shpeft if spec.method == "shpeft" else None,
        "shpeft_eligible": eligible,
        "head_warmup": bool(spec.warmup and cfg.head_warmup),
        "seed": spec.seed,
        "lr": lr,
        "chosen_epoch": best["epoch"],
        "selection_rule": "max validation (roc_auc, accuracy), earliest epoch on ties",
        "val": best["val"],
        "test": test,
        "history": history,
        "trainable_total": int(n_trainable),
        "selected_backbone_weights": int(selected),
        "head_parameters": int(head_n),
        "backbone_parameters": int(backbone_numel),
        "share_of_backbone": selected / max(backbone_numel, 1),
        "step_time_s": float(np.median(timed)) if timed else None,
        "peak_memory_bytes": peak,
        "memory_measure": getattr(mem, "how", None),
        "head_warmup_s": warmup_s,
        "selection_s": selection_s,
        "artefact_bytes": _artefact_bytes(model, spec.method),
        "run_s": time.perf_counter() - t_run,
    }


# ----------------------------------------------------------------------------------------------
# summary, tables, plots


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and x == x], dtype=float)
    if v.size == 0:
        return (float("nan"), float("nan"))
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (group, label): mean and std over seeds; cost ratios to full fine-tuning."""
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        rows.setdefault((r["group"], r["label"]), []).append(r)
    full: dict[str, dict[str, float]] = {}
    for r in results:
        if r["method"] == "full" and r["group"] == "methods":
            f = full.setdefault(r["network"], {"t": [], "m": []})
            f["t"].append(r["step_time_s"])
            f["m"].append(r["peak_memory_bytes"])
    ref = {n: (_mean_std(v["t"])[0], _mean_std(v["m"])[0]) for n, v in full.items()}
    out = []
    for (group, label), rs in rows.items():
        r0 = rs[0]
        row: dict[str, Any] = {
            "group": group,
            "label": label,
            "network": r0["network"],
            "method": r0["method"],
            "seeds": sorted(r["seed"] for r in rs),
        }
        for split in ("val", "test"):
            for m in ("accuracy", "f1_macro", "roc_auc"):
                row[f"{split}_{m}"] = _mean_std([r[split][m] for r in rs])
        for k in ("selected_backbone_weights", "head_parameters", "share_of_backbone", "artefact_bytes"):
            row[k] = r0[k]
        for k in ("step_time_s", "peak_memory_bytes", "selection_s", "head_warmup_s"):
            row[k] = _mean_std([r[k] for r in rs])[0]
        t_ref, m_ref = ref.get(r0["network"], (float("nan"), float("nan")))
        row["time_vs_full"] = row["step_time_s"] / t_ref if t_ref and t_ref == t_ref else None
        row["memory_vs_full"] = (
            row["peak_memory_bytes"] / m_ref
            if m_ref and m_ref == m_ref and row["peak_memory_bytes"]
            else None
        )
        row["chosen_epochs"] = [r["chosen_epoch"] for r in rs]
        row["lr"] = r0["lr"]
        out.append(row)
    return out


def winners(summary: list[dict[str, Any]]) -> dict[str, Any]:
    """Best SH-PEFT setting per ablation and among the methods, by mean VALIDATION AUC then accuracy."""
    out: dict[str, Any] = {}
    for group in sorted({r["group"] for r in summary} - {"lr_search"}):
        rows = [r for r in summary if r["group"] == group and r["method"] == "shpeft" and r["network"] == VIT]
        if not rows:
            continue
        best = max(rows, key=lambda r: (r["val_roc_auc"][0], r["val_accuracy"][0]))
        out[group] = {
            "label": best["label"],
            "val_roc_auc": best["val_roc_auc"][0],
            "val_accuracy": best["val_accuracy"][0],
        }
    return out


def _fmt(ms: tuple[float, float], pct: bool = True) -> str:
    m, s = ms
    if m != m:
        return "-"
    return f"{100 * m:.1f} ± {100 * s:.1f}" if pct else f"{m:.3f} ± {s:.3f}"


def _bytes(b: float | None) -> str:
    if not b:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return "-"


def _ratio(x: float | None) -> str:
    return f"{x:.2f}x" if x is not None and x == x else "-"


def render_markdown(report: dict[str, Any]) -> str:
    cfg, facts = report["config"], report["machine"]
    lines = [
        f"# Suite `{cfg['name']}`",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {facts['device_name']} ({facts['torch_threads']} torch threads, load average at start "
        f"{facts.get('loadavg')}), torch {facts['torch']}, timm {facts['timm']}, peft {facts['peft']}, "
        f"commit {str(facts.get('git_commit'))[:10]}  ",
        f"Data: Br35H committed grouped split; train subset {cfg['train_subset'] or 'all'}, "
        f"validation {cfg['val_subset'] or 'all'}, test {cfg['test_subset'] or 'all'} "
        f"(n test = {report.get('n_test')}); ViT {cfg['img_size']} px, CNN {cfg['cnn_img_size']} px; "
        f"{cfg['epochs']} epochs, batch {cfg['batch_size']}, seeds {cfg['seeds']} "
        f"(ablations: {cfg['ablation_seeds']}); budget {cfg['budget']:g} of eligible backbone weights; "
        f"AdamW, wd {cfg['weight_decay']:g}, learning rate per method chosen on validation (seed "
        f"{cfg['seeds'][0]}) from {', '.join(f'{x:g}' for x in cfg['lr_grid'])} (full fine-tuning: "
        f"{', '.join(f'{x:g}' for x in cfg['lr_grid_full'])}); head warm-up "
        f"{cfg['head_warmup']} steps for every method; calibration {cfg['calibration_batches']} batches.  ",
        "Model selection: best validation ROC-AUC (then accuracy) over epochs; test evaluated once at "
        "that epoch. Time/memory: median train-step time and peak memory of the first epoch's steps "
        f"({report.get('memory_measure')}), as ratios to full fine-tuning of the same network in this run.",
    ]
    if cfg.get("note"):
        lines += ["", f"**Note:** {cfg['note']}"]
    head = (
        "| method | network | test acc % | test F1 % | test AUC % | val AUC % | backbone weights | "
        "share | head | lr | step time vs full | memory vs full | selection s | artefact | epochs chosen |"
    )
    sep = "|" + "---|" * 15
    for group in ["methods"] + [g for g in ABLATIONS if any(r["group"] == g for r in report["summary"])]:
        rows = [r for r in report["summary"] if r["group"] == group]
        if not rows:
            continue
        lines += ["", f"## {group}", "", head, sep]
        for r in rows:
            net = "ViT-S/14" if r["network"] == VIT else "EffNet-Lite0"
            lines.append(
                f"| {r['label']} | {net} | {_fmt(r['test_accuracy'])} | {_fmt(r['test_f1_macro'])} | "
                f"{_fmt(r['test_roc_auc'])} | {_fmt(r['val_roc_auc'])} | {r['selected_backbone_weights']:,} | "
                f"{100 * r['share_of_backbone']:.4f}% | {r['head_parameters']:,} | {r['lr']:g} | "
                f"{_ratio(r['time_vs_full'])} | "
                f"{_ratio(r['memory_vs_full'])} | {r['selection_s']:.1f} | {_bytes(r['artefact_bytes'])} | "
                f"{r['chosen_epochs']} |"
            )
    if report.get("lr_choice"):
        lines += ["", "## Learning rate chosen on validation", ""]
        lines += ["| method | val AUC % (val acc %) at each lr | chosen |", "|---|---|---|"]
        for name, c in report["lr_choice"].items():
            grid = ", ".join(
                f"{lr}: {100 * v['val_roc_auc']:.1f} ({100 * v['val_accuracy']:.1f})"
                for lr, v in c["grid"].items()
            )
            chosen = f"{c['chosen']:g}" if c["chosen"] is not None else "pending"
            lines.append(f"| {name} | {grid} | {chosen} |")
    if report.get("winners"):
        lines += ["", "## SH-PEFT settings that won on validation (not test)", ""]
        for g, w in report["winners"].items():
            lines.append(
                f"- {g}: **{w['label']}** (val AUC {100 * w['val_roc_auc']:.1f}%, "
                f"val acc {100 * w['val_accuracy']:.1f}%)"
            )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    summary = report["summary"]
    title = f"{report['machine']['device_name'][:40]}, torch {report['machine']['torch']}"
    rows = [r for r in summary if r["group"] == "methods"]
    if rows:
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows)), 4))
        xs = np.arange(len(rows))
        for j, (m, name) in enumerate((("test_accuracy", "accuracy"), ("test_f1_macro", "macro F1"))):
            ax.bar(
                xs + (j - 0.5) * 0.38,
                [100 * r[m][0] for r in rows],
                0.38,
                yerr=[100 * r[m][1] for r in rows],
                capsize=3,
                label=f"test {name}",
            )
        ax.set_xticks(xs, [r["label"] for r in rows], rotation=40, ha="right")
        lo = min(100 * min(r["test_accuracy"][0], r["test_f1_macro"][0]) for r in rows)
        ax.set_ylim(max(0, lo - 10), 100)
        ax.set_ylabel("%")
        ax.set_title(
            f"suite {report['config']['name']}: test metrics (mean ± std over seeds)\n{title}", fontsize=9
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(stem.with_name(stem.name + "_methods.png"))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    for group, xlabel, logx in (
        ("budget", "budget (fraction of eligible weights)", True),
        ("rho", "hybrid ratio: task-specific share (rho for union, lam for weighted)", False),
    ):
        pts = [r for r in summary if r["group"] == group]
        if not pts:
            continue
        xv = [float(r["label"].split("=")[1]) for r in pts]
        order = np.argsort(xv)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for m, name in (
            ("val_roc_auc", "val AUC"),
            ("val_accuracy", "val acc"),
            ("test_accuracy", "test acc"),
        ):
            ax.errorbar(
                [xv[i] for i in order],
                [100 * pts[i][m][0] for i in order],
                yerr=[100 * pts[i][m][1] for i in order],
                marker="o",
                capsize=3,
                label=name,
            )
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("%")
        ax.set_title(f"SH-PEFT: {group} sweep\n{title}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(stem.with_name(stem.name + f"_{group}.png"))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def machine_facts(cfg: SuiteConfig) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        from benchmarks.step_cost import StepOptions
        from benchmarks.step_cost import machine_facts as mf

        facts = mf(StepOptions(device=cfg.device, threads=cfg.threads))
    facts.setdefault("platform", platform.platform())
    facts.setdefault("torch", torch.__version__)
    facts.setdefault("timm", None)
    facts.setdefault("peft", None)
    facts.setdefault("device_name", platform.processor() or platform.machine())
    facts.setdefault("torch_threads", torch.get_num_threads())
    facts.setdefault("git_commit", None)
    if cfg.device.startswith("cuda") and torch.cuda.is_available():
        facts["device_name"] = torch.cuda.get_device_name(0)
    with contextlib.suppress(OSError):
        facts["loadavg"] = [round(x, 1) for x in os.getloadavg()]
    return facts


# ----------------------------------------------------------------------------------------------
# driver


def run_suite(
    cfg: SuiteConfig,
    out_dir: Path | None = RESULTS_DIR,
    *,
    command: str = "",
    resume: bool = True,
) -> dict[str, Any]:
    """Run every planned run of ``cfg`` (skipping ones already in the JSON), write and return the report."""
    if cfg.device == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    json_path = out_dir / f"suite_{cfg.name}.json" if out_dir is not None else None
    results: list[dict[str, Any]] = []  # unique runs, in the order they finished
    if resume and json_path is not None and json_path.is_file():
        old = json.loads(json_path.read_text())
        if _run_settings(old.get("config", {})) == _run_settings(_cfg_dict(cfg)):
            results = old.get("runs", [])
            logger.info("resuming: %d finished runs in %s", len(results), json_path)
        else:
            logger.info("%s was made with other data or training settings: starting over", json_path)
    report: dict[str, Any] = {
        "config": _cfg_dict(cfg),
        "command": command,
        "machine": machine_facts(cfg),
        "runs": results,
    }
    by_key = {r["key"]: r for r in results}
    data_by_net: dict[str, dict[str, Split]] = {}
    t_suite = time.perf_counter()
    while True:
        plan = plan_runs(cfg, by_key)  # grows as learning rates get chosen on validation
        todo = [s for s in plan if s.key not in by_key]
        if not todo:
            break
        spec = todo[0]
        if spec.network not in data_by_net:
            data_by_net[spec.network] = load_data(cfg, spec.network)
        n_done = len({s.key for s in plan} & set(by_key))
        tag = f"[{n_done + 1}/{len({s.key for s in plan})}+]"
        logger.info("%s %s / %s lr %g seed %d", tag, spec.group, spec.label, spec.lr, spec.seed)
        r = run_one(spec, cfg, data_by_net[spec.network])
        logger.info(
            "%s %s lr %g seed %d: chosen epoch %d, val auc %.4f, test acc %.4f f1 %.4f auc %.4f (%.0fs)",
            tag,
            spec.label,
            spec.lr,
            spec.seed,
            r["chosen_epoch"],
            r["val"]["roc_auc"],
            r["test"]["accuracy"],
            r["test"]["f1_macro"],
            r["test"]["roc_auc"],
            r["run_s"],
        )
        by_key[spec.key] = r
        results.append(r)
        _finish(report, plan, json_path, time.perf_counter() - t_suite)
    _finish(report, plan, json_path, time.perf_counter() - t_suite, plots=True)
    return report


def table_rows(results: list[dict[str, Any]], plan: list[RunSpec]) -> list[dict[str, Any]]:
    """Each planned run's result under the row (group, label) it fills; a run may fill several."""
    by_key = {r["key"]: r for r in results}
    out = []
    for s in plan:
        if s.key in by_key:
            label = f"{s.label} @ lr={s.lr:g}" if s.group == "lr_search" else s.label
            out.append({**by_key[s.key], "group": s.group, "label": label})
    return out


def lr_choices(results: list[dict[str, Any]], plan: list[RunSpec]) -> dict[str, Any]:
    """Per method: validation score at each grid learning rate (seed 0) and the one chosen."""
    by_key = {r["key"]: r for r in results}
    out: dict[str, Any] = {}
    for s in plan:
        if s.group == "lr_search" and s.key in by_key:
            v = by_key[s.key]["val"]
            out.setdefault(s.label, {"grid": {}, "chosen": None})["grid"][f"{s.lr:g}"] = {
                "val_roc_auc": v["roc_auc"],
                "val_accuracy": v["accuracy"],
            }
        elif s.group == "methods" and s.label in out:
            out[s.label]["chosen"] = s.lr
    return out


def _cfg_dict(cfg: SuiteConfig) -> dict[str, Any]:
    d = asdict(cfg)
    for k in ("seeds", "ablation_seeds", "methods", "ablations", "lr_grid", "lr_grid_full"):
        d[k] = list(d[k])
    return d


# what only plans runs: changing these keeps the finished runs (each is keyed by its own settings)
PLANNING_FIELDS = ("methods", "ablations", "seeds", "ablation_seeds", "lr_grid", "lr_grid_full", "note")


def _run_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The configuration fields that change what a finished run measured."""
    return {k: v for k, v in cfg.items() if k not in PLANNING_FIELDS}


def _finish(
    report: dict[str, Any], plan: list[RunSpec], json_path: Path | None, seconds: float, plots: bool = False
) -> None:
    report["summary"] = summarize(table_rows(report["runs"], plan))
    report["lr_choice"] = lr_choices(report["runs"], plan)
    report["winners"] = winners(report["summary"])
    report["wall_s_this_invocation"] = seconds
    report["n_test"] = report["runs"][0]["test"]["n"] if report["runs"] else None
    report["memory_measure"] = next(
        (r["memory_measure"] for r in report["runs"] if r["memory_measure"]), None
    )
    if json_path is None:
        return
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=float))
    os.replace(tmp, json_path)
    json_path.with_suffix(".md").write_text(render_markdown(report))
    if plots and report["runs"]:
        report["plots"] = [p.name for p in plot(report, json_path.with_suffix(""))]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="cpu", choices=sorted(CONFIGS))
    p.add_argument("--device", default=None, help="cpu | cuda (default: the configuration's)")
    p.add_argument("--methods", default=None, help=f"comma list (or 'none') of {', '.join(DEFAULT_METHODS)}")
    p.add_argument("--ablations", default=None, help=f"comma list (or 'none') of {', '.join(ABLATIONS)}")
    p.add_argument("--seeds", default=None, help="e.g. 0,1,2")
    p.add_argument("--ablation-seeds", default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--name", default=None, help="results name (default: the configuration's)")
    p.add_argument("--note", default=None, help="text for the table header (what was reduced)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--fresh", action="store_true", help="ignore finished runs in an existing JSON")
    return p.parse_args(argv)


def _csv(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return () if text.strip().lower() == "none" else tuple(t.strip() for t in text.split(",") if t.strip())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    for noisy in ("shpeft_monai", "timm", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = _parse(argv)
    cfg = CONFIGS[args.config]
    changes: dict[str, Any] = {}
    if args.device:
        changes["device"] = args.device
    if (m := _csv(args.methods)) is not None:
        changes["methods"] = m
    if (a := _csv(args.ablations)) is not None:
        changes["ablations"] = a
    if args.seeds:
        changes["seeds"] = tuple(int(s) for s in _csv(args.seeds) or ())
    if args.ablation_seeds:
        changes["ablation_seeds"] = tuple(int(s) for s in _csv(args.ablation_seeds) or ())
    for k in ("epochs", "train_subset", "img_size", "name", "note"):
        if getattr(args, k) is not None:
            changes[k] = getattr(args, k)
    cfg = replace(cfg, **changes)
    for m in cfg.methods:
        _method_spec(m)
    for a in cfg.ablations:
        _ablation_specs(a, cfg)
    command = "python -m benchmarks.suite " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    report = run_suite(cfg, args.out, command=command.strip(), resume=not args.fresh)
    print(render_markdown(report))
    print("SH-PEFT settings that won on VALIDATION (use these for the bundle defaults):")
    for g, w in report["winners"].items():
        print(f"  {g}: {w['label']} (val AUC {w['val_roc_auc']:.4f}, val acc {w['val_accuracy']:.4f})")
    return report


if __name__ == "__main__":
    main()
