"""Round 0 of federated SH-PEFT: the sites' candidates in, one agreed mask of exactly k out.

The server queries the sampled sites for their top ``candidate_factor * k`` entries by the score the
hybrid rule ranks by (:func:`shpeft_monai.agreement.site_scores`: the mixed score for ``weighted``,
task-specific importance otherwise; computed by each site's bundle), validates every
reply (:func:`shpeft_monai.fl.codec.decode_candidates`; a bad one is dropped and logged with its node
id), applies the core rule (:func:`shpeft_monai.agreement.agree_mask`) and broadcasts the mask to
every connected node. Sites that do not acknowledge it get it again with their first train message.
A site's bundle warms its head up before scoring (as centralised selection does) and sends that head
along; the example-weighted mean of the accepted heads becomes the initial global head
(``strategy.initial_head``; the server's own head when no site sent one).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from shpeft_monai.agreement import agree_mask, candidate_count, combine_candidates, flatten_layout
from shpeft_monai.fl import codec
from shpeft_monai.fl.codec import ReplyRejected

__all__ = ["CANDIDATES_TYPE", "MASK_TYPE", "agree"]

logger = logging.getLogger(__name__)

CANDIDATES_TYPE = "query.candidates"
MASK_TYPE = "query.mask"


def agree(
    grid: Grid,
    strategy: Any,
    *,
    config: Any,
    task_agnostic: Mapping[str, Any],
    base_fingerprint: str,
    initial_arrays: ArrayRecord,
    candidate_factor: int = 4,
    timeout: float = 3600,
) -> Any:
    """Fix one global mask of exactly k entries and store it on ``strategy`` (a SparseDeltaFedAvg).

    Args:
        config: the :class:`shpeft_monai.SHPEFTConfig` (budget, hybrid rule, ratios).
        task_agnostic: name -> task-agnostic score of every eligible tensor (server side, no data).
        base_fingerprint: backbone fingerprint of the server's base weights.
        initial_arrays: initial global state (values + head); sites calibrate through its head.
        candidate_factor: each site sends its top ``candidate_factor * k`` entries.

    Raises:
        RuntimeError: fewer than ``strategy.min_valid_replies`` sites sent valid candidates.
    """
    n_eligible = sum(flatten_layout(task_agnostic)[1])
    n_top = candidate_count(config, n_eligible, candidate_factor)
    num_nodes = int(len(list(grid.get_node_ids())) * strategy.fraction_train)
    node_ids, _ = sample_nodes(grid, strategy.min_available_nodes, max(num_nodes, strategy.min_train_nodes))
    _, head = codec.split_arrays(initial_arrays)
    request = codec.encode_update(
        np.zeros(0, np.float32), head, "", config={"n-candidates": n_top, "server-round": 0}
    )
    msgs = [Message(content=request, message_type=CANDIDATES_TYPE, dst_node_id=n) for n in sorted(node_ids)]
    replies = grid.send_and_receive(strategy.outgoing("candidates", 0, msgs), timeout=timeout)
    cands, heads = [], []
    for msg in strategy.incoming("candidates", 0, replies):
        try:
            cand = codec.decode_candidates(
                msg.content,
                base_fingerprint=base_fingerprint,
                n_eligible=n_eligible,
                max_candidates=n_top,
                max_examples=strategy.max_examples,
            )
            heads.append((codec.decode_candidate_head(msg.content, strategy.head_shapes), cand[2]))
        except ReplyRejected as exc:
            strategy.reject("candidates", 0, msg.metadata.src_node_id, str(exc))
            continue
        cands.append(cand)
    if len(cands) < max(strategy.min_valid_replies, 1):
        raise RuntimeError(
            f"mask agreement: {len(cands)} valid candidate replies, need {strategy.min_valid_replies}; "
            f"rejections: {strategy.rejected}"
        )
    strategy.mask = agree_mask(
        config, combine_candidates(cands, n_eligible, config), task_agnostic, base_fingerprint
    )
    warmed = [(h, n) for h, n in heads if h is not None]
    if warmed:  # the bundle warms the head up before it selects: start from those heads, averaged
        total = float(sum(n for _, n in warmed))
        strategy.initial_head = {
            name: (sum(n * h[name].astype(np.float64) for h, n in warmed) / total).astype(np.float32)
            for name in strategy.head_shapes
        }
    strategy.mask_record = codec.encode_mask(strategy.mask)
    logger.info(
        "agreed mask of k=%d from %d sites (%d candidates each at most), fingerprint %s",
        strategy.mask.k,
        len(cands),
        n_top,
        strategy.mask.fingerprint[:12],
    )
    # broadcast to every connected node; acknowledged nodes get only values afterwards
    bmsgs = [
        Message(content=strategy.mask_record, message_type=MASK_TYPE, dst_node_id=n)
        for n in sorted(grid.get_node_ids())
    ]
    strategy.acked = set()
    for msg in strategy.incoming(
        "mask", 0, grid.send_and_receive(strategy.outgoing("mask", 0, bmsgs), timeout=timeout)
    ):
        metrics = msg.content.get(codec.METRICS)
        if isinstance(metrics, MetricRecord) and metrics.get("mask-ok") == 1:
            strategy.acked.add(msg.metadata.src_node_id)
        else:
            strategy.reject("mask", 0, msg.metadata.src_node_id, "mask not acknowledged")
    return strategy.mask
