"""Flower ClientApp of a site (hospital): calibrate, store the agreed mask, train and evaluate locally.

Where a site's data and weights come from (node config, ``flower-supernode --node-config``):

* ``data-list``: a JSON datalist (MONAI style, ``train``/``validation`` lists of ``{"image", "label"}``)
  of this site's own images; or, in simulation, ``partition-id``/``num-partitions`` select this
  site's share of the Br35H training split (:func:`federated.task.site_partition`);
* ``checkpoint``: the local pretrained weights file (timm naming); without it the project's
  converted cache is used (``make weights``);
* any other run-config key (``img-size``, ``batch-size`` ...) may be overridden per node.

Images never leave the site: replies carry candidate indices and scores (once), then k values, the
head and an example count per round. In deployment every message runs in a fresh process, so the
agreed mask is kept in ``context.state``.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from federated import codec

logger = logging.getLogger(__name__)

STATE_MASK, STATE_MASK_CFG = "shpeft-mask", "shpeft-mask-config"


def _settings(context: Context, overrides: dict[str, Any] | None = None):
    from federated.task import FedSettings, set_threads

    s = FedSettings.from_config(context.run_config, overrides or {}, context.node_config)
    set_threads(s)
    return s


def site_records(context: Context, s: Any, split: str) -> list[dict[str, Any]]:
    """This site's records of ``split`` (``train`` or ``validation``)."""
    from federated.task import site_partition
    from shpeft_monai.data import load_split, subsample

    path = context.node_config.get("data-list")
    if path:
        recs = load_split(str(path))[split]
    else:
        pid = int(context.node_config.get("partition-id", 0))
        n = int(context.node_config.get("num-partitions", s.num_sites))
        recs = site_partition(load_split("br35h")[split], n, skew=s.skew, seed=s.seed)[pid]
    limit = s.train_per_site if split == "train" else s.val_limit
    if limit and len(recs) > limit:
        recs = subsample(recs, limit, seed=s.seed)
    if not recs:
        raise ValueError(f"site has no {split} records (node config {dict(context.node_config)})")
    return recs


def make_client_app(overrides: dict[str, Any] | None = None, faults: Any = None) -> ClientApp:
    """A ClientApp; ``overrides`` (simulation) take the place of an empty run config.

    ``faults`` ({site: (kind, round)} or ``"SITE:KIND[:ROUND],..."``) turns on fault drills for those
    simulated sites (:mod:`federated.faults`); a deployed site drills when its node config says so.
    """
    from federated.faults import fault_drill, parse_faults

    site_faults = parse_faults(faults) if isinstance(faults, (str, list, tuple)) else faults
    app = ClientApp(mods=[fault_drill(site_faults)])

    @app.query("candidates")
    def candidates(msg: Message, context: Context) -> Message:
        from federated.agreement import site_candidates
        from federated.task import build_model, make_loader
        from shpeft_monai.calibration import calibrate
        from shpeft_monai.model import backbone_fingerprint, eligible_parameters, head_parameters

        s = _settings(context, overrides)
        cfg = s.shpeft()
        model = build_model(s)
        _, head = codec.split_arrays(msg.content[codec.ARRAYS])
        import torch

        with torch.no_grad():  # calibrate through the server's initial head, identical at every site
            hp = head_parameters(model, cfg)
            for n, t in head.items():
                hp[n].copy_(torch.from_numpy(t))
        fp = backbone_fingerprint(model, cfg)
        params = eligible_parameters(model, cfg)
        recs = site_records(context, s, "train")
        scores = calibrate(
            model, make_loader(recs, s, train=False, shuffle=True), params, cfg, progress=False
        )
        n_top = int(msg.content[codec.CONFIG]["n-candidates"])
        idx, sc = site_candidates(scores, n_top)
        n_eligible = sum(p.numel() for p in params.values())
        content = codec.encode_candidates(
            idx, sc, num_examples=len(recs), base_fingerprint=fp, n_eligible=n_eligible
        )
        return Message(content=content, reply_to=msg)

    @app.query("mask")
    def store_mask(msg: Message, context: Context) -> Message:
        mask = _remember_mask(msg.content, context, codec.MASK, codec.CONFIG)
        return Message(
            content=RecordDict({codec.METRICS: MetricRecord({"mask-ok": 1, "k": mask.k})}), reply_to=msg
        )

    def _global_model(msg: Message, context: Context, s):
        """A fresh base model with the agreed mask and the server's current values and head."""
        from federated.task import inject_fresh, load_global

        mask, fp = _mask_for(msg, context)
        model, cfg = inject_fresh(s, mask)
        values, head, _ = codec.decode_update(
            msg.content,
            mask_fingerprint=fp,
            k=mask.k,
            head_shapes=_head_shapes(model, cfg),
            need_examples=False,
        )
        load_global(model, mask, values, head, cfg)
        return model, mask, fp, cfg

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        import torch

        from federated.task import global_state, make_loader, train_local

        s = _settings(context, overrides)
        cfg_rec = msg.content[codec.CONFIG]
        model, mask, fp, cfg = _global_model(msg, context, s)
        epochs = int(cfg_rec.get("local-epochs", s.local_epochs))
        lr = float(cfg_rec.get("lr", s.lr))
        head_lr = float(cfg_rec.get("head-lr", s.head_lr))
        server_round = int(cfg_rec.get("server-round", 0))
        seed = s.seed + 1009 * server_round  # reproducible per round
        torch.manual_seed(seed)
        loader = make_loader(site_records(context, s, "train"), s, train=True, seed=seed)
        n, loss = train_local(model, loader, s, epochs, lr, head_lr)
        values, head = global_state(model, mask, cfg)
        # echo the round so that the server can refuse a replayed reply from an earlier round
        content = codec.encode_update(
            values,
            head,
            fp,
            num_examples=n,
            metrics={"train-loss": loss},
            config={"server-round": server_round},
        )
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        from federated.task import evaluate_model, make_loader

        s = _settings(context, overrides)
        model, _, _, _ = _global_model(msg, context, s)
        metrics = evaluate_model(model, make_loader(site_records(context, s, "validation"), s, train=False))
        return Message(content=RecordDict({codec.METRICS: MetricRecord(metrics)}), reply_to=msg)

    return app


def _head_shapes(model: Any, cfg: Any) -> dict[str, tuple[int, ...]]:
    from shpeft_monai.model import head_parameters

    return {n: tuple(p.shape) for n, p in head_parameters(model, cfg).items()}


def _remember_mask(content: RecordDict, context: Context, mask_key: str, config_key: str) -> Any:
    mask = codec.decode_mask(content, mask_key, config_key)  # verifies indices vs fingerprint
    context.state[STATE_MASK] = content[mask_key]
    context.state[STATE_MASK_CFG] = content[config_key]
    return mask


def _mask_for(msg: Message, context: Context) -> tuple[Any, str]:
    """The agreed mask named by the message: sent along (first contact) or kept in ``context.state``."""
    fp = str(msg.content[codec.CONFIG].get(codec.MASK_FP, ""))
    if "mask" in msg.content:
        mask = _remember_mask(msg.content, context, "mask", "mask-config")
    elif STATE_MASK in context.state:
        mask = codec.decode_mask(context.state, STATE_MASK, STATE_MASK_CFG)
    else:
        raise RuntimeError(f"unknown mask {fp[:12]}: this site has not received the agreed mask")
    if mask.fingerprint != fp:
        raise RuntimeError(f"unknown mask {fp[:12]}: this site holds mask {mask.fingerprint[:12]}")
    return mask, fp


app = make_client_app()

__all__ = ["app", "make_client_app", "site_records"]
