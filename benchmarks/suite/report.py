"""The suite's markdown: header (command, machine, data, recipe, rules), tables with intervals, paired
differences, the learning-rate choice and the settings that won on validation.

Reads reports written by this suite and by its earlier versions (``suite_cpu70.json`` and the other
committed results): missing fields render as ``-``.
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import fmt_bytes, fmt_ratio

__all__ = ["render_markdown"]

TABLE = (
    "| method | network | test acc % per seed | test acc % mean ± sd | 95 % CI (grouped) | test groups "
    "| test F1 % | test AUC % | val AUC % | backbone weights | share | head | lr (head) | step time vs full "
    "| memory vs full | selection s | artefact | epochs chosen |"
)
PAIRED = (
    "| A − B | seeds | Δ test acc per seed (pp) | mean Δ ± sd (pp) | 95 % CI (paired, grouped) | "
    "test groups | CI excludes 0 |"
)


def _pct(ms: Any) -> str:
    if not ms or ms[0] != ms[0]:
        return "-"
    return f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"


def _ci(ci: dict[str, Any] | None, key_lo: str = "low", key_hi: str = "high") -> str:
    if not ci or ci.get(key_lo) is None:
        return "-"
    return f"[{100 * ci[key_lo]:.1f}, {100 * ci[key_hi]:.1f}]"


def _network(name: str, cfg: dict[str, Any]) -> str:
    short = {"vit_small_patch14_dinov2": "ViT-S/14", "tf_efficientnet_lite0": "EffNet-Lite0"}
    return short.get(name, name)


def _lr(r: dict[str, Any]) -> str:
    lr, head = r.get("lr"), r.get("lr_head")
    if lr is None:
        return "-"
    return f"{lr:g}" if head is None or head == lr else f"{lr:g} ({head:g})"


def _row(r: dict[str, Any], cfg: dict[str, Any]) -> str:
    ci = r.get("test_accuracy_ci")
    per_seed = ", ".join(f"{100 * a:.1f}" for a in r.get("test_accuracy_per_seed", []))
    return (
        f"| {r['label']} | {_network(r['network'], cfg)} | {per_seed or '-'} | {_pct(r['test_accuracy'])} | "
        f"{_ci(ci)} | {ci['n_groups'] if ci else '-'} | {_pct(r['test_f1_macro'])} | "
        f"{_pct(r['test_roc_auc'])} | {_pct(r['val_roc_auc'])} | {r['selected_backbone_weights']:,} | "
        f"{100 * r['share_of_backbone']:.4f}% | {r['head_parameters']:,} | {_lr(r)} | "
        f"{fmt_ratio(r.get('time_vs_full'))} | {fmt_ratio(r.get('memory_vs_full'))} | "
        f"{(r.get('selection_s') or 0.0):.1f} | {fmt_bytes(r.get('artefact_bytes'))} | {r['chosen_epochs']} |"
    )


def _paired(p: dict[str, Any]) -> str:
    per = ", ".join(f"{100 * d:+.1f}" for d in p["per_seed"])
    excl = "-" if p.get("excludes_zero") is None else ("**yes**" if p["excludes_zero"] else "no")
    groups = p.get("n_groups", "-")
    return (
        f"| {p['a']} − {p['b']} | {len(p['seeds'])} | {per} | {100 * p['mean']:+.1f} ± {100 * p['sd']:.1f} | "
        f"{_ci(p)} | {groups} | {excl} |"
    )


def _header(report: dict[str, Any]) -> list[str]:
    cfg, facts = report["config"], report["machine"]
    data = report.get("dataset") or {}
    sizes, groups = data.get("sizes", {}), data.get("groups", {})
    split = ", ".join(f"{k} {sizes[k]} files / {groups.get(k, '?')} groups" for k in sizes) or (
        f"train subset {cfg['train_subset'] or 'all'}, validation {cfg['val_subset'] or 'all'}, "
        f"test {cfg['test_subset'] or 'all'} (n test = {report.get('n_test')})"
    )
    classes = data.get("class_names") or []
    multi = len(classes) > 2
    recipe = cfg.get("recipe") or {}
    lines = [
        f"# Suite `{cfg['name']}`",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {facts.get('device_name')} ({facts.get('torch_threads')} torch threads, load average at "
        f"start {facts.get('loadavg')}), torch {facts.get('torch')}, timm {facts.get('timm')}, peft "
        f"{facts.get('peft')}, commit {str(facts.get('git_commit'))[:10]}  ",
        f"Data: {data.get('source', cfg.get('dataset', 'br35h'))} ({len(classes) or 2} classes"
        f"{': ' + ', '.join(classes) if classes else ''}); {split}; bootstrap groups: "
        f"{data.get('grouping', 'near-duplicate groups of the committed split')}.  ",
        f"Training: ViT {cfg['img_size']} px, CNN {cfg['cnn_img_size']} px; {cfg['epochs']} epochs, batch "
        f"{cfg['batch_size']}, seeds {cfg['seeds']} (ablations: {cfg['ablation_seeds']}); head warm-up for "
        "every method; "
        + (
            f"recipe (shpeft_monai.recipe): {', '.join(f'{k} {v}' for k, v in recipe.items())}; "
            if recipe
            else f"AdamW, wd {cfg.get('weight_decay')}; "
        )
        + f"peers' learning rates chosen on validation (seed {cfg['seeds'][0]}) from "
        f"{cfg.get('lr_grid', [cfg.get('lr')])} (full fine-tuning {cfg.get('lr_grid_full', [cfg.get('lr_full')])}"
        + (f", linear probe {cfg['lr_grid_probe']}" if "lr_grid_probe" in cfg else "")
        + ").  ",
        "Model selection: best validation ROC-AUC (then accuracy) over epochs; the test split is evaluated "
        "once, at that epoch. Time/memory: median train-step time and peak memory of the first epoch's "
        f"steps ({report.get('memory_measure')}), as ratios to full fine-tuning of the same network.  ",
        "Statistics: mean ± sample sd over seeds; **95 % CI (grouped)**: percentile interval of the "
        "seed-averaged test accuracy over cluster-bootstrap replicates of the test split that draw its "
        "groups with replacement and take all their files (one draw shared by the seeds); **test groups**: "
        "distinct groups behind the figure; **paired**: A − B per seed, their mean, and a grouped bootstrap "
        "that draws the same groups for both methods (benchmarks/stats.py, "
        f"{cfg.get('n_boot', 2000)} replicates)."
        + (" F1 is macro-averaged, AUC macro one-vs-rest." if multi else ""),
    ]
    if cfg.get("note"):
        lines += ["", f"**Note:** {cfg['note']}"]
    return lines


def _tables(report: dict[str, Any]) -> list[str]:
    cfg, summary = report["config"], report["summary"]
    paired = report.get("paired") or []
    lines: list[str] = []
    order = ["methods"] + [
        g for g in dict.fromkeys(r["group"] for r in summary) if g not in ("methods", "lr_search")
    ]
    for group in order:
        rows = [r for r in summary if r["group"] == group]
        if not rows:
            continue
        lines += ["", f"## {group}", "", TABLE, "|" + "---|" * TABLE.count(" | ") + "---|"]
        lines += [_row(r, cfg) for r in rows]
        pairs = [p for p in paired if p["group"] == group]
        if pairs:
            what = "SH-PEFT minus each peer" if group == "methods" else "each point minus the centre"
            lines += ["", f"Paired differences, {what} (test accuracy):", "", PAIRED, "|---" * 7 + "|"]
            lines += [_paired(p) for p in pairs]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """The report as markdown (any version of the suite's JSON)."""
    lines = _header(report) + _tables(report)
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
