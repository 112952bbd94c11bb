"""``SparseDeltaFedAvg``: FedAvg on the k agreed SH-PEFT values and the head, never a dense model.

A subclass of Flower's message-based :class:`flwr.serverapp.strategy.FedAvg` that keeps its
sampling, round loop and logging and overrides only FedAvg's contract points:

* :meth:`configure_train` / :meth:`configure_evaluate`: the agreed mask's fingerprint goes into every
  message's config, the mask itself only to sites that have not acknowledged it;
* :meth:`aggregate_train`: every reply must echo its round and pass
  :func:`shpeft_monai.fl.codec.decode_update` (fingerprint, length, dtype, finite values, head
  shapes, plausible example count); a bad reply is dropped and logged with its node id and the
  round goes on. The accepted flat updates (k values then the head) are combined by
  :func:`shpeft_monai.fl.robust.aggregate` (``mean`` weighted by examples, ``median`` or
  ``trimmed_mean``) on the sparse coordinates only: FedAvg's own aggregation would average the
  integer index arrays too. With ``server_lr`` != 1 the global values move by that multiple of the
  combined change (FedAvg with a server learning rate, Reddi et al. 2021, "Adaptive Federated
  Optimization"; 1 is plain FedAvg);
* :meth:`aggregate_evaluate`: malformed metric replies are dropped instead of failing the round;
* :meth:`summary`: the mask, the rule and the privacy budget.

The mask is agreed before ``start`` (:func:`shpeft_monai.fl.mask_round.agree`). Byte accounting and
profiling live in :class:`shpeft_monai.fl.metered.MeteredSparseFedAvg` (benchmarks, simulation).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from shpeft_monai.fl import codec, robust
from shpeft_monai.fl.codec import ReplyRejected

__all__ = ["SparseDeltaFedAvg"]

logger = logging.getLogger(__name__)


def _round_problem(echo: object, server_round: int) -> str:
    """Why a reply's ``server-round`` echo does not answer this round ('' when it does)."""
    if echo is None:
        return (
            "reply does not echo `server-round` (the round it answers): "
            "a client from another version of this app? Update the site's ClientApp."
        )
    if type(echo) is not int:  # bool, float, str...: not what our ClientApp sends
        return f"reply echoes a non-integer `server-round` ({type(echo).__name__} {echo!r:.40})"
    return f"reply is for round {echo} (replayed?)" if echo != server_round else ""


def _finite_scalars(values: Iterable[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


class SparseDeltaFedAvg(FedAvg):
    """Sparse-delta FedAvg for SH-PEFT.

    Args:
        head_shapes: name -> shape of every dense head tensor a reply must carry.
        max_examples: largest plausible ``num-examples`` of one site (larger replies are dropped).
        min_valid_replies: fewest accepted replies needed to update the global values; with fewer,
            the round keeps the previous global values.
        aggregation: ``mean`` (FedAvg), ``median`` or ``trimmed_mean`` (:data:`robust.RULES`).
        trim_fraction: share of sites cut at each end by ``trimmed_mean``.
        server_lr: the global values move by ``server_lr`` times the combined change of the round
            (1: plain FedAvg, the combined values themselves).
        **kwargs: passed to :class:`FedAvg` (``min_train_nodes``, ``fraction_evaluate`` ...).

    Example:
        >>> s = SparseDeltaFedAvg(head_shapes={"head.weight": (2, 4)}, aggregation="median")
        >>> s.mask is None
        True
    """

    def __init__(
        self,
        *,
        head_shapes: Mapping[str, tuple[int, ...]],
        max_examples: int = 100_000,
        min_valid_replies: int = 1,
        aggregation: str = "mean",
        trim_fraction: float = 0.2,
        server_lr: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if aggregation not in robust.RULES:
            raise ValueError(f"aggregation={aggregation!r} is not one of {robust.RULES}")
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server_lr={server_lr!r} must be a finite number > 0 (1 = plain FedAvg)")
        robust.trimmed_count(1, trim_fraction)  # validates the fraction now, not in round 1
        super().__init__(**kwargs)
        self.head_shapes = {n: tuple(int(s) for s in shape) for n, shape in sorted(head_shapes.items())}
        self.max_examples = int(max_examples)
        self.min_valid_replies = int(min_valid_replies)
        self.aggregation, self.trim_fraction = aggregation, float(trim_fraction)
        self.server_lr = float(server_lr)
        self._global: ArrayRecord | None = None  # the values this round's sites started from
        self.mask: Any = None  # set by shpeft_monai.fl.mask_round.agree
        self.mask_record: RecordDict | None = None
        self.acked: set[int] = set()
        self.initial_head: dict[str, np.ndarray] | None = None  # the sites' warmed heads, averaged
        self.rejected: list[dict[str, Any]] = []
        self.privacy: dict[str, Any] = {}  # what the sites were told (noise multiplier, clip, delta)
        self._sent: list[Message] = []  # the messages of the phase in flight
        self._sent_for: tuple[str, int] | None = None

    # ------------------------------------------------------------------ message bookkeeping
    def reject(self, phase: str, server_round: int, node: int, reason: str) -> None:
        logger.warning("round %s %s: dropped reply of node %s: %s", server_round, phase, node, reason)
        self.rejected.append({"phase": phase, "round": server_round, "node": int(node), "reason": reason})

    def origin(self, msg: Message) -> int:
        """The node a reply is about: its sender or, for an error reply the SuperLink wrote itself
        (e.g. "Node Unavailable"), the node the answered message went to."""
        node = msg.metadata.src_node_id
        if node == SUPERLINK_NODE_ID:
            for sent in self._sent:  # message ids are given when the grid pushes the messages
                if sent.metadata.message_id == msg.metadata.reply_to_message_id:
                    return sent.metadata.dst_node_id
        return node

    def outgoing(self, phase: str, server_round: int, messages: Iterable[Message]) -> list[Message]:
        """Remember the phase's messages; attach the mask for sites that have not acknowledged it."""
        out = []
        for msg in messages:
            if (
                phase != "mask"
                and self.mask_record is not None
                and msg.metadata.dst_node_id not in self.acked
            ):
                content = RecordDict(dict(msg.content.items()))
                content["mask"] = self.mask_record[codec.MASK]
                content["mask-config"] = self.mask_record[codec.CONFIG]
                msg = Message(
                    content=content,
                    message_type=msg.metadata.message_type,
                    dst_node_id=msg.metadata.dst_node_id,
                )
            out.append(msg)
        self._sent, self._sent_for = out, (phase, server_round)
        return out

    def incoming(self, phase: str, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Replies that carry content; error replies and silent nodes are recorded as rejections."""
        good, answered = [], set()
        for msg in replies:
            node = self.origin(msg)
            answered.add(node)
            if msg.has_error():
                if "unknown mask" in str(msg.error.reason):
                    self.acked.discard(node)
                self.reject(phase, server_round, node, f"error reply: {msg.error.reason}")
                continue
            good.append(msg)
        if self._sent_for == (phase, server_round):  # sites that never answered (round timeout)
            for msg in self._sent:
                if msg.metadata.dst_node_id not in answered:
                    self.reject(
                        phase, server_round, msg.metadata.dst_node_id, "no reply before the round timeout"
                    )
        return good

    # ------------------------------------------------------------------ training rounds
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.mask is None:
            raise RuntimeError(
                "no agreed mask: run shpeft_monai.fl.mask_round.agree(grid, strategy, ...) first."
            )
        config[codec.MASK_FP] = self.mask.fingerprint
        self._global = arrays
        return self.outgoing(
            "train", server_round, super().configure_train(server_round, arrays, config, grid)
        )

    def validate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> list[tuple[int, np.ndarray, dict[str, np.ndarray], int, MetricRecord]]:
        """(node, values, head, examples, metrics) of every acceptable reply; the rest rejected."""
        accepted: list[tuple[int, np.ndarray, dict[str, np.ndarray], int, MetricRecord]] = []
        seen: set[int] = set()
        for msg in self.incoming("train", server_round, replies):
            node = msg.metadata.src_node_id
            if node in seen:
                self.reject("train", server_round, node, "duplicate reply")
                continue
            echo = msg.content[codec.CONFIG].get("server-round") if codec.CONFIG in msg.content else None
            if reason := _round_problem(echo, server_round):
                self.reject("train", server_round, node, reason)
                continue
            try:
                values, head, n = codec.decode_update(
                    msg.content,
                    mask_fingerprint=self.mask.fingerprint,
                    k=self.mask.k,
                    head_shapes=self.head_shapes,
                    max_examples=self.max_examples,
                )
            except ReplyRejected as exc:
                self.reject("train", server_round, node, str(exc))
                continue
            seen.add(node)
            self.acked.add(node)  # it holds the agreed mask (again, after a restart)
            accepted.append((node, values, head, n, msg.content[codec.METRICS]))
        return accepted

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, then combine the accepted ones on the sparse coordinates."""
        accepted = self.validate_train(server_round, replies)
        n_rejected = sum(1 for r in self.rejected if r["round"] == server_round and r["phase"] == "train")
        counts: dict[str, float | int] = {"sites-accepted": len(accepted), "sites-rejected": n_rejected}
        if len(accepted) < max(self.min_valid_replies, 1):
            logger.warning(
                "round %s: %d valid replies (< %d): the global values stay as they were",
                server_round,
                len(accepted),
                self.min_valid_replies,
            )
            return None, MetricRecord(counts)
        total = float(sum(a[3] for a in accepted))
        flat = [codec.flatten_update(a[1], a[2]) for a in accepted]
        combined = robust.aggregate(flat, [a[3] for a in accepted], self.aggregation, self.trim_fraction)
        if self.server_lr != 1.0 and self._global is not None:
            start = codec.flatten_update(*codec.split_arrays(self._global))
            combined = start + self.server_lr * (combined - start)
        values, head = codec.unflatten_update(combined.astype(np.float32), self.mask.k, self.head_shapes)
        metrics: dict[str, float | int] = {codec.NUM_EXAMPLES: int(total), **counts}
        keys = set.intersection(*(set(a[4].keys()) for a in accepted)) - {codec.NUM_EXAMPLES}
        for key in sorted(keys):
            vals = [a[4][key] for a in accepted]
            if _finite_scalars(vals):
                metrics[key] = float(sum(a[3] * v for a, v in zip(accepted, vals)) / total)
        return codec.update_arrays(values, head), MetricRecord(metrics)

    # ------------------------------------------------------------------ federated evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.mask is not None:
            config[codec.MASK_FP] = self.mask.fingerprint
        return self.outgoing(
            "evaluate", server_round, super().configure_evaluate(server_round, arrays, config, grid)
        )

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        good: list[tuple[float, dict[str, float]]] = []
        for msg in self.incoming("evaluate", server_round, replies):
            node = msg.metadata.src_node_id
            try:
                n = codec.num_examples(msg.content, self.max_examples)
                vals = {k: v for k, v in msg.content[codec.METRICS].items() if k != codec.NUM_EXAMPLES}
                if not _finite_scalars(vals.values()):
                    raise ReplyRejected(f"non-finite or non-scalar metrics {vals}")
            except ReplyRejected as exc:
                self.reject("evaluate", server_round, node, str(exc))
                continue
            good.append((n, vals))
        if not good:
            return None
        total = float(sum(n for n, _ in good))
        keys = set.intersection(*(set(v) for _, v in good))
        out: dict[str, float | int] = {codec.NUM_EXAMPLES: int(total)}
        for key in sorted(keys):
            out[key] = float(sum(n * v[key] for n, v in good) / total)
        return MetricRecord(out)

    def summary(self) -> None:
        """Log the sparse settings, then FedAvg's."""
        k = self.mask.k if self.mask is not None else "not agreed yet"
        logger.info(
            "SparseDeltaFedAvg: k=%s, head %s, aggregation %s, server lr %g",
            k,
            self.head_shapes,
            self.aggregation,
            self.server_lr,
        )
        if self.aggregation == "trimmed_mean":
            logger.info("  trim fraction %s at each end", self.trim_fraction)
        if self.privacy:
            logger.info("  site-level DP: %s", self.privacy)
        super().summary()
