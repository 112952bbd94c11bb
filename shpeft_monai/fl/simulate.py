"""``python -m shpeft_monai.fl.simulate``: federated SH-PEFT across simulated sites, with references.

1. Splits the Br35H training data over N sites (label skew, near-duplicate groups kept whole:
   :func:`shpeft_monai.fl.partition.site_datalists`), one bundle datalist per site.
2. Runs the Flower app in simulation (Ray, 1 CPU per virtual site; every site trains through the
   bundle, ``overlays/cpu_demo.yaml`` by default): mask agreement, then ``rounds`` sparse FedAvg
   rounds; the server scores the global delta on validation images after every round and saves it.
   ``--fault`` installs the fault-drill mod on the named sites; ``--aggregation``, ``--dp-*`` set
   the robust rule and site-level differential privacy.
3. Scores the final global delta on the test split, then runs two references through the same
   bundle and recipe for ``rounds * local_epochs`` epochs: centralised SH-PEFT on the union of the
   sites' data, and local-only SH-PEFT on one site.
4. Writes ``<out>/report.json`` (accuracy per round, bytes per site per round next to dense
   FedAvg, test accuracies, epsilon, wall time) and ``<out>/report.png``.
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

from shpeft_monai.fl.settings import Settings
from shpeft_monai.io import FEDERATED_REPORT_FILE, GLOBAL_DELTA_FILE, write_json

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

logger = logging.getLogger("shpeft_monai.fl.simulate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    a = p.add_argument
    a("--out", default="runs/fed-sim")
    a("--sites", type=int, default=3)
    a("--rounds", type=int, default=3)
    a("--local-epochs", type=int, default=1)
    a("--train-per-site", type=int, default=96, help="stratified subset per site (0 = all)")
    a("--val-limit", type=int, default=160, help="validation images scored per round (0 = all)")
    a("--test-limit", type=int, default=0, help="test images (0 = the whole test split)")
    a("--overlays", default="cpu_demo", help="bundle overlays before the federated one")
    a("--bundle", default="", help="extra bundle overrides, 'key=value ...'")
    a("--model", default="", help="the bundle's network_name (default: the bundle's)")
    a("--random-init", action="store_true", help="random weights (tests; no converted checkpoint)")
    a("--img-size", type=int, default=0, help="the bundle's img_size (0 = the overlays')")
    a("--batch-size", type=int, default=0, help="the bundle's batch_size (0 = the overlays')")
    a("--calibration-batches", type=int, default=0, help="shpeft#calibration_batches (0 = the overlays')")
    a("--skew", type=float, default=0.6)
    a("--seed", type=int, default=0)
    a("--aggregation", choices=("mean", "median", "trimmed_mean"), default="mean")
    a("--trim-fraction", type=float, default=0.2)
    a("--server-lr", type=float, default=Settings.server_lr, help="server learning rate (1 = plain FedAvg)")
    a(
        "--keep-optimizer-state",
        action=argparse.BooleanOptionalAction,
        default=Settings.keep_optimizer_state,
        help="sites continue their AdamW moments across rounds",
    )
    a(
        "--local-batch-size",
        type=int,
        default=Settings.local_batch_size,
        help="a site's training batch in rounds (0 = the bundle's batch / sites; references keep the bundle's)",
    )
    a("--dp-epsilon", type=float, default=0.0, help="site-level DP: epsilon over all rounds (0 = off)")
    a("--dp-noise-multiplier", type=float, default=0.0, help="or the noise multiplier itself")
    a("--dp-clip", type=float, default=0.0, help="L2 bound of a site's change per round (with DP)")
    a("--dp-delta", type=float, default=1e-5)
    a("--local-site", type=int, default=0, help="site of the local-only reference")
    a("--no-baselines", action="store_true", help="skip the centralised and local-only references")
    a(
        "--fault",
        action="append",
        default=[],
        metavar="SITE:KIND[:ROUND]",
        help="fault drill: make a site misbehave in a round (repeatable; kinds in shpeft_monai/fl/faults.py)",
    )
    a("--round-timeout", type=float, default=3600, help="seconds the server waits for a round's replies")
    a("--ray-cpus", type=int, default=0, help="CPUs Ray may use (0 = all); 1 per virtual site")
    a("--phase", choices=("all", "federated"), default="all", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from shpeft_monai.fl.faults import parse_faults

    try:
        args.faults = parse_faults(args.fault)
    except ValueError as exc:
        p.error(str(exc))
    if any(site >= args.sites for site in args.faults):
        p.error(f"--fault names a site >= --sites {args.sites} (sites are numbered from 0)")
    if (args.dp_epsilon > 0 or args.dp_noise_multiplier > 0) and args.dp_clip <= 0:
        p.error("--dp-epsilon / --dp-noise-multiplier need --dp-clip > 0")
    return args


def overrides_of(args: argparse.Namespace) -> dict[str, Any]:
    """The run config of the simulated federation (what ``[tool.flwr.app.config]`` holds)."""
    bundle = [args.bundle] if args.bundle else []
    for key, value in (
        ("network_name", args.model),
        ("img_size", args.img_size),
        ("batch_size", args.batch_size),
        ("shpeft#calibration_batches", args.calibration_batches),
    ):
        if value:
            bundle.append(f"{key}={value}")
    sites = Path(args.out).absolute() / "sites"
    return {
        "overlays": args.overlays,
        "bundle": " ".join(bundle),
        "pretrained": not args.random_init,
        "seed": args.seed,
        "local-epochs": args.local_epochs,
        "num-server-rounds": args.rounds,
        "min-nodes": args.sites,
        "num-threads": 1,
        "round-timeout": args.round_timeout,
        "aggregation": args.aggregation,
        "trim-fraction": args.trim_fraction,
        "server-lr": args.server_lr,
        "keep-optimizer-state": args.keep_optimizer_state,
        "local-batch-size": args.local_batch_size,
        "dp-epsilon": args.dp_epsilon,
        "dp-noise-multiplier": args.dp_noise_multiplier,
        "dp-clip": args.dp_clip,
        "dp-delta": args.dp_delta,
        "dataset": str(sites / "site{partition}.json"),
        "work-dir": str(sites / "work{partition}"),
    }


def _portable(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings with paths under the working directory made relative to it, so that a report copied
    into the repository names no folder of the machine it ran on."""
    cwd = Path.cwd()

    def rel(value: Any) -> Any:
        if isinstance(value, str) and os.path.isabs(value) and Path(value).is_relative_to(cwd):
            return str(Path(value).relative_to(cwd))
        return value

    return {k: rel(v) for k, v in settings.items()}


def _run_federated_isolated(argv: list[str]) -> None:
    """Run the Flower simulation in its own session and end that whole process group afterwards:
    Ray's actor processes can outlive ``run_simulation`` (orphaned, still spinning) otherwise."""
    cmd = [sys.executable, "-m", "shpeft_monai.fl.simulate", *argv, "--phase", "federated"]
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


def _reference(name: str, dataset: Path, s: Any, epochs: int, test: list[dict[str, Any]]) -> dict[str, Any]:
    """The plain bundle run (the site selects its own mask) on ``dataset``, scored on ``test``."""
    import dataclasses

    from shpeft_monai.fl.task import SiteBundle, evaluate_records

    t0 = time.perf_counter()
    logger.info("reference %s: the bundle alone for %d epochs on %s", name, epochs, dataset.name)
    s = dataclasses.replace(s, dataset=str(dataset))
    model = SiteBundle(s, dataset.parent / f"ref-{name}").train_alone(epochs)
    from shpeft_monai import get_mask

    out = {
        "name": name,
        "epochs": epochs,
        "k": get_mask(model).k,
        "test": evaluate_records(model, test, s),
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
    logging.getLogger("shpeft_monai").setLevel(logging.INFO)
    logging.getLogger("flwr").propagate = False  # flwr prints through its own handler
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = overrides_of(args)
    from shpeft_monai.bundle import class_counts
    from shpeft_monai.data import load_split, subsample
    from shpeft_monai.fl.partition import site_datalists
    from shpeft_monai.fl.task import base_network, evaluate_records

    s = Settings.from_config(overrides)
    splits = load_split("br35h")
    val = (
        subsample(splits["validation"], args.val_limit, seed=args.seed)
        if args.val_limit
        else splits["validation"]
    )
    test = subsample(splits["test"], args.test_limit, seed=args.seed) if args.test_limit else splits["test"]
    fed_json = out / FEDERATED_REPORT_FILE
    if args.phase == "federated":
        from flwr.simulation import run_simulation

        from shpeft_monai.fl.client_app import make_client_app
        from shpeft_monai.fl.faults import fault_drill
        from shpeft_monai.fl.server_app import make_server_app

        run_simulation(
            server_app=make_server_app(overrides, eval_records=val, out_dir=out, metered=True),
            client_app=make_client_app(overrides, mods=[fault_drill(args.faults)] if args.faults else ()),
            num_supernodes=args.sites,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": args.ray_cpus or os.cpu_count() or 1},
            },
        )
        return {}
    # each site's own bundle datalist (in a hospital: the list of its own images)
    lists = site_datalists(
        out / "sites",
        args.sites,
        train_per_site=args.train_per_site,
        val_per_site=8,
        skew=args.skew,
        seed=args.seed,
    )
    sites = [json.loads(p.read_text()) for p in lists]
    site_stats = [
        {
            "images": len(d["training"]),
            "label_counts": {str(c): n for c, n in enumerate(class_counts(d["training"], s.num_classes))},
        }
        for d in sites
    ]
    logger.info("sites: %s", site_stats)
    base_network(s)  # convert/cache the weights once before the sites start

    fed_json.unlink(missing_ok=True)
    t_fed = time.perf_counter()
    _run_federated_isolated(list(argv if argv is not None else sys.argv[1:]))
    t_fed = time.perf_counter() - t_fed
    if not fed_json.is_file():
        raise SystemExit(f"the federated run did not finish: {fed_json} is missing (see the log above)")
    fed = json.loads(fed_json.read_text())
    fed["settings"] = _portable(fed.get("settings", {}))

    import torch

    from shpeft_monai import apply_delta, load_delta

    torch.set_num_threads(os.cpu_count() or 1)
    s = Settings.from_config(overrides, {"num-threads": 0})
    fed_test = evaluate_records(apply_delta(base_network(s), load_delta(out / GLOBAL_DELTA_FILE)), test, s)
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
        union = out / "sites" / "union.json"
        write_json(union, {k: [r for d in sites for r in d[k]] for k in ("training", "validation")})
        report["baselines"] = {
            "centralised": _reference("centralised", union, s, epochs, test),
            "local_only": _reference(
                f"local_only_site{args.local_site}", lists[args.local_site], s, epochs, test
            ),
        }
    report["seconds"]["total"] = time.perf_counter() - t0
    comm = fed["communication"]
    refs = report.get("baselines", {})
    report["summary"] = {
        "federated_test_accuracy": fed_test["accuracy"],
        "centralised_test_accuracy": refs.get("centralised", {}).get("test", {}).get("accuracy"),
        "local_only_test_accuracy": refs.get("local_only", {}).get("test", {}).get("accuracy"),
        "sparse_bytes_per_site_per_round": comm["sparse_bytes_per_site_per_round_mean"],
        "dense_bytes_per_site_per_round": comm["dense_fedavg_bytes_per_site_per_round"],
        "communication_ratio": comm["ratio_sparse_to_dense"],
        "mask_agreement_bytes_total": comm["mask_agreement_bytes_total"],
        "k": fed["k"],
        "head_parameters": fed["head_parameters"],
        "aggregation": args.aggregation,
        "dp_epsilon": (fed.get("privacy") or {}).get("epsilon_per_round", {}).get(str(args.rounds)),
        "wall_seconds": report["seconds"]["total"],
    }
    write_json(out / "report.json", report, indent=2)  # standard JSON (a NaN metric is null)
    plot(report, out / "report.png")
    print(json.dumps(report["summary"], indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
