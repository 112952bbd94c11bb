"""Server-side cost of a federated SH-PEFT round against sites, budget k and model size.

Two parts (``python -m benchmarks.fed_load``):

1. **Sweep.** The real :class:`shpeft_monai.fl.metered.MeteredSparseFedAvg` (the production strategy plus its profiling) aggregates real Flower reply
   messages (k float32 values, a ViT-S/14 head of 770 values, an example count) from ``S`` sites, for
   S in 5..80 and k in 2,000..200,000, and for masks over models of 22 M (ViT-S) and 86 M (ViT-B)
   eligible weights at the same k. Time is the median over repeats of ``aggregate_train`` (validation
   of every reply + the weighted mean); memory is the peak of Python/numpy allocations during it
   (``tracemalloc``, recorded by the strategy itself). A least-squares fit ``t = a + b * S * k``
   says how linear it is.
2. **Simulation.** A real Flower simulation with ``--sites`` (default 20) virtual sites of a tiny
   random ViT (so training stays cheap on a laptop) reports the aggregation time and memory of each
   round as the server measured them (``federated.json`` -> ``aggregation_per_round``).

Writes ``benchmarks/results/fed_load.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
HEAD = {"head.weight": (2, 384), "head.bias": (2,)}  # ViT-S/14 binary head: 770 values
MODELS = {"ViT-S/14 (22 M eligible)": 21_600_000, "ViT-B/16 (86 M eligible)": 85_600_000}


def _mask(n_eligible: int, k: int, seed: int = 0):
    """A mask of exactly k entries over one flat tensor of ``n_eligible`` weights (no dense array)."""
    import torch

    from shpeft_monai.sparse import SparseMask

    rng = np.random.default_rng(seed)
    idx = np.unique(rng.integers(0, n_eligible, size=int(k * 1.2) + 16))[:k]
    assert idx.size == k
    return SparseMask({"blocks.weight": torch.from_numpy(idx)}, {"blocks.weight": (n_eligible,)}, "bench")


def measure(sites: int, k: int, n_eligible: int, repeats: int = 3) -> dict[str, Any]:
    """Median aggregation time and peak memory of one round of ``sites`` honest replies."""
    from flwr.app import Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from shpeft_monai.fl import codec
    from shpeft_monai.fl.metered import MeteredSparseFedAvg

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    mask = _mask(n_eligible, k)
    rng = np.random.default_rng(1)
    replies = []
    for node in range(1, sites + 1):
        content = codec.encode_update(
            rng.standard_normal(k).astype(np.float32),
            {n: rng.standard_normal(s).astype(np.float32) for n, s in HEAD.items()},
            mask.fingerprint,
            num_examples=int(rng.integers(50, 500)),
            config={"server-round": 1},
        )
        request = Message(content=RecordDict(), message_type="train", dst_node_id=node)
        replies.append(Message(content=content, reply_to=request))
    times, peaks = [], []
    for _ in range(repeats):
        s = MeteredSparseFedAvg(head_shapes=HEAD, fraction_evaluate=0.0)
        s.mask = mask
        _, metrics = s.aggregate_train(1, replies)
        assert metrics is not None and metrics["sites-accepted"] == sites
        times.append(s.aggregation_log[-1]["seconds"])
        peaks.append(s.aggregation_log[-1]["peak_bytes"])
    return {
        "sites": sites,
        "k": k,
        "n_eligible": n_eligible,
        "seconds": statistics.median(times),
        "peak_bytes": int(statistics.median(peaks)),
        "payload_bytes_per_reply": codec.record_nbytes(replies[0].content),
    }


def sweep(sites: list[int], ks: list[int], repeats: int) -> list[dict[str, Any]]:
    rows = []
    vit_s = MODELS["ViT-S/14 (22 M eligible)"]
    for k in ks:
        for n in sites:
            rows.append({**measure(n, k, vit_s, repeats), "model": "ViT-S/14 (22 M eligible)"})
            print(
                f"sites {n:3d} k {k:7d}: {1e3 * rows[-1]['seconds']:8.2f} ms, {rows[-1]['peak_bytes'] / 2**20:7.2f} MiB"
            )
    k_mid = ks[len(ks) // 2]
    for name, n_el in MODELS.items():
        if name.startswith("ViT-B"):
            for n in sites:
                rows.append({**measure(n, k_mid, n_el, repeats), "model": name})
                r = rows[-1]
                print(
                    f"{name}: sites {n:3d} k {k_mid}: {1e3 * r['seconds']:.2f} ms, {r['peak_bytes'] / 2**20:.2f} MiB"
                )
    return rows


def fit(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Least squares ``y = a + b * sites + c * sites * k`` (a per-reply and a per-value cost), R^2."""
    sites = np.array([r["sites"] for r in rows], float)
    x = np.stack([np.ones_like(sites), sites, sites * np.array([r["k"] for r in rows], float)], 1)
    y = np.array([r[key] for r in rows], float)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    pred = x @ coef
    r2 = 1 - float(((y - pred) ** 2).sum()) / float(((y - y.mean()) ** 2).sum())
    return {
        "intercept": float(coef[0]),
        "per_site": float(coef[1]),
        "per_site_value": float(coef[2]),
        "r2": r2,
    }


def simulate(sites: int, rounds: int, out: Path) -> dict[str, Any]:
    """A real Flower simulation of ``sites`` tiny sites; the server's own aggregation records."""
    cmd = [sys.executable, "-m", "shpeft_monai.fl.simulate", "--out", str(out), "--sites", str(sites)]
    cmd += ["--rounds", str(rounds), "--train-per-site", "6", "--val-limit", "8", "--test-limit", "8"]
    cmd += ["--model", "vit_tiny_patch16_224", "--random-init", "--img-size", "32", "--batch-size", "3"]
    cmd += ["--calibration-batches", "1", "--no-baselines", "--skew", "0.2"]
    cmd += ["--bundle", "shpeft#head_warmup_steps=1"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        log, _ = proc.communicate(timeout=3600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # Ray workers live in this process group
    if proc.returncode != 0:
        raise SystemExit(f"simulation failed ({proc.returncode}):\n{log.decode(errors='replace')[-4000:]}")
    fed = json.loads((out / "federated.json").read_text())
    return {
        "sites": sites,
        "rounds": rounds,
        "model": "vit_tiny_patch16_224 (random init, 32 px)",
        "k": fed["k"],
        "model_parameters": fed["model_parameters"],
        "aggregation_per_round": fed["aggregation_per_round"],
        "rejected": len(fed["rejected_replies"]),
        "wall_seconds": time.perf_counter() - t0,
    }


def render(report: dict[str, Any]) -> str:
    lines = [
        "# Federated server load",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}",
        "",
        "## Aggregation of one round (SparseDeltaFedAvg.aggregate_train on real Flower messages)",
        "",
        "| model | sites | k | time ms | peak MiB | reply bytes |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["sweep"]:
        lines.append(
            f"| {r['model']} | {r['sites']} | {r['k']:,} | {1e3 * r['seconds']:.2f} | "
            f"{r['peak_bytes'] / 2**20:.2f} | {r['payload_bytes_per_reply']:,} |"
        )
    ft, fm = report["fit_time"], report["fit_memory"]
    lines += [
        "",
        f"Fit over the ViT-S rows, `y = a + b * sites + c * sites * k`: time b = {1e3 * ft['per_site']:.3f} ms "
        f"per site, c = {1e9 * ft['per_site_value']:.2f} ns per site-value, R^2 = {ft['r2']:.4f}; memory "
        f"b = {fm['per_site'] / 1024:.1f} KiB per site, c = {fm['per_site_value']:.2f} bytes per site-value, "
        f"R^2 = {fm['r2']:.4f}.  ",
        f"Same k, 4x the model (ViT-B vs ViT-S): time ratio {report['model_size_time_ratio']:.2f}, "
        f"memory ratio {report['model_size_memory_ratio']:.2f} (median over the site counts).",
    ]
    sim = report.get("simulation")
    if sim:
        lines += [
            "",
            f"## Real Flower simulation: {sim['sites']} sites, {sim['rounds']} rounds, {sim['model']}, "
            f"k = {sim['k']:,}",
            "",
            "| round | replies | accepted | aggregation ms | peak MiB |",
            "|---|---|---|---|---|",
        ]
        for a in sim["aggregation_per_round"]:
            lines.append(
                f"| {a['round']} | {a['replies']} | {a['accepted']} | {1e3 * a['seconds']:.2f} | "
                f"{a['peak_bytes'] / 2**20:.3f} |"
            )
        lines += [
            "",
            f"Simulation wall time {sim['wall_seconds']:.0f} s; rejected replies: {sim['rejected']}.",
        ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, unit, scale in ((axes[0], "seconds", "ms", 1e3), (axes[1], "peak_bytes", "MiB", 1 / 2**20)):
        for (model, k), style in zip(
            sorted({(r["model"], r["k"]) for r in report["sweep"]}), ["o-", "s-", "^-", "d--", "x--"]
        ):
            rows = sorted(
                (r for r in report["sweep"] if r["model"] == model and r["k"] == k), key=lambda r: r["sites"]
            )
            ax.plot(
                [r["sites"] for r in rows],
                [scale * r[key] for r in rows],
                style,
                label=f"{model[:8]} k={k:,}",
            )
        ax.set_xlabel("sites per round")
        ax.set_ylabel(f"aggregation {key.replace('_', ' ')} ({unit})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle("SparseDeltaFedAvg aggregation cost: linear in sites x k, flat in model size", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sites", default="5,10,20,40,80")
    p.add_argument("--ks", default="2000,20000,200000")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--sim-sites", type=int, default=20, help="virtual sites of the real simulation (0 = skip)"
    )
    p.add_argument("--sim-rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    sites = [int(x) for x in args.sites.split(",")]
    ks = [int(x) for x in args.ks.split(",")]
    rows = sweep(sites, ks, args.repeats)
    vit_s = [r for r in rows if r["model"].startswith("ViT-S")]
    k_mid = ks[len(ks) // 2]
    pairs = [
        (a, b)
        for a in rows
        for b in rows
        if a["model"].startswith("ViT-B")
        and b["model"].startswith("ViT-S")
        and a["sites"] == b["sites"]
        and b["k"] == k_mid
    ]
    report: dict[str, Any] = {
        "command": "python -m benchmarks.fed_load " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "sweep": rows,
        "fit_time": fit(vit_s, "seconds"),
        "fit_memory": fit(vit_s, "peak_bytes"),
        "model_size_time_ratio": statistics.median(a["seconds"] / b["seconds"] for a, b in pairs),
        "model_size_memory_ratio": statistics.median(a["peak_bytes"] / b["peak_bytes"] for a, b in pairs),
    }
    if args.sim_sites:
        with tempfile.TemporaryDirectory() as tmp:
            report["simulation"] = simulate(args.sim_sites, args.sim_rounds, Path(tmp) / "sim")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fed_load.json").write_text(json.dumps(report, indent=1))
    (args.out / "fed_load.md").write_text(render(report))
    plot(report, args.out / "fed_load.png")
    print(render(report))
    return report


if __name__ == "__main__":
    main()
