"""Run a suite: plan, train what is missing, write the JSON, markdown and plots after every run.

Finished runs are kept in ``suite_<name>.json`` and skipped when the same command runs again (an
interrupted suite resumes). Each run is keyed by its own settings, so widening a grid or adding
methods, seeds or ablations keeps the finished runs; a change to the data or the training settings
(resolution, subsets, epochs, recipe...) starts over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, machine_facts, write_json

from .config import SuiteConfig, config_dict, run_settings
from .data import DataSource, Split, load_tensors, open_source
from .plan import RunSpec, plan_runs
from .plots import plot
from .report import render_markdown
from .summary import lr_choices, paired_rows, summarize, table_rows, winners
from .train import run_one

__all__ = ["COMPACT", "finish", "run_suite", "test_items"]

logger = logging.getLogger("benchmarks.suite")
COMPACT = ("test_pred", "test_prob", "test_items", "per_seed", "test_accuracy_per_seed", "keys")


def test_items(source: DataSource) -> list[dict[str, Any]]:
    """The test split as the bootstrap sees it: image (relative to the data's common folder), label, group."""
    items = source.splits["test"]
    paths = [str(d["image"]) for d in items]
    root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    return [
        {"image": os.path.relpath(p, root) if root else p, "label": int(d["label"]), "group": d["group"]}
        for p, d in zip(paths, items)
    ]


def _digest(items: list[dict[str, Any]]) -> str:
    return hashlib.sha1(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _resume(json_path: Path | None, cfg: SuiteConfig, digest: str) -> list[dict[str, Any]]:
    if json_path is None or not json_path.is_file():
        return []
    old = json.loads(json_path.read_text())
    if run_settings(old.get("config", {})) != run_settings(config_dict(cfg)):
        logger.info("%s was made with other data or training settings: starting over", json_path)
        return []
    if old.get("test_items_digest") != digest:
        logger.info("%s was made on another test split: starting over", json_path)
        return []
    logger.info("resuming: %d finished runs in %s", len(old.get("runs", [])), json_path)
    return list(old.get("runs", []))


def finish(
    report: dict[str, Any], plan: list[RunSpec], json_path: Path | None, *, plots: bool = False
) -> None:
    """Recompute the summary, paired differences, lr choice and winners; write JSON and markdown."""
    cfg = report["config"]
    rows = table_rows(report["runs"], plan)
    report["summary"] = summarize(rows, report.get("test_items"), cfg.get("n_boot", 2000))
    report["paired"] = paired_rows(
        report["summary"], report["runs"], report.get("test_items"), cfg.get("n_boot", 2000)
    )
    report["lr_choice"] = lr_choices(report["runs"], plan)
    report["winners"] = winners(report["summary"], cfg["vit"])
    report["n_test"] = len(report.get("test_items") or [])
    report["memory_measure"] = next(
        (r["memory_measure"] for r in report["runs"] if r.get("memory_measure")), None
    )
    if json_path is None:
        return
    if plots and report["runs"]:
        report["plots"] = [p.name for p in plot(report, json_path.with_suffix(""))]
    write_json(json_path, report, compact=COMPACT)
    json_path.with_suffix(".md").write_text(render_markdown(report))


def run_suite(
    cfg: SuiteConfig, out_dir: Path | None = RESULTS_DIR, *, command: str = "", resume: bool = True
) -> dict[str, Any]:
    """Run every planned run of ``cfg`` (skipping ones already in the JSON), write and return the report."""
    if cfg.device == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    source = open_source(cfg)
    items = test_items(source)
    digest = _digest(items)
    json_path = out_dir / f"suite_{cfg.name}.json" if out_dir is not None else None
    results = _resume(json_path, cfg, digest) if resume else []
    report: dict[str, Any] = {
        "config": config_dict(cfg),
        "command": command,
        "machine": machine_facts(cfg.device, cfg.threads),
        "dataset": source.describe(),
        "test_items_digest": digest,
        "test_items": items,
        "runs": results,
    }
    by_key = {r["key"]: r for r in results}
    tensors: dict[str, dict[str, Split]] = {}
    t_suite = time.perf_counter()
    plan = plan_runs(cfg, by_key)
    while todo := [s for s in plan if s.key not in by_key]:
        spec = todo[0]
        if spec.network not in tensors:
            tensors[spec.network] = load_tensors(source, cfg, spec.network)
        n_all = len({s.key for s in plan})
        tag = f"[{n_all - len({s.key for s in todo}) + 1}/{n_all}+]"
        logger.info("%s %s / %s lr %g seed %d", tag, spec.group, spec.label, spec.lr, spec.seed)
        r = run_one(spec, cfg, tensors[spec.network], source.class_names)
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
        report["wall_s_this_invocation"] = time.perf_counter() - t_suite
        plan = plan_runs(cfg, by_key)  # grows as learning rates get chosen on validation
        finish(report, plan, json_path)
    report["wall_s_this_invocation"] = time.perf_counter() - t_suite
    finish(report, plan, json_path, plots=True)
    return report
