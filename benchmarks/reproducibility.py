"""Does a seed give the same model on another machine? The bundle's SH-PEFT trained for a few
iterations under several CPU kernel settings, the saved deltas compared byte for byte.

Variants: this machine's kernels twice (a run repeats itself exactly), plain kernels
(``ATEN_CPU_CAPABILITY=default``: no AVX2/AVX-512, as on another CPU) and one intra-op thread
(``OMP_NUM_THREADS=1``). Each is ``python -m monai.bundle run training`` with the bundle's configs,
``--seed``, one epoch cut to ``--iterations`` steps; the delta is saved after that epoch's
validation. The report says, per variant, which kernels and threads the run recorded, whether the
base weights (the mask's base fingerprint), the mask and the trained values are identical to the
first run's, and the largest difference in the trained values.

    python -m benchmarks.reproducibility run      # about 2 min per variant on 2 cores
    python -m benchmarks.reproducibility report   # -> benchmarks/results/reproducibility.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, run_bundle
from shpeft_monai.cli import BUNDLE
from shpeft_monai.io import BEST_DELTA_FILE, HISTORY_FILE, load_delta, write_json

VARIANTS: dict[str, dict[str, str]] = {  # folder name -> environment variables of the run
    "machine": {},
    "machine_again": {},
    "plain_kernels": {"ATEN_CPU_CAPABILITY": "default"},
    "one_thread": {"OMP_NUM_THREADS": "1"},
}


def run(out_root: Path, base: str, seed: int, iterations: int) -> None:
    """Train every variant not yet finished (its delta exists) into ``out_root/<variant>``."""
    out_root.mkdir(parents=True, exist_ok=True)
    configs = [BUNDLE / "train.yaml", BUNDLE / "overlays" / base]
    extra = ["--seed", str(seed), "--max_epochs", "1", "--train#trainer#epoch_length", str(iterations)]
    for name, env in VARIANTS.items():
        out = out_root / name
        if (out / BEST_DELTA_FILE).is_file():
            continue
        run_bundle("training", configs, out, extra, env={**os.environ, **env})
        print(f"{name}: done", flush=True)


def compare(out_root: Path) -> dict[str, Any]:
    """Per variant: the recorded kernels and threads, and what is identical to the first variant's run."""
    rows: dict[str, dict[str, Any]] = {}
    reference, cpu = None, None
    for name in VARIANTS:
        path = out_root / name / BEST_DELTA_FILE
        if not path.is_file():
            continue
        delta = load_delta(path)
        values = torch.cat([delta.values[n] for n in sorted(delta.values)])
        head = torch.cat([delta.head[n].flatten() for n in sorted(delta.head)])
        history = json.loads((out_root / name / HISTORY_FILE).read_text())
        env = delta.meta.get("environment") or {}
        if reference is None:
            reference, cpu = (delta, values, head), env.get("cpu")
        ref_delta, ref_values, ref_head = reference
        same_mask = delta.mask.indices.keys() == ref_delta.mask.indices.keys() and all(
            torch.equal(i, ref_delta.mask.indices[n]) for n, i in delta.mask.indices.items()
        )  # the selected positions (the mask's fingerprint also covers the base weights)
        rows[name] = {
            "cpu_capability": env.get("cpu_capability"),
            "threads": env.get("threads"),
            "same_base_weights": delta.mask.base_fingerprint == ref_delta.mask.base_fingerprint,
            "same_mask": same_mask,
            "same_values": same_mask and torch.equal(values, ref_values) and torch.equal(head, ref_head),
            "max_abs_diff_values": float((values - ref_values).abs().max()) if same_mask else None,
            "max_abs_diff_head": float((head - ref_head).abs().max()),
            "train_loss": history[0].get("train_loss") if history else None,
        }
    if not rows:
        raise ValueError(f"{out_root}: no finished variant ({BEST_DELTA_FILE})")
    largest = float(reference[1].abs().max())  # the first run's largest trained change: the scale of a diff
    return {"cpu": cpu, "largest_value": largest, "variants": rows}


def render(result: dict[str, Any], command: str) -> str:
    lines = [
        "# Reproducibility across CPU kernels",
        "",
        f"Command: `{command}`. Machine: {result['cpu']}. Each row is the bundle's SH-PEFT with the same "
        "seed, compared with the first row's run; the first run's largest trained change (delta value) "
        f"is {result['largest_value']:.2e}.",
        "",
        "| run | kernels | threads | base weights | selected positions | trained values | max abs diff (values / head) | train loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    same = {True: "identical", False: "differ"}
    for name, r in result["variants"].items():
        diff = "–" if r["max_abs_diff_values"] is None else f"{r['max_abs_diff_values']:.2e}"
        lines.append(
            f"| {name} | {r['cpu_capability']} | {r['threads']} | {same[r['same_base_weights']]} | "
            f"{same[r['same_mask']]} | {same[r['same_values']]} | {diff} / {r['max_abs_diff_head']:.2e} | "
            f"{r['train_loss']!r} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("run", "report"))
    ap.add_argument("--out", type=Path, default=Path("runs/reproducibility"))
    ap.add_argument("--base", default="cpu_demo.yaml", help="the bundle overlay the runs use")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iterations", type=int, default=20, help="training steps of the one epoch")
    ap.add_argument("--results", type=Path, default=RESULTS_DIR / "reproducibility")
    args = ap.parse_args(argv)
    if args.action == "run":
        run(args.out, args.base, args.seed, args.iterations)
        return 0
    result = compare(args.out)
    command = "python -m benchmarks.reproducibility run && python -m benchmarks.reproducibility report"
    write_json(args.results.with_suffix(".json"), result)
    args.results.with_suffix(".md").write_text(render(result, command))
    print(render(result, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
