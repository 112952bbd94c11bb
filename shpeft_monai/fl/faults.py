"""Fault drills: make one site misbehave on purpose, to rehearse what the server does about it.

A Flower *mod* around the site's ClientApp, installed only by the drivers: the simulation
(``python -m shpeft_monai.fl.simulate --fault SITE:KIND[:ROUND]``) and the loopback deployment,
which runs :data:`drill_app` when a node config names a fault
(``flower-supernode --node-config "fault='nan' fault-round=2"``). The production ClientApp
(``shpeft_monai.fl.client_app:app``) never carries it. The server must cope with every kind
without trusting the site: :class:`shpeft_monai.fl.strategy.SparseDeltaFedAvg` drops the reply,
logs the node id, and aggregates the honest sites only.

Kinds (applied to the ``train`` reply of round ``fault-round``, default 2; earlier rounds honest):

* ``nan``: the k values become NaN;
* ``oversized``: ten times more values than the agreed mask has;
* ``misindexed``: values for another mask (the fingerprint does not match);
* ``float64``: values in the wrong dtype;
* ``huge-count``: an implausible example count (10^9), which would swamp the weighted mean;
* ``replay``: re-sends the site's own reply of the previous round (an old round number);
* ``error``: the site raises during training (Flower returns an error reply);
* ``crash``: the site's process dies mid-round (``os._exit``), as on a power cut.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod

from shpeft_monai.fl import codec

__all__ = ["FAULT_KINDS", "drill_app", "fault_drill", "parse_fault", "parse_faults"]

logger = logging.getLogger(__name__)

FAULT_KINDS = ("nan", "oversized", "misindexed", "float64", "huge-count", "replay", "error", "crash")
_LAST_REPLY = "fault-drill-last-reply."  # prefix of the records kept in context.state


def parse_fault(text: str) -> tuple[int, str, int]:
    """``SITE:KIND[:ROUND]`` -> (site, kind, round); e.g. ``1:nan:2``."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        site, kind, rnd = int(parts[0]), parts[1], int(parts[2]) if len(parts) == 3 else 2
    except ValueError:
        raise ValueError(f"fault {text!r}: expected SITE:KIND[:ROUND], e.g. 1:nan:2") from None
    if kind not in FAULT_KINDS:
        raise ValueError(f"fault {text!r}: unknown kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
    if site < 0 or rnd < 1:
        raise ValueError(f"fault {text!r}: site must be >= 0 and round >= 1")
    return site, kind, rnd


def parse_faults(texts: Sequence[str] | str | None) -> dict[int, tuple[str, int]]:
    """Several ``SITE:KIND[:ROUND]`` (a list or one comma-separated string) -> {site: (kind, round)}."""
    if isinstance(texts, str):
        texts = [t for t in texts.split(",") if t.strip()]
    out: dict[int, tuple[str, int]] = {}
    for text in texts or ():
        site, kind, rnd = parse_fault(text.strip())
        if site in out:
            raise ValueError(f"fault {text!r}: site {site} already has a fault")
        out[site] = (kind, rnd)
    return out


def fault_drill(site_faults: Mapping[int, tuple[str, int]] | None = None) -> Mod:
    """A Flower mod that makes this site misbehave as its node config (``fault``, ``fault-round``)
    or, in simulation, ``site_faults[partition-id]`` says; honest otherwise."""
    site_faults = dict(site_faults or {})

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        kind = str(context.node_config.get("fault", "") or "")
        rnd = int(context.node_config.get("fault-round", 2))
        if not kind and "partition-id" in context.node_config:
            kind, rnd = site_faults.get(int(context.node_config["partition-id"]), ("", 0))
        if not kind or msg.metadata.message_type != "train":
            return call_next(msg, context)
        if kind not in FAULT_KINDS:
            raise ValueError(f"node config fault={kind!r}: unknown kind; known: {', '.join(FAULT_KINDS)}")
        return _drill(kind, rnd, msg, context, call_next)

    return mod


def _drill(
    kind: str, fault_round: int, msg: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    this_round = int(msg.content[codec.CONFIG].get("server-round", 0))
    if this_round != fault_round:
        reply = call_next(msg, context)
        if kind == "replay" and not reply.has_error():
            for key, record in reply.content.items():
                context.state[_LAST_REPLY + key] = record
        return reply
    logger.warning("fault drill: this site misbehaves in round %d (%s)", this_round, kind)
    if kind == "error":
        raise RuntimeError(f"fault drill: site error in round {this_round}")
    if kind == "crash":
        os._exit(17)  # no cleanup, no reply: the process is gone
    if kind == "replay":
        old = {k[len(_LAST_REPLY) :]: r for k, r in context.state.items() if k.startswith(_LAST_REPLY)}
        if not old:
            raise RuntimeError("fault drill replay: no earlier reply to replay (set fault-round >= 2)")
        return Message(content=RecordDict(old), reply_to=msg)
    reply = call_next(msg, context)
    return Message(content=corrupt_update(reply.content, kind), reply_to=msg)


def corrupt_update(content: Any, kind: str) -> Any:
    """A train reply turned into the malformed reply of ``kind`` (values-level faults only)."""
    values, head = codec.split_arrays(content[codec.ARRAYS])
    cfg = dict(content[codec.CONFIG].items())
    fp = str(cfg.pop(codec.MASK_FP, ""))
    metrics: dict[str, Any] = dict(content[codec.METRICS].items())
    n = int(metrics.pop(codec.NUM_EXAMPLES))
    if kind == "nan":
        values = np.full_like(values, np.nan)
    elif kind == "oversized":
        values = np.tile(values, 10)
    elif kind == "misindexed":
        fp = "0" * len(fp)
    elif kind == "huge-count":
        n = 10**9
    out = codec.encode_update(values, head, fp, num_examples=n, metrics=metrics, config=cfg)
    if kind == "float64":
        arrays = out[codec.ARRAYS]
        arrays["values"] = codec._array(values.astype(np.float64))
    return out


def _drill_app() -> Any:
    from shpeft_monai.fl.client_app import make_client_app

    return make_client_app(mods=[fault_drill()])


drill_app = _drill_app()  # the deployment driver's ClientApp for fault drills (node config `fault`)
