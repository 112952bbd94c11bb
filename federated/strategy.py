"""``SparseDeltaFedAvg``: FedAvg on the k selected SH-PEFT values and the head, never a dense model.

Subclass of Flower's message-based :class:`flwr.serverapp.strategy.FedAvg` that keeps its sampling,
round loop and logging, and overrides only what sparse payloads need:

* :meth:`agree_mask` (run once before ``start``): candidates query to the sampled sites, validation,
  the combination rule of :mod:`federated.agreement`, then a broadcast of the agreed mask;
* :meth:`configure_train` / :meth:`configure_evaluate`: the mask fingerprint goes into every
  message's config, the mask itself only to sites that have not acknowledged it yet;
* :meth:`aggregate_train`: every reply must echo the round it answers (``server-round``) and is
  validated (:func:`federated.codec.decode_update`: fingerprint, length, dtype, finite values, head
  shapes, plausible example count); bad replies are dropped and logged with their node id; the rest
  are averaged, weighted by example count, on the sparse coordinates only (FedAvg's own aggregation
  would also average integer index arrays);
* :meth:`aggregate_evaluate`: malformed metric replies are dropped instead of failing the round.

Every message's serialised size is recorded in :attr:`comm` (bytes per site per round and phase);
rejected replies in :attr:`rejected`; the time and the peak memory (Python allocations, numpy
included) of each round's aggregation in :attr:`aggregation`.
"""

from __future__ import annotations

import logging
import math
import time
import tracemalloc
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from federated import codec
from federated.codec import ReplyRejected

__all__ = ["SparseDeltaFedAvg"]

logger = logging.getLogger(__name__)

CANDIDATES_TYPE = "query.candidates"
MASK_TYPE = "query.mask"


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


class SparseDeltaFedAvg(FedAvg):
    """Sparse-delta FedAvg for SH-PEFT.

    Args:
        head_shapes: name -> shape of every dense head tensor a reply must carry.
        max_examples: largest plausible ``num-examples`` of one site (larger replies are dropped).
        min_valid_replies: fewest accepted replies needed to update the global values; with fewer,
            the round keeps the previous global values.
        **kwargs: passed to :class:`FedAvg` (``min_train_nodes``, ``min_available_nodes``,
            ``fraction_evaluate`` ...).

    Example:
        >>> s = SparseDeltaFedAvg(head_shapes={"head.weight": (2, 4)}, fraction_evaluate=0.0)
        >>> s.mask is None
        True
    """

    def __init__(
        self,
        *,
        head_shapes: Mapping[str, tuple[int, ...]],
        max_examples: int = 100_000,
        min_valid_replies: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.head_shapes = {n: tuple(int(s) for s in shape) for n, shape in head_shapes.items()}
        self.max_examples = int(max_examples)
        self.min_valid_replies = int(min_valid_replies)
        self.mask: Any = None
        self._mask_record: RecordDict | None = None
        self._acked: set[int] = set()
        self._sent: list[Message] = []  # the messages of the phase in flight
        self._sent_for: tuple[str, int] | None = None  # (phase, round) of those messages
        self.comm: list[dict[str, Any]] = []
        self.rejected: list[dict[str, Any]] = []
        self.aggregation: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ bookkeeping
    def _account(self, phase: str, server_round: int, node: int, sent: int = 0, received: int = 0) -> None:
        self.comm.append(
            {"phase": phase, "round": server_round, "node": int(node), "sent": sent, "received": received}
        )

    def _reject(self, phase: str, server_round: int, node: int, reason: str) -> None:
        logger.warning("round %s %s: dropped reply of node %s: %s", server_round, phase, node, reason)
        self.rejected.append({"phase": phase, "round": server_round, "node": int(node), "reason": reason})

    def _origin(self, msg: Message) -> int:
        """The node a reply is about: its sender or, for an error reply the SuperLink wrote itself
        (e.g. "Node Unavailable": the node stopped sending heartbeats), the node the answered
        message went to."""
        node = msg.metadata.src_node_id
        if node == SUPERLINK_NODE_ID:
            for sent in self._sent:  # message ids are given when the grid pushes the messages
                if sent.metadata.message_id == msg.metadata.reply_to_message_id:
                    return sent.metadata.dst_node_id
        return node

    def _receive(self, phase: str, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Replies that carry content; errors are logged and recorded as rejections."""
        good, answered = [], set()
        for msg in replies:
            node = self._origin(msg)
            answered.add(node)
            if msg.has_error():
                reason = f"error reply: {msg.error.reason}"
                if "unknown mask" in str(msg.error.reason):
                    self._acked.discard(node)
                self._reject(phase, server_round, node, reason)
                continue
            self._account(phase, server_round, node, received=codec.record_nbytes(msg.content))
            good.append(msg)
        if self._sent_for == (phase, server_round):  # sites that never answered (round timeout)
            for msg in self._sent:
                if msg.metadata.dst_node_id not in answered:
                    self._reject(
                        phase, server_round, msg.metadata.dst_node_id, "no reply before the round timeout"
                    )
        return good

    def _send(
        self, phase: str, server_round: int, messages: Iterable[Message], attach_mask: bool = True
    ) -> list[Message]:
        """Account each message's bytes; attach the mask for sites that have not acknowledged it."""
        out = []
        for msg in messages:
            content = msg.content
            if attach_mask and self._mask_record is not None and msg.metadata.dst_node_id not in self._acked:
                content = RecordDict(dict(content.items()))
                content["mask"] = self._mask_record[codec.MASK]
                content["mask-config"] = self._mask_record[codec.CONFIG]
                msg = Message(
                    content=content,
                    message_type=msg.metadata.message_type,
                    dst_node_id=msg.metadata.dst_node_id,
                )
            self._account(phase, server_round, msg.metadata.dst_node_id, sent=codec.record_nbytes(content))
            out.append(msg)
        self._sent, self._sent_for = out, (phase, server_round)
        return out

    # ------------------------------------------------------------------ mask agreement (round 0)
    def agree_mask(
        self,
        grid: Grid,
        *,
        config: Any,
        task_agnostic: Mapping[str, Any],
        base_fingerprint: str,
        initial_arrays: ArrayRecord,
        candidate_factor: int = 4,
        timeout: float = 3600,
    ) -> Any:
        """Fix one global mask of exactly k entries from the sites' candidates and broadcast it.

        Args:
            config: the :class:`shpeft_monai.SHPEFTConfig` (budget, hybrid rule, rho).
            task_agnostic: name -> task-agnostic score tensor of every eligible tensor (server-side).
            base_fingerprint: backbone fingerprint of the server's base weights.
            initial_arrays: initial global state (values + head); the sites calibrate with its head.
            candidate_factor: each site sends its top ``candidate_factor * k`` entries.

        Raises:
            RuntimeError: fewer than ``min_valid_replies`` sites sent valid candidates.
        """
        from federated.agreement import agree_mask, combine_candidates, flatten_layout

        _, sizes = flatten_layout(task_agnostic)
        n_eligible = sum(sizes)
        k = config.budget_for(n_eligible)
        n_top = int(candidate_factor * k)
        num_nodes = int(len(list(grid.get_node_ids())) * self.fraction_train)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(num_nodes, self.min_train_nodes))
        _, head = codec.split_arrays(initial_arrays)
        request = codec.encode_update(
            np.zeros(0, np.float32), head, "", config={"n-candidates": n_top, "server-round": 0}
        )
        msgs = [
            Message(content=request, message_type=CANDIDATES_TYPE, dst_node_id=n) for n in sorted(node_ids)
        ]
        replies = grid.send_and_receive(self._send("candidates", 0, msgs), timeout=timeout)
        cands = []
        for msg in self._receive("candidates", 0, replies):
            try:
                cands.append(
                    codec.decode_candidates(
                        msg.content,
                        base_fingerprint=base_fingerprint,
                        n_eligible=n_eligible,
                        max_candidates=n_top,
                        max_examples=self.max_examples,
                    )
                )
            except ReplyRejected as exc:
                self._reject("candidates", 0, msg.metadata.src_node_id, str(exc))
        if len(cands) < self.min_valid_replies:
            raise RuntimeError(
                f"mask agreement: {len(cands)} valid candidate replies, need {self.min_valid_replies}; "
                f"rejections: {self.rejected}"
            )
        combined = combine_candidates(cands, n_eligible)
        self.mask = agree_mask(config, combined, task_agnostic, base_fingerprint)
        self._mask_record = codec.encode_mask(self.mask)
        logger.info(
            "agreed mask of k=%d from %d sites (%d candidates each at most), fingerprint %s",
            self.mask.k,
            len(cands),
            n_top,
            self.mask.fingerprint[:12],
        )
        # broadcast the mask to every connected node; acknowledged nodes get only values later
        all_nodes = sorted(grid.get_node_ids())
        bmsgs = [Message(content=self._mask_record, message_type=MASK_TYPE, dst_node_id=n) for n in all_nodes]
        self._acked = set()
        for msg in grid.send_and_receive(self._send("mask", 0, bmsgs, attach_mask=False), timeout=timeout):
            node = self._origin(msg)
            if msg.has_error():
                self._reject("mask", 0, node, f"error reply: {msg.error.reason}")
                continue
            self._account("mask", 0, node, received=codec.record_nbytes(msg.content))
            metrics = msg.content.get(codec.METRICS)
            if isinstance(metrics, MetricRecord) and metrics.get("mask-ok") == 1:
                self._acked.add(node)
            else:
                self._reject("mask", 0, node, "mask not acknowledged")
        return self.mask

    # ------------------------------------------------------------------ training rounds
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.mask is None:
            raise RuntimeError("no agreed mask: call agree_mask(grid, ...) before start().")
        config[codec.MASK_FP] = self.mask.fingerprint
        return self._send("train", server_round, super().configure_train(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and average the replies; the cost is recorded in :attr:`aggregation`."""
        replies = list(replies)
        own_trace = not tracemalloc.is_tracing()
        if own_trace:
            tracemalloc.start()
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        t0 = time.perf_counter()
        try:
            arrays, metrics = self._aggregate_train(server_round, replies)
        finally:
            seconds = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1] - base
            if own_trace:
                tracemalloc.stop()
        self.aggregation.append(
            {
                "round": server_round,
                "replies": len(replies),
                "accepted": int(metrics["sites-accepted"]) if metrics is not None else 0,
                "k": self.mask.k,
                "seconds": seconds,
                "peak_bytes": int(peak),
            }
        )
        return arrays, metrics

    def _aggregate_train(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted: list[tuple[int, np.ndarray, dict[str, np.ndarray], int, MetricRecord]] = []
        seen: set[int] = set()
        for msg in self._receive("train", server_round, replies):
            node = msg.metadata.src_node_id
            if node in seen:
                self._reject("train", server_round, node, "duplicate reply")
                continue
            echo = msg.content[codec.CONFIG].get("server-round") if codec.CONFIG in msg.content else None
            if reason := _round_problem(echo, server_round):
                self._reject("train", server_round, node, reason)
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
                self._reject("train", server_round, node, str(exc))
                continue
            seen.add(node)
            self._acked.add(node)  # it holds the agreed mask (again, after a restart)
            accepted.append((node, values, head, n, msg.content[codec.METRICS]))
        n_rejected = sum(1 for r in self.rejected if r["round"] == server_round and r["phase"] == "train")
        if len(accepted) < max(self.min_valid_replies, 1):
            logger.warning(
                "round %s: %d valid replies (< %d): the global values stay as they were",
                server_round,
                len(accepted),
                self.min_valid_replies,
            )
            return None, MetricRecord({"sites-accepted": len(accepted), "sites-rejected": n_rejected})
        total = float(sum(a[3] for a in accepted))
        weights = [a[3] / total for a in accepted]
        values = sum(w * a[1].astype(np.float64) for w, a in zip(weights, accepted)).astype(np.float32)
        head = {
            name: sum(w * a[2][name].astype(np.float64) for w, a in zip(weights, accepted)).astype(np.float32)
            for name in self.head_shapes
        }
        metrics: dict[str, float | int] = {
            codec.NUM_EXAMPLES: int(total),
            "sites-accepted": len(accepted),
            "sites-rejected": n_rejected,
        }
        keys = set.intersection(*(set(a[4].keys()) for a in accepted)) - {codec.NUM_EXAMPLES}
        for key in sorted(keys):
            vals = [a[4][key] for a in accepted]
            if all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
                metrics[key] = float(sum(w * v for w, v in zip(weights, vals)))
        return codec.update_arrays(values, head), MetricRecord(metrics)

    # ------------------------------------------------------------------ federated evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.mask is not None:
            config[codec.MASK_FP] = self.mask.fingerprint
        return self._send(
            "evaluate", server_round, super().configure_evaluate(server_round, arrays, config, grid)
        )

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        good: list[tuple[float, dict[str, float]]] = []
        for msg in self._receive("evaluate", server_round, replies):
            node = msg.metadata.src_node_id
            try:
                n = codec._num_examples(msg.content, self.max_examples)
                m = msg.content[codec.METRICS]
                vals = {k: v for k, v in m.items() if k != codec.NUM_EXAMPLES}
                if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals.values()):
                    raise ReplyRejected(f"non-finite or non-scalar metrics {vals}")
            except ReplyRejected as exc:
                self._reject("evaluate", server_round, node, str(exc))
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

    # ------------------------------------------------------------------ reporting
    def comm_by_round(self) -> list[dict[str, Any]]:
        """Bytes sent to and received from each site, per (phase, round)."""
        table: dict[tuple[str, int, int], dict[str, Any]] = {}
        for r in self.comm:
            row = table.setdefault(
                (r["phase"], r["round"], r["node"]),
                {"phase": r["phase"], "round": r["round"], "node": r["node"], "sent": 0, "received": 0},
            )
            row["sent"] += r["sent"]
            row["received"] += r["received"]
        return [table[key] for key in sorted(table)]
