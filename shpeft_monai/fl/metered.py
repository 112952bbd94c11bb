"""``MeteredSparseFedAvg``: the production strategy plus byte accounting and aggregation profiling.

Used by the simulation driver, the server-load benchmark and runs with ``account-bytes = true``;
the production path (:class:`shpeft_monai.fl.strategy.SparseDeltaFedAvg`) pays for none of it.

* :attr:`comm`: the serialised size of every message sent to and received from each site, per
  phase (``candidates``, ``mask``, ``train``, ``evaluate``) and round (:meth:`comm_by_round`);
* :attr:`aggregation_log`: time and peak Python/numpy memory (``tracemalloc``) of each round's
  ``aggregate_train`` (validation of every reply + the combination).
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord

from shpeft_monai.fl import codec
from shpeft_monai.fl.strategy import SparseDeltaFedAvg

__all__ = ["MeteredSparseFedAvg"]


class MeteredSparseFedAvg(SparseDeltaFedAvg):
    """:class:`SparseDeltaFedAvg` that records bytes per message and the cost of each aggregation."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.comm: list[dict[str, Any]] = []
        self.aggregation_log: list[dict[str, Any]] = []

    def _account(self, phase: str, server_round: int, node: int, sent: int = 0, received: int = 0) -> None:
        self.comm.append(
            {"phase": phase, "round": server_round, "node": int(node), "sent": sent, "received": received}
        )

    def outgoing(self, phase: str, server_round: int, messages: Iterable[Message]) -> list[Message]:
        out = super().outgoing(phase, server_round, messages)
        for msg in out:
            self._account(
                phase, server_round, msg.metadata.dst_node_id, sent=codec.record_nbytes(msg.content)
            )
        return out

    def incoming(self, phase: str, server_round: int, replies: Iterable[Message]) -> list[Message]:
        good = super().incoming(phase, server_round, replies)
        for msg in good:
            self._account(phase, server_round, self.origin(msg), received=codec.record_nbytes(msg.content))
        return good

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        own_trace = not tracemalloc.is_tracing()
        if own_trace:
            tracemalloc.start()
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        t0 = time.perf_counter()
        try:
            arrays, metrics = super().aggregate_train(server_round, replies)
        finally:
            seconds = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1] - base
            if own_trace:
                tracemalloc.stop()
        self.aggregation_log.append(
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
