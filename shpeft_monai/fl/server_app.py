"""Flower ServerApp: agree on one SH-PEFT mask, run sparse FedAvg rounds, save the global delta.

The server builds the base network exactly as the sites' bundles do (:func:`task.base_network`,
from its own local weights, never shipped in the app bundle) for the task-agnostic importance, the
base fingerprint and the initial head; it never builds a dense update. With ``server-datalist`` (a
datalist the server may read) or evaluation records from a driver it scores the global delta after
every round; otherwise the sites evaluate on their own validation data and report metrics only.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from shpeft_monai.fl import codec

__all__ = ["app", "dense_round_bytes", "make_server_app", "run_server"]

logger = logging.getLogger(__name__)


def dense_round_bytes(model: Any) -> int:
    """Serialised size of one dense FedAvg message of ``model`` (all parameters as float32)."""
    import torch

    arrays = ArrayRecord(
        {
            n: codec._array(p.detach().to(torch.float32).numpy())
            for n, p in model.state_dict().items()
            if p.is_floating_point()
        }
    )
    config = ConfigRecord({"server-round": 1, "local-epochs": 1})
    return codec.record_nbytes(RecordDict({codec.ARRAYS: arrays, codec.CONFIG: config}))


def _communication(strategy: Any, dense: int) -> dict[str, Any]:
    comm = strategy.comm_by_round()
    per_site_round = [r["sent"] + r["received"] for r in comm if r["phase"] == "train"]
    mean_sparse = float(np.mean(per_site_round)) if per_site_round else 0.0
    agreement = sum(r["sent"] + r["received"] for r in comm if r["phase"] in ("candidates", "mask"))
    return {
        "per_site_per_round": comm,
        "dense_fedavg_bytes_per_message": dense,
        "dense_fedavg_bytes_per_site_per_round": 2 * dense,
        "sparse_bytes_per_site_per_round_mean": mean_sparse,
        "ratio_sparse_to_dense": mean_sparse / (2 * dense),
        "mask_agreement_bytes_total": int(agreement),
    }


def run_server(
    grid: Grid,
    s: Any,
    *,
    eval_records: Sequence[Mapping[str, Any]] | None = None,
    out_dir: str | Path | None = None,
    metered: bool | None = None,
) -> dict[str, Any]:
    """The whole federated run; returns the report (also written to ``out_dir/federated.json``)."""
    import torch

    from shpeft_monai import SparseDelta, inject
    from shpeft_monai.agreement import budget
    from shpeft_monai.fl import privacy
    from shpeft_monai.fl.mask_round import agree
    from shpeft_monai.fl.metered import MeteredSparseFedAvg
    from shpeft_monai.fl.strategy import SparseDeltaFedAvg
    from shpeft_monai.fl.task import base_network, evaluate_records, load_global
    from shpeft_monai.io import FEDERATED_REPORT_FILE, GLOBAL_DELTA_FILE, save_delta, write_json
    from shpeft_monai.model import backbone_fingerprint, eligible_parameters, head_parameters
    from shpeft_monai.scoring import task_agnostic_scores

    t0 = time.perf_counter()
    s.set_threads()
    cfg = s.shpeft()
    base = base_network(s)
    params = eligible_parameters(base, cfg)
    head0 = {n: p.detach().float().numpy().copy() for n, p in head_parameters(base, cfg).items()}
    metered = s.account_bytes if metered is None else metered
    strategy = (MeteredSparseFedAvg if metered else SparseDeltaFedAvg)(
        head_shapes={n: t.shape for n, t in head0.items()},
        max_examples=s.max_examples,
        min_train_nodes=s.min_nodes,
        min_available_nodes=s.min_nodes,
        min_evaluate_nodes=s.min_nodes,
        fraction_evaluate=0.0 if eval_records is not None else 1.0,
        aggregation=s.aggregation,
        trim_fraction=s.trim_fraction,
        server_lr=s.server_lr,
    )
    dp = s.privacy()
    if dp is not None:
        strategy.privacy = {"clip": dp.clip, "noise_multiplier": dp.noise_multiplier, "delta": dp.delta}
    k = budget(cfg, params)  # computed in one place: shpeft_monai.agreement
    initial = codec.update_arrays(np.zeros(k, np.float32), head0)
    mask = agree(
        grid,
        strategy,
        config=cfg,
        task_agnostic=task_agnostic_scores(params, cfg.agnostic_estimator),
        base_fingerprint=backbone_fingerprint(base, cfg),
        initial_arrays=initial,
        candidate_factor=s.candidate_factor,
        timeout=s.round_timeout,
    )
    if strategy.initial_head is not None:  # rounds start from the sites' warmed-up heads
        initial = codec.update_arrays(np.zeros(k, np.float32), strategy.initial_head)
    t_mask = time.perf_counter() - t0
    strategy.summary()

    per_round: dict[int, dict[str, float]] = {}
    evaluate_fn = None
    if eval_records is not None:
        model = inject(copy.deepcopy(base), mask, cfg)

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            values, head = codec.split_arrays(arrays)
            load_global(model, mask, values, head, cfg)
            per_round[server_round] = evaluate_records(model, list(eval_records), s)
            logger.info("round %d: server-side validation %s", server_round, per_round[server_round])
            return MetricRecord(per_round[server_round])

    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=s.num_server_rounds,
        timeout=s.round_timeout,
        train_config=ConfigRecord({"local-epochs": s.local_epochs}),
        evaluate_config=ConfigRecord({}),
        evaluate_fn=evaluate_fn,
    )
    values, head = codec.split_arrays(result.arrays)
    delta = SparseDelta(
        mask,
        mask.unpack(torch.from_numpy(values.copy())),
        {n: torch.from_numpy(t.copy()) for n, t in head.items()},
        cfg.to_dict(),
        {"federated": True, "rounds": s.num_server_rounds},
    )
    if not per_round:
        per_round = {int(r): dict(m) for r, m in result.evaluate_metrics_clientapp.items()}
    report: dict[str, Any] = {
        "settings": dataclasses.asdict(s),
        "k": mask.k,
        "head_parameters": int(sum(t.size for t in head.values())),
        "model_parameters": int(sum(p.numel() for p in base.parameters())),
        "eligible_weights": int(sum(p.numel() for p in params.values())),
        "mask_fingerprint": mask.fingerprint,
        "base_fingerprint": mask.base_fingerprint,
        "aggregation": {"rule": s.aggregation, "trim_fraction": s.trim_fraction, "server_lr": s.server_lr},
        "accuracy_per_round": {str(r): m.get("accuracy") for r, m in sorted(per_round.items())},
        "metrics_per_round": {str(r): m for r, m in sorted(per_round.items())},
        "train_metrics_per_round": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
        "rejected_replies": strategy.rejected,
        "seconds": {"mask_agreement": t_mask, "total": time.perf_counter() - t0},
    }
    if dp is not None:
        eps = {
            r: privacy.epsilon(dp.noise_multiplier, r, dp.delta) for r in range(1, s.num_server_rounds + 1)
        }
        for r, e in eps.items():
            logger.info("round %d: site-level DP epsilon %.3f at delta %g", r, e, dp.delta)
        report["privacy"] = {**strategy.privacy, "epsilon_per_round": {str(r): e for r, e in eps.items()}}
    if metered:
        report["communication"] = _communication(strategy, dense_round_bytes(base))
        report["aggregation_per_round"] = strategy.aggregation_log
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_delta(out / GLOBAL_DELTA_FILE, delta)
        write_json(out / FEDERATED_REPORT_FILE, report, indent=2)
        report["delta_path"] = str(out / GLOBAL_DELTA_FILE)
    return report


def make_server_app(
    overrides: Mapping[str, Any] | None = None,
    eval_records: Sequence[Mapping[str, Any]] | None = None,
    out_dir: str | Path | None = None,
    metered: bool | None = None,
) -> ServerApp:
    """A ServerApp; ``overrides`` (simulation) take the place of an empty run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from shpeft_monai.fl.task import Settings

        s = Settings.from_config(context.run_config, overrides)
        records = eval_records
        if records is None and s.server_datalist:
            from shpeft_monai.data import load_split

            records = load_split(s.server_datalist)["validation"]
        run_server(grid, s, eval_records=records, out_dir=out_dir or s.out, metered=metered)

    return app


app = make_server_app()
