"""Command line of the accuracy suite: ``python -m benchmarks.suite``.

Examples::

    python -m benchmarks.suite                                  # --config cpu: Br35H, 112 px, 5 seeds
    python -m benchmarks.suite --config full --device cuda      # 224 px, whole split, 10 epochs
    python -m benchmarks.suite --dataset /data/xray             # the same comparison on your data
    python -m benchmarks.suite --methods shpeft,full --ablations none --seeds 0,1,2
    python -m benchmarks.suite --render cpu70                   # re-render a committed result's markdown
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR

from .config import ABLATIONS, CONFIGS, DEFAULT_METHODS, HISTORICAL, ablation_specs, method_spec
from .data import slug
from .driver import run_suite
from .report import render_markdown

__all__ = ["build_config", "main"]

DESCRIPTION = "Accuracy benchmark: SH-PEFT against full fine-tuning and PEFT peers, with the ablations."


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=DESCRIPTION)
    p.add_argument("--config", default="cpu", choices=sorted(CONFIGS))
    p.add_argument(
        "--dataset", default=None, help="'br35h' (default) or your data: folder | CSV | datalist JSON"
    )
    p.add_argument(
        "--grouping",
        default=None,
        choices=("content", "near_duplicate", "none"),
        help="how a split made for --dataset keeps files together (default content: identical files)",
    )
    p.add_argument("--device", default=None, help="cpu | cuda (default: the configuration's)")
    p.add_argument("--methods", default=None, help=f"comma list (or 'none') of {', '.join(DEFAULT_METHODS)}")
    p.add_argument("--ablations", default=None, help=f"comma list (or 'none') of {', '.join(ABLATIONS)}")
    p.add_argument("--seeds", default=None, help="e.g. 0,1,2,3,4")
    p.add_argument("--ablation-seeds", default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--n-boot", type=int, default=None, help="bootstrap replicates (default 2000)")
    p.add_argument("--name", default=None, help="results name (default: the configuration's)")
    p.add_argument("--note", default=None, help="text for the table header (what was reduced)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--fresh", action="store_true", help="ignore finished runs in an existing JSON")
    p.add_argument(
        "--render", default=None, metavar="NAME", help=f"only re-render suite_NAME.md ({HISTORICAL})"
    )
    return p.parse_args(argv)


def _csv(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return () if text.strip().lower() == "none" else tuple(t.strip() for t in text.split(",") if t.strip())


def build_config(args: argparse.Namespace):
    """The configuration of ``--config`` with the command line's changes, validated."""
    cfg = CONFIGS[args.config]
    changes: dict[str, Any] = {}
    simple = ("device", "epochs", "train_subset", "img_size", "name", "note", "grouping", "n_boot", "dataset")
    for k in simple:
        if getattr(args, k) is not None:
            changes[k] = getattr(args, k)
    for k in ("methods", "ablations"):
        if (v := _csv(getattr(args, k))) is not None:
            changes[k] = v
    for k in ("seeds", "ablation_seeds"):
        if getattr(args, k):
            changes[k] = tuple(int(s) for s in _csv(getattr(args, k)) or ())
    if args.dataset and args.dataset.lower() != "br35h" and args.name is None:
        changes["name"] = f"{cfg.name}_{slug(args.dataset)}"
    cfg = replace(cfg, **changes)
    for m in cfg.methods:
        method_spec(m, cfg)
    for a in cfg.ablations:
        ablation_specs(a)
    if cfg.name in HISTORICAL:
        raise SystemExit(f"--name {cfg.name}: a committed result of an earlier suite; choose another name")
    return cfg


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    for noisy in ("shpeft_monai", "timm", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = _parse(argv)
    if args.render:
        path = args.out / f"suite_{args.render}.json"
        report = json.loads(path.read_text())
        path.with_suffix(".md").write_text(render_markdown(report))
        print(f"wrote {path.with_suffix('.md')}")
        return report
    cfg = build_config(args)
    command = "python -m benchmarks.suite " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    report = run_suite(cfg, args.out, command=command.strip(), resume=not args.fresh)
    print(render_markdown(report))
    print("SH-PEFT settings that won on VALIDATION (use these for the bundle defaults):")
    for g, w in report["winners"].items():
        print(f"  {g}: {w['label']} (val AUC {w['val_roc_auc']:.4f}, val acc {w['val_accuracy']:.4f})")
    return report
