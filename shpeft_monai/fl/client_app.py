"""Flower ClientApp of a site (hospital): its own bundle scores, trains and evaluates.

Node config (``flower-supernode --node-config``): ``dataset`` (the site's datalist JSON, class
folder or CSV) or ``dataset-dir``; ``checkpoint`` (local pretrained weights; default: the converted
cache of ``make weights``); ``work-dir`` (the bundle's output folder); ``device``; ``num-threads``.
In simulation ``{partition}`` in ``dataset``/``work-dir`` is replaced by the site's partition id.

Images never leave the site: replies carry candidate indices and scores (once), then k values, the
head and an example count per round. With ``dp-epsilon`` or ``dp-noise-multiplier`` (and
``dp-clip``) in the run config, the update is clipped and noised here, before it leaves the site
(:func:`shpeft_monai.fl.privacy.privatize`). In deployment every message runs in a fresh process, so
the agreed mask is kept in ``context.state``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from shpeft_monai.fl import codec

__all__ = ["app", "make_client_app"]

logger = logging.getLogger(__name__)

STATE_MASK, STATE_MASK_CFG = "shpeft-mask", "shpeft-mask-config"


def _site(context: Context, overrides: Mapping[str, Any] | None) -> Any:
    from shpeft_monai.fl.task import Settings, SiteBundle

    s = Settings.from_config(context.run_config, overrides, context.node_config)
    fmt = {"partition": context.node_config.get("partition-id", ""), "node": context.node_id}
    s = dataclasses.replace(s, dataset=s.dataset.format(**fmt), work_dir=s.work_dir.format(**fmt))
    s.set_threads()
    return SiteBundle(s, s.work_dir or os.path.join("runs", "fed-site", str(context.node_id)))


def _remember_mask(content: RecordDict, context: Context, mask_key: str, config_key: str) -> Any:
    mask = codec.decode_mask(content, mask_key, config_key)  # verifies indices vs fingerprint
    context.state[STATE_MASK] = content[mask_key]
    context.state[STATE_MASK_CFG] = content[config_key]
    return mask


def _mask_for(msg: Message, context: Context) -> Any:
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
    return mask


def _global(msg: Message, context: Context) -> tuple[Any, np.ndarray, dict[str, np.ndarray]]:
    """The agreed mask and the server's values and head, checked like a reply."""
    mask = _mask_for(msg, context)
    _, head = codec.split_arrays(msg.content[codec.ARRAYS])
    values, head, _ = codec.decode_update(
        msg.content,
        mask_fingerprint=mask.fingerprint,
        k=mask.k,
        head_shapes={n: t.shape for n, t in head.items()},
        need_examples=False,
    )
    return mask, values, head


def make_client_app(overrides: Mapping[str, Any] | None = None, mods: Sequence[Mod] = ()) -> ClientApp:
    """A ClientApp; ``overrides`` (simulation) take the place of an empty run config and ``mods``
    wrap it (the simulation and deployment drivers' fault drills, :mod:`shpeft_monai.fl.faults`)."""
    app = ClientApp(mods=list(mods))

    @app.query("candidates")
    def candidates(msg: Message, context: Context) -> Message:
        from shpeft_monai.agreement import site_candidates

        site = _site(context, overrides)
        _, head = codec.split_arrays(msg.content[codec.ARRAYS])
        c = site.calibrate(head)
        idx, sc = site_candidates(c["scores"], int(msg.content[codec.CONFIG]["n-candidates"]))
        content = codec.encode_candidates(
            idx,
            sc,
            num_examples=c["num_examples"],
            base_fingerprint=c["fingerprint"],
            n_eligible=c["n_eligible"],
            head=c["head"] if site.s.privacy() is None else None,  # DP covers the rounds only
        )
        return Message(content=content, reply_to=msg)

    @app.query("mask")
    def store_mask(msg: Message, context: Context) -> Message:
        mask = _remember_mask(msg.content, context, codec.MASK, codec.CONFIG)
        return Message(
            content=RecordDict({codec.METRICS: MetricRecord({"mask-ok": 1, "k": mask.k})}), reply_to=msg
        )

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site = _site(context, overrides)
        mask, values, head = _global(msg, context)
        server_round = int(msg.content[codec.CONFIG].get("server-round", 0))
        new_values, new_head, n, loss = site.train(mask, values, head, server_round)
        metrics = {"train-loss": loss}
        dp = site.s.privacy()
        if dp is not None:  # clip and noise before the update leaves the site
            from shpeft_monai.fl.task import private_update

            rng = np.random.default_rng()  # unpredictable noise: never seeded from known values
            new_values, new_head, stats = private_update(new_values, new_head, values, head, dp, rng)
            metrics.update({"dp-norm": stats["norm"], "dp-clipped": float(stats["clipped"])})
        # echo the round so that the server can refuse a replayed reply from an earlier round
        content = codec.encode_update(
            new_values,
            new_head,
            mask.fingerprint,
            num_examples=n,
            metrics=metrics,
            config={"server-round": server_round},
        )
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        site = _site(context, overrides)
        mask, values, head = _global(msg, context)
        metrics = site.evaluate(mask, values, head)
        return Message(content=RecordDict({codec.METRICS: MetricRecord(metrics)}), reply_to=msg)

    return app


app = make_client_app()
