"""Privacy benchmarks for federated SH-PEFT (issue 12; docs/federated_privacy.md).

``python -m benchmarks.fed_privacy <part>``:

- ``sweep``: test accuracy against epsilon. Runs the federated simulation driver once per epsilon in
  {inf (non-private), 8, 2} at delta 1e-5 with the same seed, one run at a time, and writes
  ``benchmarks/results/fed_privacy.{json,md}``.
- ``accountant``: the accountant of :mod:`shpeft_monai.fl.privacy` beside Flower's ``RdpAccountant``
  and ``dp_accounting``'s PLD accountant (both need the optional ``dp-accounting`` package).
- ``secagg``: a Flower simulation proving that Flower's SecAgg+ (``SecAggPlusWorkflow`` +
  ``secaggplus_mod``) sums a fixed-length sparse vector (k values then the head) inside a Message-API
  ``ServerApp`` (``@app.main()``), and how close its example-weighted mean is to the one in clear.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
LENGTH = 2146 + 770  # the simulation's payload: k = 2,146 ViT-S/14 values then the 770-value head
SITE_EXAMPLES = (96, 80, 64)


# ------------------------------------------------------------------------------------------ secagg
def _site_vector(site: int, rnd: int) -> np.ndarray:
    """Deterministic stand-in for one site's update in round ``rnd``: weight-sized values (|x| < 0.3)."""
    rng = np.random.default_rng(1000 * rnd + site)
    return (rng.normal(0.0, 0.05, size=LENGTH)).clip(-0.2, 0.2).astype(np.float32) + np.float32(0.05 * rnd)


def _secagg_apps(out: Path, clipping_range: float, max_weight: float) -> tuple[Any, Any]:
    """A ClientApp with ``secaggplus_mod`` and a Message-API ServerApp whose own round loop calls
    ``SecAggPlusWorkflow`` once per round (no ``DefaultWorkflow``)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import LegacyContext
    from flwr.server.compat.app_utils import start_update_client_manager_thread
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
    from flwr.serverapp import Grid, ServerApp

    client = ClientApp(mods=[secaggplus_mod])

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        site, rnd = int(context.node_config["partition-id"]), int(msg.metadata.group_id)
        params = ndarrays_to_parameters([_site_vector(site, rnd)])
        fitres = FitRes(Status(Code.OK, ""), params, SITE_EXAMPLES[site], {})
        # SecAgg+ reads the reply in the legacy FitRes record layout ("fitres.parameters", ...)
        return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        n = len(SITE_EXAMPLES)
        strategy = LegacyFedAvg(min_fit_clients=n, min_available_clients=n, fraction_evaluate=0.0)
        legacy = LegacyContext(context=context, strategy=strategy)  # the workflow refuses anything else
        thread, stop, registered = start_update_client_manager_thread(grid, legacy.client_manager)
        registered.wait()
        secagg = SecAggPlusWorkflow(
            num_shares=n, reconstruction_threshold=2, clipping_range=clipping_range, max_weight=max_weight
        )
        init = compat.parameters_to_arrayrecord(ndarrays_to_parameters([np.zeros(LENGTH, np.float32)]), True)
        legacy.state.array_records[MAIN_PARAMS_RECORD] = init
        seconds = []
        for rnd in (1, 2):
            legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: rnd})
            t0 = time.perf_counter()
            secagg(grid, legacy)
            seconds.append(time.perf_counter() - t0)
            record: ArrayRecord = legacy.state.array_records[MAIN_PARAMS_RECORD]
            agg = parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, True))[0]
            np.save(out / f"secagg_round{rnd}.npy", agg)
        (out / "secagg_seconds.json").write_text(json.dumps(seconds))
        stop.set()
        thread.join()

    return server, client


def _secagg_run(out: Path, clipping_range: float, max_weight: float) -> None:
    from flwr.simulation import run_simulation

    server, client = _secagg_apps(out, clipping_range, max_weight)
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=len(SITE_EXAMPLES),
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )


def secagg(clipping_range: float = 8.0, max_weight: float = 100.0) -> dict[str, Any]:
    """Run the SecAgg+ prototype in its own process group and compare it with the mean in clear."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "benchmarks.fed_privacy", "_secagg_run", "--out", tmp]
        cmd += ["--clipping-range", str(clipping_range), "--max-weight", str(max_weight)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
        try:
            rc = proc.wait(timeout=900)
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
                time.sleep(1)
        wall = time.perf_counter() - t0
        results = [Path(tmp) / f"secagg_round{r}.npy" for r in (1, 2)]
        if rc != 0 or not all(f.is_file() for f in results):
            raise SystemExit(f"the SecAgg+ simulation failed (exit code {rc}); see the log above")
        aggs = [np.load(f) for f in results]
        protocol_s = json.loads((Path(tmp) / "secagg_seconds.json").read_text())
    w = np.asarray(SITE_EXAMPLES, dtype=np.float64)
    errors, scale = [], []
    for rnd, agg in zip((1, 2), aggs):
        vectors = np.stack([_site_vector(i, rnd).astype(np.float64) for i in range(len(SITE_EXAMPLES))])
        clear = (w[:, None] * vectors).sum(0) / w.sum()
        errors.append(np.abs(agg - clear))
        scale.append(vectors.std())
    err = np.concatenate(errors)
    return {
        "sites": len(SITE_EXAMPLES),
        "examples": list(SITE_EXAMPLES),
        "vector_length": LENGTH,
        "clipping_range": clipping_range,
        "quantization_range": 2**22,
        "max_weight": max_weight,
        "max_abs_error": float(err.max()),
        "mean_abs_error": float(err.mean()),
        "rounds": 2,
        "value_scale_std": float(min(scale)),
        "quantization_step": 2 * clipping_range / 2**22,
        "protocol_seconds_per_round": protocol_s,
        "wall_seconds": wall,
    }


# -------------------------------------------------------------------------------------- accountant
def accountant(rounds: int = 3, delta: float = 1e-5) -> list[dict[str, Any]]:
    """Our accountants beside Flower's RdpAccountant and dp_accounting's PLD (None where not installed)."""
    from shpeft_monai.fl.privacy import epsilon, noise_multiplier_for

    sigmas = sorted({0.5, 1.0, 2.0, 5.0, *(noise_multiplier_for(e, rounds, delta) for e in (8.0, 2.0))})
    rows = []
    for sigma in sigmas:
        row: dict[str, Any] = {"noise_multiplier": sigma, "rounds": rounds, "delta": delta}
        row.update({m: epsilon(sigma, rounds, delta, method=m) for m in ("gdp", "rdp", "zcdp")})
        row["flwr_rdp"] = row["dp_accounting_pld"] = None
        try:
            from flwr.serverapp import (
                GaussianPrivacyEvent,
                NeighboringRelation,
                RdpAccountant,
                SamplingMethod,
            )
            from flwr.serverapp import PrivacyConfig as FlowerPrivacyConfig

            cfg = FlowerPrivacyConfig(
                delta, 3, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION
            )
            acc = RdpAccountant(cfg)
            acc.compose(GaussianPrivacyEvent(sigma, 3, 3), count=rounds)
            row["flwr_rdp"] = acc.get_epsilon(delta)
            from dp_accounting import dp_event
            from dp_accounting.pld import pld_privacy_accountant

            pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
            pld.compose(dp_event.GaussianDpEvent(sigma), rounds)
            row["dp_accounting_pld"] = pld.get_epsilon(delta)
        except ImportError:
            pass
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------- robust
def robust(seed: int = 0) -> list[dict[str, Any]]:
    """Shift of each rule's aggregate when one extra site sends 1e3-times-larger finite values, in units
    of the honest sites' spread (L2 norm of the per-coordinate standard deviation across honest sites).

    Synthetic updates shaped like the simulation's (2,916 values: a shared update of scale 1e-3 plus
    site scatter of 1e-4); the attacker scales an honest update by 1e3, which validation lets through.
    """
    from shpeft_monai.fl.robust import aggregate

    rows = []
    for honest_n in (2, 4, 5, 9):
        rng = np.random.default_rng(seed)
        base = rng.normal(0.0, 1e-3, size=LENGTH)
        honest = [base + rng.normal(0.0, 1e-4, size=LENGTH) for _ in range(honest_n)]
        spread = float(np.linalg.norm(np.std(np.stack(honest), axis=0)))
        for rule, frac in (("mean", 0.2), ("median", 0.2), ("trimmed_mean", 0.2), ("trimmed_mean", 0.34)):
            clean = aggregate(honest, [96.0] * honest_n, rule, frac)
            attacked = aggregate([*honest, honest[0] * 1e3], [96.0] * (honest_n + 1), rule, frac)
            shift = float(np.linalg.norm(attacked - clean))
            rows.append(
                {
                    "sites": honest_n + 1,
                    "rule": rule,
                    "trim_fraction": frac if rule == "trimmed_mean" else None,
                    "shift_over_spread": shift / spread,
                }
            )
    return rows


# ------------------------------------------------------------------------------------------- sweep
DRIVER = "shpeft_monai.fl.simulate"
DP_FLAGS = ("--dp-epsilon", "--dp-delta", "--dp-clip")  # the simulation driver's options (issue 12 wiring)


def _label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


PROBE = (1e6, 1e-15)  # clip that never binds and noise std 1e-9: a non-private run that logs update norms


def _mean_norm(fed: dict[str, Any]) -> float:
    """Mean over rounds of the sites' (example-weighted) pre-clip update norm, from the report."""
    norms = [m["dp-norm"] for m in (fed.get("train_metrics_per_round") or {}).values() if "dp-norm" in m]
    if not norms:
        raise SystemExit("the probe run reported no dp-norm: is DP wired into the client app?")
    return float(np.mean(norms))


def _run(
    driver: str, run_dir: Path, seed: int, extra: list[str], dp: list[str]
) -> tuple[dict[str, Any], str, float]:
    cmd = [
        sys.executable,
        "-m",
        driver,
        "--out",
        str(run_dir),
        "--seed",
        str(seed),
        "--no-baselines",
        *extra,
        *dp,
    ]
    print("+", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    report = json.loads((run_dir / "report.json").read_text())
    return report, "python -m " + " ".join(cmd[3:]), time.perf_counter() - t0


def sweep(
    epsilons: list[float],
    delta: float,
    seed: int,
    out: Path,
    extra: list[str],
    clip: float | None = None,
    driver: str = DRIVER,
    probe_as_inf: bool = False,
) -> dict[str, Any]:
    """One federated simulation per epsilon (same seed, one at a time); ``inf`` runs without DP.

    ``clip=None`` first runs a *probe*: DP switched on with a clip that never binds (1e6) and noise of
    std 1e-9, i.e. a non-private run that reports the sites' update norms; the clip is then their
    mean. With ``probe_as_inf`` the probe also serves as the ``inf`` row (one run fewer). The
    centralised and local-only references are skipped (``--no-baselines``): they do not depend on
    epsilon and are in ``benchmarks/results/fed_sim.json``. ``extra`` goes to the driver as is.
    """
    from shpeft_monai.fl.privacy import noise_multiplier_for

    help_text = subprocess.run(
        [sys.executable, "-m", driver, "--help"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    missing = [f for f in (*DP_FLAGS, "--dp-noise-multiplier") if f not in help_text]
    if missing:
        raise SystemExit(f"python -m {driver} has no {missing} option(s): wire DP into the driver first")
    rows: list[dict[str, Any]] = []

    def row(
        eps: float | None, report: dict[str, Any], command: str, wall: float, **kw: Any
    ) -> dict[str, Any]:
        test, fed = report["federated_test"], report["federated"]
        rounds = int(fed["settings"].get("num_server_rounds", 0)) or 1
        return {
            "epsilon": eps,
            "delta": None if eps is None else delta,
            "clip": None if eps is None else clip,
            "noise_multiplier_expected": 0.0 if eps is None else noise_multiplier_for(eps, rounds, delta),
            "privacy_reported": fed.get("privacy"),
            "rounds": rounds,
            "test_accuracy": test.get("accuracy"),
            "test_macro_f1": test.get("f1"),
            "test_auc": test.get("auc"),
            "test_images": report.get("test_images"),
            "accuracy_per_round": fed.get("accuracy_per_round"),
            "train_metrics_per_round": fed.get("train_metrics_per_round"),
            "rejected_replies": fed.get("rejected_replies"),
            "command": command,
            "wall_seconds": wall,
            **kw,
        }

    if clip is None:
        dp = ["--dp-noise-multiplier", f"{PROBE[1]:g}", DP_FLAGS[1], str(delta), DP_FLAGS[2], f"{PROBE[0]:g}"]
        report, command, wall = _run(driver, out / "probe", seed, extra, dp)
        clip = _mean_norm(report["federated"])
        print(f"clip = mean update norm of the probe run: {clip:.6g}", flush=True)
        rows.append(row(None, report, command, wall, probe=True))
    for eps in epsilons:
        if math.isinf(eps) and probe_as_inf and rows:
            continue
        dp = (
            []
            if math.isinf(eps)
            else [DP_FLAGS[0], str(eps), DP_FLAGS[1], str(delta), DP_FLAGS[2], f"{clip:.6g}"]
        )
        report, command, wall = _run(driver, out / f"eps-{_label(eps)}", seed, extra, dp)
        rows.append(row(None if math.isinf(eps) else eps, report, command, wall, probe=False))
    return {"seed": seed, "delta": delta, "clip": clip, "runs": rows}


# ----------------------------------------------------------------------------------------- results
def _update_results(key: str, value: Any, command: str) -> None:
    from benchmarks.common import machine_facts, package_version, write_json

    path = RESULTS / "fed_privacy.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    versions = {p: package_version(p) for p in ("flwr", "dp-accounting")}
    data[key] = {"command": command, "result": value, "versions": versions, "machine": machine_facts()}
    write_json(path, data, indent=2)
    (RESULTS / "fed_privacy.md").write_text(render(data))


def _f(x: Any, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _sweep_lines(part: dict[str, Any], title: str) -> list[str]:
    sw = part["result"]
    lines = [f"## {title}", "", f"`{part['command']}`", ""]
    if sw.get("commit"):
        lines += [f"Glue at commit {sw['commit']}.", ""]
    lines += [
        f"Seed {sw['seed']}; L2 clip {_f(sw['clip'], '.4g')} on the change of the k values and the head (the "
        "mean update norm of the probe run). Update norm: mean pre-clip norm of a site's change per round; "
        "clipped: share of site updates clipped.",
        "",
        "| epsilon (delta 1e-5) | noise multiplier | test accuracy | macro F1 | AUC | update norm | clipped | wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sw["runs"]:
        eps = f"{r['epsilon']:g}" if r["epsilon"] is not None else "inf (no DP)"
        if r.get("probe"):
            eps = "inf (probe: clip 1e6, noise std 1e-9)"
        z = (r.get("privacy_reported") or {}).get("noise_multiplier", r["noise_multiplier_expected"])
        tm = list((r.get("train_metrics_per_round") or {}).values())
        norm = float(np.mean([m["dp-norm"] for m in tm])) if tm and all("dp-norm" in m for m in tm) else None
        clipped = (
            float(np.mean([m["dp-clipped"] for m in tm]))
            if tm and all("dp-clipped" in m for m in tm)
            else None
        )
        lines.append(
            f"| {eps} | {_f(z, '.3g')} | {_f(r['test_accuracy'])} | {_f(r['test_macro_f1'])} | {_f(r['test_auc'])} "
            f"| {_f(norm, '.4g')} | {_f(clipped, '.0%')} | {_f(r['wall_seconds'], '.0f')} |"
        )
    return [*lines, "", *[f"- {n}" for n in sw.get("notes", [])], ""] if sw.get("notes") else [*lines, ""]


def render(data: dict[str, Any]) -> str:
    """Markdown report of whatever parts ``fed_privacy.json`` holds."""
    lines = [
        "# Federated SH-PEFT: privacy benchmarks",
        "",
        "Written by `benchmarks/fed_privacy.py`; see docs/federated_privacy.md.",
        "",
    ]
    for key, title in (
        ("sweep", "Test accuracy against epsilon"),
        ("sweep_rerun", "Before the mask-agreement fix: rerun on one commit"),
        ("sweep_before_fix", "Before the mask-agreement fix: first sweep"),
    ):
        if key in data:
            lines += _sweep_lines(data[key], title)
    if "accountant" in data:
        lines += [
            "## Accountant cross-check (full participation, 3 rounds, delta 1e-5)",
            "",
            f"`{data['accountant']['command']}`",
            "",
            f"flwr {data['accountant']['versions']['flwr']}, dp-accounting "
            f"{data['accountant']['versions']['dp-accounting']} (n/a columns: that package is not installed).",
            "",
        ]
        lines += [
            "| noise multiplier | exact GDP (ours) | dp_accounting PLD | RDP (ours) | Flower RdpAccountant | zCDP (ours) |",
            "|---|---|---|---|---|---|",
        ]
        for r in data["accountant"]["result"]:
            lines.append(
                f"| {r['noise_multiplier']:.4f} | {r['gdp']:.4f} | {_f(r['dp_accounting_pld'], '.4f')} | {r['rdp']:.4f} | {_f(r['flwr_rdp'], '.4f')} | {r['zcdp']:.4f} |"
            )
        lines.append("")
    if "robust" in data:
        lines += [
            "## Robust aggregation: one site sends 1e3-times-larger finite values",
            "",
            f"`{data['robust']['command']}`",
            "",
        ]
        lines += [
            "Shift of the aggregate in units of the honest sites' spread (< 1 meets the issue's target).",
            "",
        ]
        lines += [
            "| sites (1 attacker) | mean | median | trimmed mean 0.2 | trimmed mean 0.34 |",
            "|---|---|---|---|---|",
        ]
        by_sites: dict[int, list[float]] = {}
        for r in data["robust"]["result"]:
            by_sites.setdefault(r["sites"], []).append(r["shift_over_spread"])
        for n, shifts in sorted(by_sites.items()):
            lines.append(f"| {n} | " + " | ".join(f"{x:.2f}" for x in shifts) + " |")
        lines.append("")
    if "secagg" in data:
        r = data["secagg"]["result"]
        lines += ["## SecAgg+ prototype (Flower 1.41, simulation)", "", f"`{data['secagg']['command']}`", ""]
        lines += [
            f"- {r['sites']} sites ({r['examples']} examples), a {r['vector_length']}-value vector each, {r['rounds']} rounds "
            "driven by the ServerApp's own loop (`SecAggPlusWorkflow` called once per round).",
            f"- Example-weighted mean recovered to max |error| {r['max_abs_error']:.2e} (mean {r['mean_abs_error']:.2e}); "
            f"quantisation step {r['quantization_step']:.2e} (clipping_range {r['clipping_range']:g}, "
            f"quantization_range 2^22, max_weight {r['max_weight']:g}); values have std {r['value_scale_std']:.3f}.",
            f"- Protocol time per round: {', '.join(f'{x:.2f} s' for x in r['protocol_seconds_per_round'])} "
            f"(the first includes starting the simulated sites); whole run {r['wall_seconds']:.0f} s.",
            "",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- cli
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["sweep", "accountant", "robust", "secagg", "_secagg_run"])
    p.add_argument("--out", type=Path, default=Path("runs/fed-privacy"), help="run folder (sweep)")
    p.add_argument("--epsilons", default="inf,8,2", help="comma-separated; inf = no DP")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dp-clip", default="auto", help="L2 clip of a site's change; auto = from a probe run")
    p.add_argument("--probe-as-inf", action="store_true", help="the probe run is the inf row (one run fewer)")
    p.add_argument("--driver", default=DRIVER, help="simulation module run with python -m")
    p.add_argument("--clipping-range", type=float, default=8.0, help="SecAgg+ clipping range")
    p.add_argument("--max-weight", type=float, default=100.0, help="SecAgg+ max weight")
    p.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/results alone")
    args, extra = p.parse_known_args(argv)
    command = "python -m benchmarks.fed_privacy " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.part == "_secagg_run":
        _secagg_run(args.out, args.clipping_range, args.max_weight)
        return
    if args.part == "secagg":
        result: Any = secagg(args.clipping_range, args.max_weight)
    elif args.part == "accountant":
        result = accountant(delta=args.delta)
    elif args.part == "robust":
        result = robust(args.seed)
    else:
        try:
            epsilons = [float(e) for e in args.epsilons.split(",")]
        except ValueError:
            p.error(f"--epsilons must be comma-separated numbers or inf, got {args.epsilons!r}")
        if any(not e > 0 for e in epsilons):
            p.error(f"--epsilons must be > 0 (inf = no DP), got {args.epsilons!r}")
        clip = None if args.dp_clip == "auto" else float(args.dp_clip)
        result = sweep(epsilons, args.delta, args.seed, args.out, extra, clip, args.driver, args.probe_as_inf)
    print(json.dumps(result, indent=2))
    if not args.no_write:
        _update_results(args.part, result, command)


if __name__ == "__main__":
    main()
