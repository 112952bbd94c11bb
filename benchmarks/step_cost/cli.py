"""Command line of the step-cost benchmark: ``python -m benchmarks.step_cost``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, fmt_ratio

from .options import METHODS, MODELS, StepOptions
from .report import make_report, render_markdown, render_table
from .run import run_benchmark

__all__ = ["default_out", "main"]

DESCRIPTION = "Train-step cost of SH-PEFT beside its peers, measured side by side in one run."


def _gpu_slug(name: str) -> str:
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]?)\b", name)
    return (m.group(1) if m else re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")).lower()


def default_out(device: str) -> Path:
    if device == "cuda":
        return RESULTS_DIR / f"step_cost_{_gpu_slug(torch.cuda.get_device_name(0))}.json"
    return RESULTS_DIR / "step_cost.json"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_cost", description=DESCRIPTION)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default 8 on CPU, 64 on CUDA")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 3 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 1 on CPU, 5 on CUDA)")
    p.add_argument("--models", default="vit_b16,vit_s14", help=f"comma list of {sorted(MODELS)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU (default 2)")
    p.add_argument(
        "--autocast",
        "--amp",
        dest="amp",
        choices=("none", "bf16"),
        default="none",
        help="run forward passes under torch.autocast in this dtype (the sparse layers support bf16)",
    )
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
            f"[{model}] SH-PEFT time {fmt_ratio(t['time_vs_full'])} of full (<=0.70x: {t['time_vs_full_met']}), "
            f"{fmt_ratio(t.get('time_vs_lora'))} of LoRA, {fmt_ratio(t.get('time_vs_floor'))} of the "
            f"input-gradient floor; peak {fmt_ratio(t.get('peak_vs_gps'))} of GPS; "
            f"below full: {t['peak_below_full']}"
        )
    print(f"wrote {out} and {out.with_suffix('.md')} in {time.perf_counter() - t0:.0f}s")
    return report


if __name__ == "__main__":
    main()
