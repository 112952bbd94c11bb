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
def _site_vector(site: int) -> np.ndarray:
    """Deterministic stand-in for one site's update: weight-sized values (|x| < 0.2)."""
    rng = np.random.default_rng(1000 + site)
    return (rng.normal(0.0, 0.05, size=LENGTH)).clip(-0.2, 0.2).astype(np.float32)


def _secagg_apps(out: Path, clipping_range: float, max_weight: float) -> tuple[Any, Any]:
    from flwr.app import Context, Message
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
    from flwr.serverapp import Grid, ServerApp

    client = ClientApp(mods=[secaggplus_mod])

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        site = int(context.node_config["partition-id"])
        fitres = FitRes(
            Status(Code.OK, ""), ndarrays_to_parameters([_site_vector(site)]), SITE_EXAMPLES[site], {}
        )
        return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        n = len(SITE_EXAMPLES)
        strategy = LegacyFedAvg(
            initial_parameters=ndarrays_to_parameters([np.zeros(LENGTH, np.float32)]),
            min_fit_clients=n,
            min_available_clients=n,
            fraction_evaluate=0.0,
        )
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
        secagg = SecAggPlusWorkflow(
            num_shares=n, reconstruction_threshold=2, clipping_range=clipping_range, max_weight=max_weight
        )
        t0 = time.perf_counter()
        DefaultWorkflow(fit_workflow=secagg)(grid, legacy)
        agg = parameters_to_ndarrays(
            compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD], True)
        )
        np.save(out / "secagg_aggregate.npy", agg[0])
        (out / "secagg_seconds.txt").write_text(f"{time.perf_counter() - t0:.2f}")

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
        result = Path(tmp) / "secagg_aggregate.npy"
        if rc != 0 or not result.is_file():
            raise SystemExit(f"the SecAgg+ simulation failed (exit code {rc}); see the log above")
        agg = np.load(result)
        protocol_s = float((Path(tmp) / "secagg_seconds.txt").read_text())
    vectors = np.stack([_site_vector(i).astype(np.float64) for i in range(len(SITE_EXAMPLES))])
    w = np.asarray(SITE_EXAMPLES, dtype=np.float64)
    clear = (w[:, None] * vectors).sum(0) / w.sum()
    err = np.abs(agg - clear)
    return {
        "sites": len(SITE_EXAMPLES),
        "examples": list(SITE_EXAMPLES),
        "vector_length": LENGTH,
        "clipping_range": clipping_range,
        "quantization_range": 2**22,
        "max_weight": max_weight,
        "max_abs_error": float(err.max()),
        "mean_abs_error": float(err.mean()),
        "value_scale_std": float(vectors.std()),
        "quantization_step": 2 * clipping_range / 2**22,
        "protocol_seconds": protocol_s,
        "wall_seconds": wall,
    }


# -------------------------------------------------------------------------------------- accountant
def accountant(rounds: int = 3, delta: float = 1e-5) -> list[dict[str, Any]]:
    """Our accountants beside Flower's RdpAccountant and dp_accounting's PLD (None where not installed)."""
    from shpeft_monai.fl.privacy import epsilon, noise_multiplier_for

    sigmas = sorted(
        {0.5, 1.0, 2.0, 5.0, *(round(noise_multiplier_for(e, rounds, delta), 4) for e in (8.0, 2.0))}
    )
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


# --------------------------------------------------------------------------------------------- cli
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["sweep", "accountant", "secagg", "_secagg_run"])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--clipping-range", type=float, default=8.0)
    p.add_argument("--max-weight", type=float, default=100.0)
    args = p.parse_args(argv)
    if args.part == "_secagg_run":
        _secagg_run(args.out, args.clipping_range, args.max_weight)
    elif args.part == "secagg":
        print(json.dumps(secagg(args.clipping_range, args.max_weight), indent=2))
    elif args.part == "accountant":
        for row in accountant():
            print(json.dumps(row))
    else:
        raise SystemExit("sweep: not written yet")


if __name__ == "__main__":
    main()
