"""Selection cost: time and peak memory of each task-specific estimator, beside the training it enables.

For each model (``benchmarks.step_cost`` models: ViT-S/14 with its real weights, ViT-B/16 random
init) and each estimator, one selection at the default recipe (weighted hybrid, ``recipe.DEFAULTS.lam``,
rank normalisation, global threshold, budget 1e-4) on one calibration batch of random images
(``head_warmup_steps=0``: the warm-up trains the head only and is not part of the estimator):

* ``gradient_reference``: ``select_mask(..., streaming=False)``, every gradient kept until backward
  ends, every score materialised, concatenated and sorted (the path before streaming);
* ``gradient_streaming``: the default: gradients reduced by hooks and freed at once, timm blocks
  recomputed in backward (checkpointing), one score tensor at a time, exact global ranks without
  concatenation;
* ``gradient_plain``: streaming without checkpointing (every block's activations kept);
* ``gradient_micro`` (not run by default): streaming with the batch run in micro-batches of
  ``--micro-batch`` samples (the same estimator; float rounding of the summed gradient can move
  near-ties);
* ``activation``: the forward-only estimator (``task_signal="activation"``, FPS-style).

Each selection runs in a fresh spawned process; peak memory is measured as ``benchmarks.step_cost``
measures it (:class:`benchmarks.common.MemoryProbe`: growth above a baseline taken after the model
and batch exist). With ``--training`` the same run also measures SH-PEFT's and full fine-tuning's
training-step peaks through ``benchmarks.step_cost.measure_method``, for the issue's targets:
selection peak <= SH-PEFT's training peak, forward-only peak <= 0.2x full fine-tuning's.

Run ``python -m benchmarks.selection_cost`` (writes ``benchmarks/results/selection_cost.{json,md}``).
Masks are compared with the reference (entries that differ); timings are wall-clock of one selection.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, MemoryProbe, fmt_ratio, machine_facts, write_json
from benchmarks.step_cost.measure import build_model, measure_method
from benchmarks.step_cost.options import MODELS, StepOptions
from benchmarks.step_cost.run import _in_subprocess

__all__ = ["ESTIMATORS", "main", "measure_selection"]

ESTIMATORS: tuple[str, ...] = (
    "gradient_reference",
    "gradient_streaming",
    "gradient_plain",
    "gradient_micro",
    "activation",
)
DEFAULT_ESTIMATORS = ("gradient_reference", "gradient_streaming", "gradient_plain", "activation")
TARGET_ACTIVATION_VS_FULL = 0.2
MiB = 2**20


def measure_selection(
    spec: dict[str, Any], estimator: str, opts: StepOptions, micro_batch: int
) -> dict[str, Any]:
    """One selection with ``estimator`` on a fresh model: seconds, peak bytes and the mask."""
    from shpeft_monai import SHPEFTConfig, select_mask

    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not one of {ESTIMATORS}.")
    device = torch.device(opts.device)
    if device.type == "cpu" and opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    mem = MemoryProbe(device)
    model, weights = build_model(spec, opts.num_classes, opts.img_size)
    model = model.to(device)
    gen = torch.Generator().manual_seed(opts.seed)
    x = torch.randn(opts.batch_size, 3, opts.img_size, opts.img_size, generator=gen).to(device)
    y = torch.randint(0, opts.num_classes, (opts.batch_size,), generator=gen).to(device)
    signal = "activation" if estimator == "activation" else "gradient"
    cfg = SHPEFTConfig(
        budget=opts.budget,
        calibration_batches=opts.calibration_batches,
        head_warmup_steps=0,
        task_signal=signal,
    )
    kwargs: dict[str, Any] = {"streaming": estimator != "gradient_reference"}
    if estimator == "gradient_micro":
        kwargs["micro_batch"] = micro_batch
    if estimator == "gradient_plain":
        kwargs["checkpointing"] = False
    mem.reset()
    t0 = time.perf_counter()
    mask = select_mask(model, cfg, [(x, y)], device=device, progress=False, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {
        "model": spec.get("key", spec["name"]),
        "estimator": estimator,
        "weights": weights,
        "selection_s": seconds,
        "peak_bytes": int(mem.peak()),
        "memory_method": mem.how,
        "k": int(mask.k),
        "eligible_weights": int(mask.meta["eligible_weights"]),
        "config": {
            "hybrid": cfg.hybrid,
            "lam": cfg.lam,
            "normalize": cfg.normalize,
            "threshold": cfg.threshold,
            "task_signal": signal,
            **({"micro_batch": micro_batch} if "micro_batch" in kwargs else {}),
        },
        "_mask": {n: i.cpu() for n, i in mask.indices.items()},
    }


def _differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> int:
    """Entries of ``a`` not in ``b`` (for two masks of one budget, as many as the other way round)."""
    out = 0
    for n in set(a) | set(b):
        x = a.get(n, torch.zeros(0, dtype=torch.int64))
        y = b.get(n, torch.zeros(0, dtype=torch.int64))
        out += int((~torch.isin(x, y)).sum())
    return out


def run(
    models: dict[str, dict[str, Any]],
    estimators: Sequence[str],
    opts: StepOptions,
    *,
    micro_batch: int,
    training: bool,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for key, spec in models.items():
        spec = dict(spec, key=key)
        ref_mask = None
        train: dict[str, int] = {}
        if training:
            for method in ("shpeft", "full"):
                print(f"[{key}] training step: {method} ...", flush=True)
                r = _in_subprocess(
                    measure_method, spec, method, replace(opts, steps=1, warmup=0, count_flops=False)
                )
                train[method] = int(r["peak_bytes"])
        for est in estimators:
            print(f"[{key}] selection: {est} ...", flush=True)
            try:
                res = _in_subprocess(measure_selection, spec, est, opts, micro_batch)
            except Exception as err:  # keep the other numbers
                rows.append({"model": key, "estimator": est, "error": repr(err)})
                continue
            mask = res.pop("_mask")
            if est == "gradient_reference":
                ref_mask = mask
            res["differs_from_reference"] = None if ref_mask is None else _differing(mask, ref_mask)
            if train:
                res["shpeft_train_peak_bytes"] = train["shpeft"]
                res["full_train_peak_bytes"] = train["full"]
                res["vs_shpeft_train"] = res["peak_bytes"] / train["shpeft"]
                res["vs_full_train"] = res["peak_bytes"] / train["full"]
            rows.append(res)
            print(
                f"[{key}] {est}: {res['selection_s']:.1f}s, peak +{res['peak_bytes'] / MiB:.0f} MiB",
                flush=True,
            )
    return rows


def render(rows: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "| model | estimator | selection s | peak MiB | vs SH-PEFT training peak | vs full FT training peak "
        "| entries differing from reference |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['estimator']} | failed: {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['estimator']} | {r['selection_s']:.1f} | {r['peak_bytes'] / MiB:.0f} | "
            f"{fmt_ratio(r.get('vs_shpeft_train'))} | {fmt_ratio(r.get('vs_full_train'))} | "
            f"{'-' if r['differs_from_reference'] is None else r['differs_from_reference']} |"
        )
    lines.append("")
    for r in rows:
        if r.get("vs_shpeft_train") is None:
            continue
        ok = r["vs_shpeft_train"] <= 1.0
        line = f"- {r['model']} {r['estimator']}: selection peak <= SH-PEFT training peak: {'met' if ok else 'NOT met'}"
        if r["estimator"] == "activation":
            ok2 = r["vs_full_train"] <= TARGET_ACTIVATION_VS_FULL
            line += f"; <= {TARGET_ACTIVATION_VS_FULL}x full fine-tuning's training peak: {'met' if ok2 else 'NOT met'}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.selection_cost", description=__doc__.splitlines()[0]
    )
    p.add_argument("--models", default="vit_s14,vit_b16", help=f"comma list of {sorted(MODELS)}")
    p.add_argument("--estimators", default=",".join(DEFAULT_ESTIMATORS), help=f"comma list of {ESTIMATORS}")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--micro-batch", type=int, default=2, help="samples per slice for gradient_micro")
    p.add_argument(
        "--training",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure SH-PEFT's and full fine-tuning's training-step peaks",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "selection_cost.json")
    args = p.parse_args(argv)
    keys = [k for k in args.models.split(",") if k]
    ests = [e for e in args.estimators.split(",") if e]
    bad = [k for k in keys if k not in MODELS] + [e for e in ests if e not in ESTIMATORS]
    if bad:
        raise SystemExit(f"unknown models/estimators {bad}; models {sorted(MODELS)}, estimators {ESTIMATORS}")
    opts = StepOptions(
        device=args.device,
        batch_size=args.batch_size,
        img_size=args.img_size,
        threads=args.threads if args.device == "cpu" else None,
        calibration_batches=1,
    )
    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    rows = run({k: MODELS[k] for k in keys}, ests, opts, micro_batch=args.micro_batch, training=args.training)
    facts = machine_facts(args.device, opts.threads)
    header = (
        f"# Selection cost (benchmarks/selection_cost.py)\n\n{facts.get('cpu_model', args.device)}, {opts.threads} threads; "
        f"batch {opts.batch_size}, {opts.img_size} px, one calibration batch, default recipe (weighted, lam {rows[0]['config']['lam'] if rows else '-'}, "
        f"rank, global), budget {opts.budget}; load average at start {load} (1/5/15 min; timings are "
        "evidence only when it is near or below the thread count). Peak: growth above a baseline taken "
        "after model and batch exist (benchmarks.common.MemoryProbe), each selection in a fresh process."
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(
        args.out,
        {
            "machine": facts,
            "options": vars(args) | {"out": str(args.out.name)},
            "wall_s": time.perf_counter() - t0,
            "rows": rows,
        },
    )
    args.out.with_suffix(".md").write_text(render(rows, header))
    print(render(rows, header))
    return rows


if __name__ == "__main__":
    main()
