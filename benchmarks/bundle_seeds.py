"""Seeds through the product path: the MONAI bundle trained and evaluated per method and seed, then
per-seed figures, grouped bootstrap intervals and paired differences (SH-PEFT minus each peer).

Every run is exactly what a user runs: ``python -m monai.bundle run training`` with the bundle's
configs (``cpu_demo`` by default) plus the method's overlay and ``--seed``, then ``run evaluating``
with ``--output_dir`` alone. The test split is scored once per run; the intervals resample the test
split's near-duplicate groups (Br35H: the committed ``group``; other data: byte-identical files),
never files (:mod:`benchmarks.stats`).

    python -m benchmarks.bundle_seeds run --seeds 0-4 --methods shpeft,full_finetune,random_mask,linear_probe
    python -m benchmarks.bundle_seeds run --seeds 0-2 --ablations rho,estimator,calibration_loss
    python -m benchmarks.bundle_seeds report       # -> benchmarks/results/bundle_seeds.{json,md}
    python -m benchmarks.bundle_seeds report --keep  # also the runs that report recorded earlier

Ablation points (``--ablations``, the points of :func:`benchmarks.suite.config.ablation_specs`) are
SH-PEFT runs with ``shpeft#...`` overrides, named by their label (``lam=0.25``); a point equal to the
bundle's own SH-PEFT settings is the ``shpeft`` run itself and is not trained twice.
A finished run (its ``eval/metrics.json`` exists) is skipped, so the command resumes after a stop.
The report records each run's per-file correctness, so ``report --keep`` pools runs made in separate
sittings (run folders are not kept) into one set of intervals.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import stats
from benchmarks.common import run_bundle
from shpeft_monai.cli import BUNDLE
from shpeft_monai.io import DATALIST_FILE, METRICS_FILE, PREDICTIONS_FILE, RUN_FILE, write_json

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE = "shpeft"
OVERLAYS = {  # method name -> overlay of the bundle (None: train.yaml's own SH-PEFT defaults)
    "shpeft": None,
    "full_finetune": "full_finetune.yaml",
    "linear_probe": "linear_probe.yaml",
    "bitfit": "bitfit.yaml",
    "lora": "lora.yaml",
    "random_mask": "random_mask.yaml",
    "task_agnostic": "task_agnostic.yaml",
    "task_specific": "task_specific.yaml",
    "gps_per_row": "gps_per_row.yaml",
}


def _seeds(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def ablation_points(names: list[str], base: str) -> dict[str, list[str]]:
    """Label -> bundle overrides (``--shpeft#lam 0.25``) of each ablation point that differs from
    the bundle's SH-PEFT at ``base``; the point equal to it is the ``shpeft`` run (left out)."""
    from monai.bundle import ConfigParser

    from benchmarks.suite.config import ablation_specs

    files = [BUNDLE / "train.yaml"] + ([BUNDLE / "overlays" / base] if base else [])
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.get_parsed_content("imports")  # train.yaml's imports (``recipe``) into the expressions' globals
    shpeft = parser.get_parsed_content("shpeft")
    points: dict[str, list[str]] = {}
    for name in names:
        hybrid = str(shpeft["hybrid"])
        for label, overrides, warm in ablation_specs(name, hybrid):
            changes = {**overrides, "head_warmup_steps": shpeft["head_warmup_steps"] if warm else 0}
            if all(shpeft.get(k) == v for k, v in changes.items()):
                continue
            points[label.replace(",", "+")] = [
                x for k, v in changes.items() for x in (f"--shpeft#{k}", str(v))
            ]
    return points


def run(
    out_root: Path,
    methods: list[str],
    seeds: list[int],
    base: str,
    extra: list[str],
    points: dict[str, list[str]] | None = None,
) -> None:
    """Train and evaluate every (method or ablation point, seed) not yet finished; seeds outer so
    means fill in evenly."""
    out_root.mkdir(parents=True, exist_ok=True)
    jobs = [(m, OVERLAYS[m], []) for m in methods] + [(n, None, o) for n, o in (points or {}).items()]
    for seed in seeds:
        for method, overlay, overrides in jobs:
            out = out_root / f"{method}_s{seed}"
            if (out / "eval" / METRICS_FILE).is_file():
                continue
            configs = [BUNDLE / "train.yaml"] + ([BUNDLE / "overlays" / base] if base else [])
            if overlay:
                configs.append(BUNDLE / "overlays" / overlay)
            t0 = time.perf_counter()
            run_bundle("training", configs, out, ["--seed", str(seed), *overrides, *extra])
            run_bundle("evaluating", [BUNDLE / "train.yaml", BUNDLE / "evaluate.yaml"], out, [])
            write_json(out / "wall.json", {"seconds": time.perf_counter() - t0})
            print(f"{method} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)


def _groups(out: Path, images: list[str]) -> list[Any]:
    """Near-duplicate group of each scored file: the datalist's ``group`` key, else its content hash."""
    records = {r["image"]: r for r in json.loads((out / DATALIST_FILE).read_text())["test"]}
    if all("group" in records.get(i, {}) for i in images):
        return [records[i]["group"] for i in images]
    from shpeft_monai.data.grouping import content_sha256

    return [content_sha256(i) for i in images]


def _validation(out: Path, best_epoch: int | None) -> dict[str, float | None]:
    """Validation AUC and balanced accuracy at the chosen epoch (what model selection saw): the
    artefact's epoch, or for methods whose artefact does not record it, the epoch with the best
    ``val_selection`` (the bundle's selection metric)."""
    path = out / "history.json"
    rows = [r for r in (json.loads(path.read_text()) if path.is_file() else []) if "val_selection" in r]
    if best_epoch is None and rows:
        best_epoch = max(rows, key=lambda r: r["val_selection"])["epoch"]
    row = next((r for r in rows if r.get("epoch") == best_epoch), {})
    return {"val_auc": row.get("val_auc"), "val_balanced_accuracy": row.get("val_balanced_accuracy")}


def collect(out_root: Path, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per method: seeds, per-seed metrics and the (seeds x files) correctness matrix on one test split.

    ``previous`` (an earlier report's JSON, ``report --keep``) adds the runs it recorded that
    ``out_root`` lacks, so seeds measured in separate sittings pool into one report; it is refused
    unless it scored the same test split of the same data with the same network and size."""
    found: dict[str, dict[int, Path]] = {}
    for d in sorted(out_root.iterdir()) if out_root.is_dir() else []:
        if d.is_dir() and (d / "eval" / METRICS_FILE).is_file():
            method, _, seed = d.name.rpartition("_s")
            found.setdefault(method, {})[int(seed)] = d
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    images_ref: list[str] | None = None
    groups: list[Any] = []
    for method, dirs in found.items():
        for seed, out in sorted(dirs.items()):
            preds = list(csv.DictReader((out / "eval" / PREDICTIONS_FILE).open()))
            images = [p["image"] for p in preds]
            if images_ref is None:
                images_ref, groups = images, _groups(out, images)
            if images != images_ref:
                raise ValueError(f"{out}: scored another test split than the other runs")
            m = json.loads((out / "eval" / METRICS_FILE).read_text())
            wall = (
                json.loads((out / "wall.json").read_text())["seconds"]
                if (out / "wall.json").is_file()
                else None
            )
            runs.setdefault(method, {})[seed] = {
                "seed": seed,
                **{k: m.get(k) for k in ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc")},
                **_validation(out, m.get("best_epoch")),
                "best_epoch": m.get("best_epoch"),
                "selection_seconds": m.get("selection_seconds"),
                "artefact_bytes": m.get("artefact_bytes"),
                "seconds": wall,
                "environment": m.get("trained_with"),  # float results depend on it
                "correct": "".join("1" if p["label"] == p["prediction"] else "0" for p in preds),
            }
    setting: dict[str, Any] = {}
    if found:
        first = next(iter(next(iter(found.values())).values()))
        run = json.loads((first / RUN_FILE).read_text())
        setting = {
            "data": run["data"],
            "network": run["network_name"],
            "img_size": run["img_size"],
            "train_images": len(json.loads((first / DATALIST_FILE).read_text())["train"]),
        }
    if previous is not None:
        groups, setting = _keep(previous, runs, groups, setting)
    if not runs:
        raise ValueError(f"{out_root}: no finished run (eval/{METRICS_FILE}) and no earlier report to keep")
    table = {
        method: {
            "seeds": sorted(by_seed),
            "runs": [by_seed[s] for s in sorted(by_seed)],
            "correct": np.array(
                [[c == "1" for c in by_seed[s]["correct"]] for s in sorted(by_seed)], dtype=float
            ),
        }
        for method, by_seed in runs.items()
    }
    return {"table": table, "groups": groups, **setting}


_SETTING = ("network", "img_size", "train_images")


def _keep(
    previous: dict[str, Any],
    runs: dict[str, dict[int, dict[str, Any]]],
    groups: list[Any],
    setting: dict[str, Any],
) -> tuple[list[Any], dict[str, Any]]:
    """Fold an earlier report's runs into ``runs`` (runs found on disk win); returns the groups and
    setting, refusing a report made on another test split or setting."""
    if "test_groups" not in previous:
        raise ValueError("the earlier report has no per-file results (made before 'report --keep' existed)")
    if setting:
        same = previous["test_groups"] == groups and all(previous[k] == setting[k] for k in _SETTING)
        same = same and previous["data"].get("sha256") == setting["data"].get("sha256")
        if not same:
            raise ValueError(
                "the earlier report scored another test split or setting "
                f"({', '.join(f'{k}={previous[k]}' for k in _SETTING)}); report without --keep"
            )
    for method, m in previous["methods"].items():
        for row in m["runs"]:
            runs.setdefault(method, {}).setdefault(row["seed"], row)
    return previous["test_groups"], setting or {k: previous[k] for k in ("data", *_SETTING)}


def summarize(collected: dict[str, Any]) -> dict[str, Any]:
    table, groups = collected["table"], collected["groups"]
    methods = {}
    order = list(OVERLAYS)  # SH-PEFT first, then the peers, then ablation points by name
    for method, t in sorted(
        table.items(), key=lambda kv: (kv[0] not in order, order.index(kv[0]) if kv[0] in order else 0, kv[0])
    ):
        acc = [r["accuracy"] for r in t["runs"]]
        methods[method] = {
            "kind": "method" if method in OVERLAYS else "ablation",
            "seeds": t["seeds"],
            "runs": t["runs"],
            "accuracy_mean_sd": stats.mean_sd(acc),
            "auc_mean_sd": stats.mean_sd([r["roc_auc"] for r in t["runs"]]),
            "f1_mean_sd": stats.mean_sd([r["f1_macro"] for r in t["runs"]]),
            "min_accuracy": min(acc),
            "val_auc_mean_sd": stats.mean_sd([r["val_auc"] for r in t["runs"]]),
            "selection_seconds_mean": _mean([r["selection_seconds"] for r in t["runs"]]),
            "artefact_bytes_mean": _mean([r["artefact_bytes"] for r in t["runs"]]),
            "grouped_ci": stats.grouped_bootstrap(t["correct"], groups),
        }
    paired = {}
    if REFERENCE in table:
        ref = table[REFERENCE]
        for method in methods:
            t = table[method]
            common = [s for s in ref["seeds"] if s in t["seeds"]]
            if method == REFERENCE or not common:
                continue
            a = ref["correct"][[ref["seeds"].index(s) for s in common]]
            b = t["correct"][[t["seeds"].index(s) for s in common]]
            paired[method] = {"seeds": common, **stats.paired_difference(a, b, groups)}
    return {
        **{k: collected[k] for k in ("data", *_SETTING)},
        "n_test_files": len(groups),
        "n_test_groups": len(set(groups)),
        "methods": methods,
        "paired_vs_shpeft": paired,
        "test_groups": groups,  # with each run's ``correct`` (one 0/1 per test file): what --keep pools
    }


def _mean(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _pct(x: float | None) -> str:
    return "–" if x is None or x != x else f"{100 * x:.1f}"


def render(s: dict[str, Any], command: str) -> str:
    lines = [
        "# Seeds through the bundle",
        "",
        f"Command: `{command}`. Data: {s['data']['source']} test split, {s['n_test_files']} files in "
        f"{s['n_test_groups']} near-duplicate groups; {s['network']} at {s['img_size']} px, "
        f"{s['train_images']} training images. Intervals: 95 % "
        "grouped (cluster) bootstrap over the test groups of the seed-averaged figure (2,000 replicates). "
        "Rows named `key=value` are ablation points: the bundle's SH-PEFT with that one change.",
        "",
        "| method | seeds | test acc % per seed | mean ± sd | grouped 95 % CI | min | test AUC % mean ± sd | "
        "F1 % | val AUC % (chosen epoch) | selection s | stored KB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in s["methods"].items():
        per = ", ".join(_pct(r["accuracy"]) for r in m["runs"])
        mean, sd = m["accuracy_mean_sd"]
        ci = m["grouped_ci"]
        sel = "–" if m["selection_seconds_mean"] is None else f"{m['selection_seconds_mean']:.0f}"
        kb = "–" if m["artefact_bytes_mean"] is None else f"{m['artefact_bytes_mean'] / 1e3:,.0f}"
        lines.append(
            f"| {name} | {len(m['seeds'])} | {per} | {_pct(mean)} ± {_pct(sd)} | [{_pct(ci['low'])}, "
            f"{_pct(ci['high'])}] | {_pct(m['min_accuracy'])} | {_pct(m['auc_mean_sd'][0])} ± "
            f"{_pct(m['auc_mean_sd'][1])} | {_pct(m['f1_mean_sd'][0])} | {_pct(m['val_auc_mean_sd'][0])} ± "
            f"{_pct(m['val_auc_mean_sd'][1])} | {sel} | {kb} |"
        )
    if s["paired_vs_shpeft"]:
        lines += [
            "",
            "Paired differences, SH-PEFT minus peer (test accuracy points, same seeds, same test files):",
            "",
            "| peer | seeds | per seed | mean ± sd | grouped 95 % CI | excludes 0 |",
            "|---|---|---|---|---|---|",
        ]
        for name, d in s["paired_vs_shpeft"].items():
            per = ", ".join(f"{100 * x:+.1f}" for x in d["per_seed"])
            lines.append(
                f"| {name} | {d['n_seeds']} | {per} | {100 * d['mean']:+.1f} ± {100 * d['sd']:.1f} | "
                f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] | {'yes' if d['excludes_zero'] else 'no'} |"
            )
    lines += _environments(s["methods"])
    return "\n".join(lines) + "\n"


def _environments(methods: dict[str, Any]) -> list[str]:
    """Which runs were trained where: the same seed trains to other weights on another CPU
    instruction set or thread count, so runs pooled across sittings say so."""
    where: dict[str, list[str]] = {}
    for name, m in methods.items():
        for r in m["runs"]:
            env = r.get("environment")
            key = (
                f"{env.get('cpu')} ({env.get('cpu_capability')}), {env.get('threads')} threads, "
                f"torch {env.get('torch')}{', ' + env['gpu'] if env.get('gpu') else ''}"
                if env
                else "not recorded (trained before runs recorded it)"
            )
            where.setdefault(key, []).append(f"{name} s{r['seed']}")
    if not where:
        return []
    return ["", "Trained in:", ""] + [f"- {k}: {', '.join(v)}" for k, v in where.items()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("run", "report"))
    ap.add_argument("--out", type=Path, default=Path("runs/bundle_seeds"))
    ap.add_argument("--methods", default="shpeft,full_finetune,random_mask,linear_probe")
    ap.add_argument("--seeds", default="0-4")
    ap.add_argument(
        "--ablations",
        default="",
        help="comma list of rho, estimator, calibration_batches, calibration_loss, budget",
    )
    ap.add_argument("--base", default="cpu_demo.yaml", help="base overlay ('' for train.yaml alone)")
    ap.add_argument("--dataset", default=None, help="your data (folder, CSV or datalist) instead of Br35H")
    ap.add_argument("--results", type=Path, default=RESULTS / "bundle_seeds")
    ap.add_argument(
        "--keep",
        action="store_true",
        help="report: keep the runs recorded in the existing --results JSON that --out lacks "
        "(seeds measured in separate sittings)",
    )
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(OVERLAYS))
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {sorted(OVERLAYS)}")
    if args.action == "run":
        extra = ["--dataset", args.dataset] if args.dataset else []
        points = ablation_points([a for a in args.ablations.split(",") if a], args.base)
        run(args.out, methods, _seeds(args.seeds), args.base, extra, points)
        return 0
    previous = None
    if args.keep:
        path = args.results.with_suffix(".json")
        if not path.is_file():
            ap.error(f"--keep: no earlier report at {path}")
        previous = json.loads(path.read_text())
    summary = summarize(collect(args.out, previous))
    command = "python -m benchmarks.bundle_seeds run --methods <methods> --seeds <seeds> [--ablations ...]"
    args.results.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.results.with_suffix(".json"), summary)
    args.results.with_suffix(".md").write_text(render(summary, command))
    print(render(summary, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
