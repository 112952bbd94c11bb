"""Ratios to full fine-tuning, SH-PEFT's cost targets, the tables and the JSON report."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from benchmarks.common import fmt_ratio, machine_facts

from .options import StepOptions

__all__ = ["make_report", "render_markdown", "render_table", "summarize"]


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
            r["saved_vs_full"] = _ratio(
                r.get("saved_for_backward_bytes"), full.get("saved_for_backward_bytes")
            )
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
        for peer in ("lora", "gps", "floor"):
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
    "saved for bwd MiB",
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
                fmt_ratio(r.get("time_vs_full")),
                fmt_ratio(r.get("cpu_time_vs_full")),
                "-"
                if r.get("step_flops_per_sample") is None
                else f"{r['step_flops_per_sample'] / 1e9:.4g} ({fmt_ratio(r.get('flops_vs_full'))})",
                phases,
                _mib(r["peak_bytes"]),
                fmt_ratio(r.get("peak_vs_full")),
                _mib(r.get("saved_for_backward_bytes")),
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
                f"SH-PEFT targets: time {fmt_ratio(t['time_vs_full'])} of full (target <= 0.70x: "
                f"{'met' if t['time_vs_full_met'] else 'missed'}; process CPU time "
                f"{fmt_ratio(t.get('cpu_time_vs_full'))}), {fmt_ratio(t.get('time_vs_lora'))} of LoRA "
                f"(CPU time {fmt_ratio(t.get('cpu_time_vs_lora'))}) "
                f"({'below' if t['time_below_lora'] else 'not below'}); "
                f"{fmt_ratio(t.get('time_vs_floor'))} of the input-gradient floor (CPU time "
                f"{fmt_ratio(t.get('cpu_time_vs_floor'))}, peak {fmt_ratio(t.get('peak_vs_floor'))}); "
                f"peak memory {fmt_ratio(t.get('peak_vs_gps'))} "
                f"of GPS masking, below full: {t['peak_below_full']}, below GPS: {t['peak_below_gps']}; "
                f"optimizer state {t['optimizer_state_bytes_per_trainable']:.1f} bytes per trainable value "
                f"(O(k): {t['optimizer_state_is_O_k']}).",
            ]
        lines.append("")
    return "\n".join(lines)


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
        "machine": {**machine_facts(opts.device, opts.threads), "load_average_at_start": load_at_start},
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
