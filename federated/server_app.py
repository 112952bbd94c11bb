"""Flower ServerApp: agree on one SH-PEFT mask, run sparse FedAvg rounds, save the global delta.

The server builds the base model from its own local weights (never shipped in the app bundle) to
compute task-agnostic importance and the base fingerprint; it never builds a dense model update.
With ``server-eval = "validation"`` (or ``server-datalist`` = a JSON datalist the server may
read) it evaluates the global delta centrally after every round; otherwise the sites evaluate on
their own validation data and report metrics only.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from federated import codec
from federated.strategy import SparseDeltaFedAvg

logger = logging.getLogger(__name__)

__all__ = ["app", "dense_round_bytes", "make_server_app", "run_server"]


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
    return codec.record_nbytes(
        RecordDict({codec.ARRAYS: arrays, codec.CONFIG: ConfigRecord({"server-round": 1, "local-epochs": 1})})
    )


def run_server(
    grid: Grid,
    s: Any,
    *,
    eval_records: Sequence[dict[str, Any]] | None = None,
    out_dir: str | Path | None = None,
    timeout: float = 3600,
) -> dict[str, Any]:
    """The whole federated run; returns the report (also written to ``out_dir/federated.json``)."""
    from federated.task import evaluate_model, inject_fresh, load_global, make_loader, set_threads, to_delta
    from shpeft_monai.io import FEDERATED_REPORT_FILE, GLOBAL_DELTA_FILE, save_delta, write_json
    from shpeft_monai.model import backbone_fingerprint, eligible_parameters, head_parameters
    from shpeft_monai.scoring import task_agnostic_scores

    t0 = time.perf_counter()
    set_threads(s)
    cfg = s.shpeft()
    from federated.task import build_model

    base = build_model(s)
    params = eligible_parameters(base, cfg)
    n_eligible = sum(p.numel() for p in params.values())
    k = cfg.budget_for(n_eligible)
    ta = task_agnostic_scores(params, cfg.agnostic_estimator)
    base_fp = backbone_fingerprint(base, cfg)
    head0 = {n: p.detach().float().numpy().copy() for n, p in head_parameters(base, cfg).items()}
    n_params = sum(p.numel() for p in base.parameters())
    dense = dense_round_bytes(base)
    del base, params

    strategy = SparseDeltaFedAvg(
        head_shapes={n: t.shape for n, t in head0.items()},
        max_examples=s.max_examples,
        min_train_nodes=s.min_nodes,
        min_available_nodes=s.min_nodes,
        min_evaluate_nodes=s.min_nodes,
        fraction_evaluate=0.0 if eval_records is not None else 1.0,
    )
    initial = codec.update_arrays(np.zeros(k, np.float32), head0)
    mask = strategy.agree_mask(
        grid,
        config=cfg,
        task_agnostic=ta,
        base_fingerprint=base_fp,
        initial_arrays=initial,
        candidate_factor=s.candidate_factor,
        timeout=timeout,
    )
    t_mask = time.perf_counter() - t0

    evaluate_fn = None
    per_round: dict[int, dict[str, float]] = {}
    if eval_records is not None:
        loader = make_loader(eval_records, s, train=False)

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            values, head = codec.split_arrays(arrays)
            model, _ = inject_fresh(s, mask)
            load_global(model, mask, values, head, cfg)
            metrics = evaluate_model(model, loader)
            per_round[server_round] = metrics
            logger.info("round %d: server-side validation %s", server_round, metrics)
            return MetricRecord(metrics)

    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=s.num_server_rounds,
        timeout=timeout,
        train_config=ConfigRecord({"local-epochs": s.local_epochs, "lr": s.lr, "head-lr": s.head_lr}),
        evaluate_config=ConfigRecord({}),
        evaluate_fn=evaluate_fn,
    )
    values, head = codec.split_arrays(result.arrays)
    delta = to_delta(mask, values, head, cfg, meta={"federated": True, "rounds": s.num_server_rounds})
    if not per_round:
        for rnd, m in result.evaluate_metrics_clientapp.items():
            per_round[int(rnd)] = dict(m)
    comm = strategy.comm_by_round()
    train_rows = [r for r in comm if r["phase"] == "train"]
    per_site_round = [r["sent"] + r["received"] for r in train_rows]
    mean_sparse = float(np.mean(per_site_round)) if per_site_round else 0.0
    report: dict[str, Any] = {
        "settings": dataclasses.asdict(s),
        "k": mask.k,
        "head_parameters": int(sum(t.size for t in head.values())),
        "model_parameters": int(n_params),
        "eligible_weights": int(n_eligible),
        "mask_fingerprint": mask.fingerprint,
        "base_fingerprint": base_fp,
        "accuracy_per_round": {str(r): m.get("accuracy") for r, m in sorted(per_round.items())},
        "metrics_per_round": {str(r): m for r, m in sorted(per_round.items())},
        "train_metrics_per_round": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
        "communication": {
            "per_site_per_round": comm,
            "dense_fedavg_bytes_per_message": dense,
            "dense_fedavg_bytes_per_site_per_round": 2 * dense,
            "sparse_bytes_per_site_per_round_mean": mean_sparse,
            "ratio_sparse_to_dense": mean_sparse / (2 * dense),
            "mask_agreement_bytes_total": int(
                sum(r["sent"] + r["received"] for r in comm if r["phase"] in ("candidates", "mask"))
            ),
        },
        "rejected_replies": strategy.rejected,
        "aggregation_per_round": strategy.aggregation,
        "seconds": {"mask_agreement": t_mask, "total": time.perf_counter() - t0},
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_delta(out / GLOBAL_DELTA_FILE, delta)
        write_json(out / FEDERATED_REPORT_FILE, report, indent=2)
        report["delta_path"] = str(out / GLOBAL_DELTA_FILE)
    return report


def make_server_app(
    overrides: dict[str, Any] | None = None,
    eval_records: Sequence[dict[str, Any]] | None = None,
    out_dir: str | Path | None = None,
) -> ServerApp:
    """A ServerApp; ``overrides`` (simulation) take the place of an empty run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from federated.task import FedSettings

        s = FedSettings.from_config(context.run_config, overrides or {})
        records = eval_records
        if records is None:
            src = str(context.run_config.get("server-datalist", ""))
            if src:
                from shpeft_monai.data import load_split

                records = load_split(src)["validation"]
        run_server(grid, s, eval_records=records, out_dir=out_dir or s.out, timeout=s.round_timeout)

    return app


app = make_server_app()
