"""``python -m federated.simulate``: federated SH-PEFT across simulated sites, with baselines.

1. Splits the Br35H training data over N sites (label skew, near-duplicate groups kept whole:
   :func:`federated.task.site_partition`), optionally a stratified subset per site.
2. Runs the Flower app in simulation (Ray, 1 CPU per virtual client): mask agreement, then
   ``rounds`` sparse FedAvg rounds; the server evaluates the global delta on the validation split
   after every round and saves it with :func:`shpeft_monai.save_delta`.
3. Evaluates the final global delta on the test split, then trains two references with the same
   budget, calibration, epochs (``rounds * local_epochs``) and learning rate: centralised SH-PEFT
   on the union of the sites' data, and local-only SH-PEFT on one site.
4. Writes ``<out>/report.json`` (accuracy per round, bytes per site per round next to dense
   FedAvg, test accuracies, wall time) and ``<out>/report.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shpeft_monai.io import FEDERATED_REPORT_FILE, GLOBAL_DELTA_FILE, write_json

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

logger = logging.getLogger("federated.simulate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", default="runs/fed-sim")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--train-per-site", type=int, default=96, help="stratified subset per site (0 = all)")
    p.add_argument(
        "--val-limit", type=int, default=160, help="validation images for per-round accuracy (0 = all)"
    )
    p.add_argument("--test-limit", type=int, default=0, help="test images (0 = the whole test split)")
    p.add_argument("--model", default="vit_small_patch14_dinov2")
    p.add_argument(
        "--random-init", action="store_true", help="random weights (tests; no converted checkpoint)"
    )
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of the k selected values")
    p.add_argument("--head-lr", type=float, default=0.0, help="learning rate of the dense head (0 = --lr)")
    p.add_argument("--budget", type=float, default=1e-4)
    p.add_argument("--rho", type=float, default=0.5)
    p.add_argument("--calibration-batches", type=int, default=4)
    p.add_argument("--skew", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local-site", type=int, default=0, help="site of the local-only reference")
    p.add_argument(
        "--no-baselines", action="store_true", help="skip the centralised and local-only references"
    )
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SITE:KIND[:ROUND]",
        help="fault drill: make a site misbehave in a round (repeatable; kinds in federated/faults.py)",
    )
    p.add_argument(
        "--round-timeout",
        type=float,
        default=3600,
        help="seconds the server waits for the sites' replies in a round before going on without them",
    )
    p.add_argument(
        "--ray-cpus",
        type=int,
        default=0,
        help="CPUs Ray may use (0 = all); each virtual site takes 1, so at most this many train at once",
    )
    p.add_argument("--phase", choices=("all", "federated"), default="all", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from federated.faults import parse_faults

    try:
        faults = parse_faults(args.fault)
    except ValueError as exc:
        p.error(str(exc))
    if any(site >= args.sites for site in faults):
        p.error(f"--fault names a site >= --sites {args.sites} (sites are numbered from 0)")
    return args


def _run_federated_isolated(argv: list[str]) -> None:
    """Run the Flower simulation in its own session and end that whole process group afterwards:
    Ray's actor processes can outlive ``run_simulation`` (orphaned, still spinning) otherwise."""
    cmd = [sys.executable, "-m", "federated.simulate", *argv, "--phase", "federated"]
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        rc = proc.wait()
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    if rc != 0:
        raise SystemExit(f"the federated simulation failed (exit code {rc}); see the log above")


def _site_data(s: Any) -> list[list[dict[str, Any]]]:
    """Each site's training records exactly as the ClientApp computes them."""
    from federated.task import site_partition
    from shpeft_monai.data import load_split, subsample

    sites = site_partition(load_split("br35h")["train"], s.num_sites, skew=s.skew, seed=s.seed)
    if s.train_per_site:
        sites = [
            subsample(r, s.train_per_site, seed=s.seed) if len(r) > s.train_per_site else r for r in sites
        ]
    return sites


def _reference(name: str, records: list[dict[str, Any]], s: Any, epochs: int, test: Any) -> dict[str, Any]:
    """Centralised-style SH-PEFT on ``records``: select (same budget/calibration), train, test."""
    import torch

    from federated.task import build_model, evaluate_model, make_loader, train_local
    from shpeft_monai import inject, select_mask

    t0 = time.perf_counter()
    cfg = s.shpeft()
    model = build_model(s)
    torch.manual_seed(s.seed)
    mask = select_mask(model, cfg, make_loader(records, s, train=False, shuffle=True), progress=False)
    inject(model, mask, cfg)
    n, loss = train_local(model, make_loader(records, s, train=True), s, epochs)
    metrics = evaluate_model(model, test)
    out = {
        "name": name,
        "train_images": n,
        "epochs": epochs,
        "final_train_loss": loss,
        "k": mask.k,
        "test": metrics,
        "seconds": time.perf_counter() - t0,
    }
    logger.info("%s: %s", name, out)
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    acc = report["federated"]["accuracy_per_round"]
    rounds = [int(r) for r in acc]
    a.plot(rounds, [acc[r] for r in acc], "o-", label="federated SH-PEFT (validation)")
    for key, style in (("centralised", "--"), ("local_only", ":")):
        ref = report.get("baselines", {}).get(key)
        if ref:
            a.axhline(ref["test"]["accuracy"], linestyle=style, color="grey", label=f"{key} (test)")
    a.axhline(
        report["federated_test"]["accuracy"], linestyle="-.", color="C1", label="federated final (test)"
    )
    a.set_xticks(rounds)
    a.set_xlabel("round (0 = before training)")
    a.set_ylabel("accuracy")
    a.set_title("accuracy per round")
    a.legend(fontsize=8)
    comm = report["federated"]["communication"]
    rows = [r for r in comm["per_site_per_round"] if r["phase"] == "train"]
    nodes = sorted({r["node"] for r in rows})
    for i, node in enumerate(nodes):
        rr = [r for r in rows if r["node"] == node]
        b.bar(
            [r["round"] + 0.25 * (i - 1) for r in rr],
            [r["sent"] + r["received"] for r in rr],
            width=0.25,
            label=f"site {i} (sparse)",
        )
    b.axhline(comm["dense_fedavg_bytes_per_site_per_round"], color="red", label="dense FedAvg")
    b.set_yscale("log")
    b.set_xticks(sorted({r["round"] for r in rows}))
    b.set_xlabel("round")
    b.set_ylabel("bytes per site per round (sent + received)")
    b.set_title(f"communication: sparse / dense = {comm['ratio_sparse_to_dense']:.2e}")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in ("federated", "shpeft_monai"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("flwr").propagate = False  # flwr prints through its own handler
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = {
        "model": args.model,
        "pretrained": not args.random_init,
        "img-size": args.img_size,
        "batch-size": args.batch_size,
        "lr": args.lr,
        "head-lr": args.head_lr,
        "budget": args.budget,
        "rho": args.rho,
        "calibration-batches": args.calibration_batches,
        "local-epochs": args.local_epochs,
        "num-server-rounds": args.rounds,
        "num-sites": args.sites,
        "skew": args.skew,
        "train-per-site": args.train_per_site,
        "seed": args.seed,
        "min-nodes": args.sites,
        "num-threads": 1,
        "round-timeout": args.round_timeout,
    }
    from flwr.simulation import run_simulation

    from federated.client_app import make_client_app
    from federated.server_app import make_server_app
    from federated.task import FedSettings, build_model, evaluate_model, make_loader
    from shpeft_monai import apply_delta, load_delta
    from shpeft_monai.data import load_split, subsample

    s = FedSettings.from_config(overrides)
    splits = load_split("br35h")
    val = (
        subsample(splits["validation"], args.val_limit, seed=args.seed)
        if args.val_limit
        else splits["validation"]
    )
    test = subsample(splits["test"], args.test_limit, seed=args.seed) if args.test_limit else splits["test"]
    sites = _site_data(s)
    site_stats = [
        {
            "images": len(r),
            "label_counts": {str(c): sum(1 for x in r if x["label"] == c) for c in (0, 1)},
            "groups": len({x.get("group") for x in r}),
        }
        for r in sites
    ]
    logger.info("sites: %s", site_stats)
    build_model(s)  # convert/cache the weights once before the clients start

    fed_json = out / FEDERATED_REPORT_FILE
    if args.phase == "federated":
        run_simulation(
            server_app=make_server_app(overrides, eval_records=val, out_dir=out),
            client_app=make_client_app(overrides, faults=args.fault),
            num_supernodes=args.sites,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": args.ray_cpus or os.cpu_count() or 1},
            },
        )
        return {}
    fed_json.unlink(missing_ok=True)
    t_fed = time.perf_counter()
    _run_federated_isolated(list(argv if argv is not None else sys.argv[1:]))
    t_fed = time.perf_counter() - t_fed
    if not fed_json.is_file():
        raise SystemExit(f"the federated run did not finish: {fed_json} is missing (see the log above)")
    fed = json.loads(fed_json.read_text())

    torch_threads = os.cpu_count() or 1
    import torch

    torch.set_num_threads(torch_threads)
    test_loader = make_loader(test, s, train=False)
    model = apply_delta(build_model(s), load_delta(out / GLOBAL_DELTA_FILE))
    fed_test = evaluate_model(model, test_loader)
    logger.info("federated final delta on test: %s", fed_test)

    report: dict[str, Any] = {
        "sites": site_stats,
        "validation_images": len(val),
        "test_images": len(test),
        "federated": fed,
        "federated_test": fed_test,
        "seconds": {"federated": t_fed},
    }
    if not args.no_baselines:
        epochs = args.rounds * args.local_epochs
        union = [r for site in sites for r in site]
        report["baselines"] = {
            "centralised": _reference("centralised", union, s, epochs, test_loader),
            "local_only": _reference(
                f"local_only_site{args.local_site}", sites[args.local_site], s, epochs, test_loader
            ),
        }
    report["seconds"]["total"] = time.perf_counter() - t0
    comm = fed["communication"]
    summary = {
        "federated_test_accuracy": fed_test["accuracy"],
        "centralised_test_accuracy": report.get("baselines", {})
        .get("centralised", {})
        .get("test", {})
        .get("accuracy"),
        "local_only_test_accuracy": report.get("baselines", {})
        .get("local_only", {})
        .get("test", {})
        .get("accuracy"),
        "sparse_bytes_per_site_per_round": comm["sparse_bytes_per_site_per_round_mean"],
        "dense_bytes_per_site_per_round": comm["dense_fedavg_bytes_per_site_per_round"],
        "communication_ratio": comm["ratio_sparse_to_dense"],
        "mask_agreement_bytes_total": comm["mask_agreement_bytes_total"],
        "k": fed["k"],
        "head_parameters": fed["head_parameters"],
        "wall_seconds": report["seconds"]["total"],
    }
    report["summary"] = summary
    write_json(out / "report.json", report, indent=2)  # standard JSON (a NaN metric is null)
    plot(report, out / "report.png")
    print(json.dumps(summary, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
