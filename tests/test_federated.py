"""Contracts of federated SH-PEFT: codec, validation of replies, sparse aggregation, mask agreement.

Fast tests drive the strategy through an in-process fake grid (no Ray, no network); the end-to-end
simulation on a tiny random ViT is marked slow.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from shpeft_monai import SHPEFTConfig, SparseMask
from shpeft_monai.agreement import agree_mask, combine_candidates, flatten_layout, site_candidates
from shpeft_monai.fl import codec
from shpeft_monai.fl.codec import ReplyRejected
from shpeft_monai.fl.mask_round import agree
from shpeft_monai.fl.metered import MeteredSparseFedAvg
from shpeft_monai.fl.partition import site_partition
from shpeft_monai.fl.strategy import SparseDeltaFedAvg
from shpeft_monai.model import backbone_fingerprint, eligible_parameters
from shpeft_monai.scoring import task_agnostic_scores

HEAD = {"2.weight": (2, 8), "2.bias": (2,)}


@pytest.fixture(autouse=True)
def task_identity():
    """Messages are created inside a Flower run; give the test process a run identity."""
    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))


CFG = SHPEFTConfig(budget=5, hybrid="union", rho=0.6, head=("2",))


def tiny_setup():
    model = tiny_model()
    params = eligible_parameters(model, CFG)
    ta = task_agnostic_scores(params)
    return model, params, ta, backbone_fingerprint(model, CFG)


def tiny_mask() -> SparseMask:
    _, params, ta, fp = tiny_setup()
    n = sum(p.numel() for p in params.values())
    combined = np.zeros(n, np.float32)
    combined[[1, 7, 20, 33]] = [0.9, 0.5, 0.7, 0.2]
    return agree_mask(CFG, combined, ta, fp)


def head_arrays(value: float) -> dict[str, np.ndarray]:
    return {n: np.full(s, value, np.float32) for n, s in HEAD.items()}


class FakeGrid:
    """In-process grid: each node is a function message -> reply (None = the site drops out)."""

    def __init__(self, handlers):
        self.handlers = handlers
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.handlers)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            reply = self.handlers[msg.metadata.dst_node_id](msg)
            if reply is not None:
                replies.append(reply)
        return replies


def request(node: int, content: RecordDict | None = None, kind: str = "train") -> Message:
    return Message(content=content or RecordDict(), message_type=kind, dst_node_id=node)


def reply(node: int, content: RecordDict, server_round: int | None = None) -> Message:
    """A reply of ``node``; with ``server_round``, its config echoes the round it answers (as our
    ClientApp does: the strategy refuses a train reply without it)."""
    if server_round is not None:
        content[codec.CONFIG]["server-round"] = server_round
    return Message(content=content, reply_to=request(node))


def strategy_with(mask: SparseMask, **kw) -> SparseDeltaFedAvg:
    s = SparseDeltaFedAvg(head_shapes=HEAD, max_examples=1000, fraction_evaluate=0.0, **kw)
    s.mask = mask
    return s


# ------------------------------------------------------------------------------------------ codec
def test_update_codec_round_trip():
    mask = tiny_mask()
    vals = np.arange(mask.k, dtype=np.float32) / 7
    rd = codec.encode_update(
        vals, head_arrays(0.5), mask.fingerprint, num_examples=12, metrics={"train-loss": 0.3}
    )
    v, h, n = codec.decode_update(rd, mask_fingerprint=mask.fingerprint, k=mask.k, head_shapes=HEAD)
    assert np.array_equal(v, vals) and n == 12
    assert all(np.array_equal(h[k], head_arrays(0.5)[k]) for k in HEAD)
    # the packed vector is the core's layout: unpack gives per-tensor values in mask order
    per_tensor = mask.unpack(torch.from_numpy(v))
    assert np.array_equal(mask.pack(per_tensor).numpy(), vals)


def test_mask_codec_round_trip_and_tamper():
    mask = tiny_mask()
    rd = codec.encode_mask(mask)
    back = codec.decode_mask(rd)
    assert back.fingerprint == mask.fingerprint and back.k == mask.k
    bad = np.array(rd[codec.MASK]["indices"].numpy())
    bad[0] = (bad[0] + 1) % 48 if bad[0] + 1 not in bad else bad[0] + 2
    bad.sort()
    rd[codec.MASK] = ArrayRecord({"indices": codec._array(bad)})
    with pytest.raises(ReplyRejected):
        codec.decode_mask(rd)


def test_candidates_codec_round_trip():
    rd = codec.encode_candidates(
        np.array([3, 9], np.int64),
        np.array([0.5, 1.0], np.float32),
        num_examples=10,
        base_fingerprint="fp",
        n_eligible=48,
    )
    idx, sc, n = codec.decode_candidates(rd, base_fingerprint="fp", n_eligible=48, max_candidates=4)
    assert idx.tolist() == [3, 9] and sc.tolist() == [0.5, 1.0] and n == 10


def test_record_nbytes_counts_payload():
    small = codec.encode_update(np.zeros(10, np.float32), {}, "x")
    big = codec.encode_update(np.zeros(1010, np.float32), {}, "x")
    assert codec.record_nbytes(big) - codec.record_nbytes(small) >= 4000


# ------------------------------------------------------------------------------------------ aggregation
def test_aggregation_is_weighted_mean_on_sparse_coordinates():
    mask = tiny_mask()
    s = strategy_with(mask)
    rng = np.random.default_rng(0)
    vals = [rng.normal(size=mask.k).astype(np.float32) for _ in range(3)]
    heads = [head_arrays(v) for v in (1.0, 2.0, 4.0)]
    ns = [10, 30, 60]
    replies = [
        reply(
            i + 1,
            codec.encode_update(
                vals[i], heads[i], mask.fingerprint, num_examples=ns[i], metrics={"train-loss": float(i)}
            ),
            server_round=1,
        )
        for i in range(3)
    ]
    arrays, metrics = s.aggregate_train(1, replies)
    got_vals, got_head = codec.split_arrays(arrays)
    expected = (10 * vals[0] + 30 * vals[1] + 60 * vals[2]) / 100
    np.testing.assert_allclose(got_vals, expected, rtol=1e-6, atol=1e-7)
    assert got_vals.shape == (mask.k,)  # never a dense model
    np.testing.assert_allclose(got_head["2.bias"], np.full(2, (10 * 1 + 30 * 2 + 60 * 4) / 100))
    assert metrics["num-examples"] == 100 and metrics["sites-accepted"] == 3
    assert math.isclose(metrics["train-loss"], (0 * 10 + 1 * 30 + 2 * 60) / 100)
    assert set(arrays.keys()) == {"values", "head.2.weight", "head.2.bias"}


def test_server_lr_scales_the_combined_change_from_the_round_start():
    mask = tiny_mask()
    s = strategy_with(mask, server_lr=2.5)
    start_vals = np.linspace(-1, 1, mask.k).astype(np.float32)
    start = codec.update_arrays(start_vals, head_arrays(1.0))
    list(s.configure_train(1, start, ConfigRecord({}), FakeGrid({1: None, 2: None})))
    vals = [start_vals + 0.1, start_vals + 0.3]
    replies = [
        reply(i + 1, codec.encode_update(vals[i], head_arrays(2.0 + i), mask.fingerprint, num_examples=10), 1)
        for i in range(2)
    ]
    arrays, _ = s.aggregate_train(1, replies)
    got_vals, got_head = codec.split_arrays(arrays)
    np.testing.assert_allclose(got_vals, start_vals + 2.5 * 0.2, rtol=1e-5, atol=1e-6)  # mean change 0.2
    np.testing.assert_allclose(got_head["2.bias"], np.full(2, 1.0 + 2.5 * 1.5), rtol=1e-6)
    with pytest.raises(ValueError, match="server_lr"):
        strategy_with(mask, server_lr=0.0)


def _corrupt(kind: str, mask: SparseMask, server_round: int = 3) -> Message:
    vals = np.ones(mask.k, np.float32)
    fp = mask.fingerprint
    if kind == "error":
        return Message(Error(code=1, reason="site crashed"), reply_to=request(9))
    if kind == "fingerprint":
        rd = codec.encode_update(vals, head_arrays(1), "0" * 64, num_examples=5)
    elif kind == "length":
        rd = codec.encode_update(np.ones(mask.k + 1, np.float32), head_arrays(1), fp, num_examples=5)
    elif kind == "nan":
        v = vals.copy()
        v[1] = np.nan
        rd = codec.encode_update(v, head_arrays(1), fp, num_examples=5)
    elif kind == "inf_head":
        h = head_arrays(1)
        h["2.bias"][0] = np.inf
        rd = codec.encode_update(vals, h, fp, num_examples=5)
    elif kind == "head_shape":
        h = head_arrays(1)
        h["2.weight"] = np.ones((3, 8), np.float32)
        rd = codec.encode_update(vals, h, fp, num_examples=5)
    elif kind == "zero_examples":
        rd = codec.encode_update(vals, head_arrays(1), fp, num_examples=0)
    elif kind == "absurd_examples":
        rd = codec.encode_update(vals, head_arrays(1), fp, num_examples=10**9)
    elif kind == "missing_metrics":
        rd = codec.encode_update(vals, head_arrays(1), fp)
    elif kind == "missing_values":
        rd = codec.encode_update(vals, head_arrays(1), fp, num_examples=5)
        rd[codec.ARRAYS] = ArrayRecord({k: v for k, v in rd[codec.ARRAYS].items() if k != "values"})
    elif kind == "missing_config":
        rd = codec.encode_update(vals, head_arrays(1), fp, num_examples=5)
        del rd[codec.CONFIG]
    elif kind == "int_values":
        rd = codec.encode_update(vals, head_arrays(1), fp, num_examples=5)
        rd[codec.ARRAYS]["values"] = codec._array(np.ones(mask.k, np.int64))
    elif kind == "extra_arrays":
        rd = codec.encode_update(vals, head_arrays(1), fp, num_examples=5)
        rd[codec.ARRAYS]["dense.weight"] = codec._array(np.ones(48, np.float32))
    elif kind == "missing_round":  # well-formed, but does not say which round it answers
        return reply(9, codec.encode_update(vals, head_arrays(1), fp, num_examples=5))
    elif kind == "bad_round":
        rd = codec.encode_update(vals, head_arrays(1), fp, num_examples=5)
        rd[codec.CONFIG]["server-round"] = "3"
        return reply(9, rd)
    else:
        raise AssertionError(kind)
    return reply(9, rd, server_round=server_round if codec.CONFIG in rd else None)


KINDS = [
    "error",
    "fingerprint",
    "length",
    "nan",
    "inf_head",
    "head_shape",
    "zero_examples",
    "absurd_examples",
    "missing_metrics",
    "missing_values",
    "missing_config",
    "int_values",
    "extra_arrays",
    "missing_round",
    "bad_round",
]


@pytest.mark.parametrize("kind", KINDS)
def test_malformed_reply_is_dropped_and_round_completes(kind):
    mask = tiny_mask()
    s = strategy_with(mask)
    good = [
        reply(
            1,
            codec.encode_update(
                np.full(mask.k, 1.0, np.float32), head_arrays(1), mask.fingerprint, num_examples=10
            ),
            server_round=3,
        ),
        reply(
            2,
            codec.encode_update(
                np.full(mask.k, 4.0, np.float32), head_arrays(4), mask.fingerprint, num_examples=30
            ),
            server_round=3,
        ),
    ]
    arrays, metrics = s.aggregate_train(3, [good[0], _corrupt(kind, mask), good[1]])
    values, _ = codec.split_arrays(arrays)
    np.testing.assert_allclose(values, np.full(mask.k, (10 + 120) / 40))
    assert metrics["sites-accepted"] == 2 and metrics["sites-rejected"] == 1
    assert [r["node"] for r in s.rejected] == [9] and s.rejected[0]["round"] == 3
    reason = s.rejected[0]["reason"]
    if kind in ("missing_round", "missing_config"):
        assert "does not echo `server-round`" in reason and "Update the site's ClientApp" in reason
    elif kind == "bad_round":
        assert "non-integer `server-round`" in reason
    else:  # dropped for what is wrong with it, not for its (correct) round echo
        assert "server-round" not in reason and "replayed" not in reason


def test_no_valid_reply_keeps_previous_global_values():
    mask = tiny_mask()
    s = strategy_with(mask)
    arrays, metrics = s.aggregate_train(1, [_corrupt("nan", mask, server_round=1)])
    assert arrays is None and metrics["sites-accepted"] == 0


def test_error_reply_written_by_the_superlink_names_the_silent_node():
    """A node that stops sending heartbeats (killed, power cut) is answered for by the SuperLink
    itself, with its own node id (1) as sender: the rejection must name the node that went silent."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    s = strategy_with(tiny_mask())
    sent = s.outgoing("train", 2, [request(7), request(8)])
    for i, msg in enumerate(sent):  # as the grid does when it pushes the messages
        msg.metadata.__dict__["_message_id"] = f"m{i}"
    err = create_message_error_unavailable_res_message(sent[0].metadata, "node_unavail")
    assert err.metadata.src_node_id == 1
    _, metrics = s.aggregate_train(2, [err])
    # node 8 never answered at all (the round timed out): recorded too, by its id
    assert metrics["sites-rejected"] == 2 and [r["node"] for r in s.rejected] == [7, 8]
    assert "Node Unavailable" in s.rejected[0]["reason"]
    assert "no reply before the round timeout" in s.rejected[1]["reason"]


@pytest.mark.parametrize(
    "kind",
    [
        "out_of_range",
        "negative_index",
        "duplicate",
        "nan_score",
        "negative_score",
        "base_fp",
        "too_many",
        "int32",
        "zero_examples",
    ],
)
def test_malformed_candidates_are_rejected(kind):
    idx, sc = np.array([1, 5, 9], np.int64), np.array([0.1, 0.2, 0.3], np.float32)
    fp, n = "base", 10
    if kind == "out_of_range":
        idx = np.array([1, 5, 48], np.int64)
    elif kind == "negative_index":
        idx = np.array([-1, 5, 9], np.int64)
    elif kind == "duplicate":
        idx = np.array([1, 5, 5], np.int64)
    elif kind == "nan_score":
        sc = np.array([0.1, np.nan, 0.3], np.float32)
    elif kind == "negative_score":
        sc = np.array([0.1, -0.2, 0.3], np.float32)
    elif kind == "base_fp":
        fp = "other"
    elif kind == "too_many":
        idx, sc = np.arange(5, dtype=np.int64), np.ones(5, np.float32)
    elif kind == "int32":
        idx = idx.astype(np.int32)
    elif kind == "zero_examples":
        n = 0
    rd = codec.encode_candidates(idx, sc, num_examples=n, base_fingerprint=fp, n_eligible=48)
    if kind == "int32":
        rd[codec.ARRAYS]["indices"] = codec._array(idx)
    with pytest.raises(ReplyRejected):
        codec.decode_candidates(rd, base_fingerprint="base", n_eligible=48, max_candidates=4)


# ------------------------------------------------------------------------------------------ agreement
def test_site_candidates_global_layout_and_ties():
    scores = {"b": torch.tensor([[0.0, 5.0], [1.0, 1.0]]), "a": torch.tensor([3.0, 1.0, 9.0])}
    idx, sc = site_candidates(scores, 4)
    # layout: a (3 entries) then b (4 entries); top 4 = a2 (9), b1 (5), a0 (3), then the tie 1.0 at a1
    assert idx.tolist() == [0, 1, 2, 4] and sc.tolist() == [3.0, 1.0, 9.0, 5.0]
    assert flatten_layout(scores) == (["a", "b"], [3, 4])


def test_mask_agreement_is_deterministic_and_exact_budget():
    _, params, ta, fp = tiny_setup()
    n = sum(p.numel() for p in params.values())
    rng = np.random.default_rng(1)
    cands = []
    for n_ex in (5, 20, 7):
        idx = np.sort(rng.choice(n, 8, replace=False)).astype(np.int64)
        cands.append((idx, rng.random(8).astype(np.float32), n_ex))
    masks = []
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        combined = combine_candidates([cands[i] for i in order], n, CFG)
        masks.append(agree_mask(CFG, combined, ta, fp))
    assert len({m.fingerprint for m in masks}) == 1
    assert masks[0].k == CFG.budget_for(n) == 5
    for budget in (1, 3, 17, 48):
        cfg = CFG.replace(budget=budget)
        assert agree_mask(cfg, combine_candidates(cands, n, cfg), ta, fp).k == budget


@pytest.mark.parametrize("lam", [0.25, 0.5, 0.9])
def test_one_site_agrees_on_exactly_the_mask_the_bundle_selects(lam):
    """Weighted hybrid: one site's candidates give the centralised mask (select_indices on the same
    scores), although most of it lies outside the site's top task-specific entries."""
    from shpeft_monai.agreement import site_scores
    from shpeft_monai.selection import select_indices

    _, params, ta, fp = tiny_setup()
    cfg = SHPEFTConfig(budget=6, hybrid="weighted", lam=lam, head=("2",))
    g = torch.Generator().manual_seed(3)
    ts = {n: torch.rand(p.shape, generator=g) ** 4 for n, p in params.items()}
    n = sum(p.numel() for p in params.values())
    k = cfg.budget_for(n)
    idx, sc = site_candidates(site_scores(cfg, ts, ta), 4 * k)
    mask = agree_mask(cfg, combine_candidates([(idx, sc, 10)], n, cfg), ta, fp)
    expected = select_indices(cfg, k, ts, ta)
    assert {m: v.tolist() for m, v in mask.indices.items()} == {m: v.tolist() for m, v in expected.items()}
    # the rule picks entries outside the site's top task-specific ones (candidates by I_ts miss them)
    ts_idx, _ = site_candidates(ts, k)
    names, sizes = flatten_layout(ta)
    offsets = dict(zip(names, np.cumsum([0, *sizes[:-1]])))
    picked = {int(offsets[m] + i) for m, v in expected.items() for i in v.tolist()}
    assert lam == 0.9 or not picked <= set(ts_idx.tolist())


def test_mixed_scores_combine_by_examples_with_the_sites_floor():
    cfg = SHPEFTConfig(budget=2, hybrid="weighted", lam=0.5)
    a = (np.array([0, 1]), np.array([0.9, 0.8], np.float32), 1)  # floor 0.8
    b = (np.array([1, 2]), np.array([0.95, 0.7], np.float32), 3)  # floor 0.7
    combined = combine_candidates([a, b], 4, cfg)
    np.testing.assert_allclose(
        combined,
        [0.25 * 0.9 + 0.75 * 0.7, 0.25 * 0.8 + 0.75 * 0.95, 0.25 * 0.8 + 0.75 * 0.7, 0.25 * 0.8 + 0.75 * 0.7],
        rtol=1e-6,
    )


def test_union_rule_takes_top_combined_then_magnitude():
    _, params, ta, fp = tiny_setup()
    n = sum(p.numel() for p in params.values())
    # one site, candidate scores rank 20 > 7 > 1: rho*k = 3 task-specific entries
    combined = combine_candidates(
        [(np.array([1, 7, 20, 33]), np.array([0.5, 0.7, 0.9, 0.1], np.float32), 4)], n, CFG
    )
    mask = agree_mask(CFG, combined, ta, fp)
    flat = mask.indices["0.weight"].tolist()
    assert {1, 7, 20} <= set(flat)
    mag = ta["0.weight"].reshape(-1).clone()
    mag[[1, 7, 20]] = -1
    assert set(flat) - {1, 7, 20} == set(torch.topk(mag, 2).indices.tolist())


def test_combination_weights_by_example_count():
    n = 10
    a = (np.array([0]), np.array([2.0], np.float32), 1)  # normalised by its own max -> 1.0
    b = (np.array([1]), np.array([0.001], np.float32), 3)  # tiny raw scale, but 3x the examples
    combined = combine_candidates([a, b], n, CFG)
    assert combined[1] == pytest.approx(0.75) and combined[0] == pytest.approx(0.25)


# ------------------------------------------------------------------------------------------ whole protocol
def fake_site(mask_box: dict, values_offset: float, n_examples: int, *, misbehave: str = ""):
    """A site implemented in numpy: candidates, mask ack, train = values + offset."""
    _, params, _, fp = tiny_setup()
    n_el = sum(p.numel() for p in params.values())

    def handle(msg: Message):
        kind = msg.metadata.message_type
        if kind == "query.candidates":
            if misbehave == "bad_candidates":
                rd = codec.encode_candidates(
                    np.array([n_el + 5]),
                    np.ones(1, np.float32),
                    num_examples=n_examples,
                    base_fingerprint=fp,
                    n_eligible=n_el,
                )
            else:
                idx = np.array([2, 11, 30], np.int64) if values_offset > 0 else np.array([2, 40], np.int64)
                rd = codec.encode_candidates(
                    idx,
                    np.linspace(0.5, 1, idx.size).astype(np.float32),
                    num_examples=n_examples,
                    base_fingerprint=fp,
                    n_eligible=n_el,
                )
            return Message(content=rd, reply_to=msg)
        if kind == "query.mask":
            mask_box[id(handle)] = codec.decode_mask(msg.content)
            return Message(content=RecordDict({codec.METRICS: MetricRecord({"mask-ok": 1})}), reply_to=msg)
        if kind == "train":
            if misbehave == "drop_train":
                return None
            mask = mask_box[id(handle)]
            fp_msg = msg.content[codec.CONFIG][codec.MASK_FP]
            v, h, _ = codec.decode_update(
                msg.content, mask_fingerprint=fp_msg, k=mask.k, head_shapes=HEAD, need_examples=False
            )
            if misbehave == "nan_train":
                v = v * np.nan
            rd = codec.encode_update(
                v + values_offset,
                {k: t + values_offset for k, t in h.items()},
                fp_msg,
                num_examples=n_examples,
                metrics={"train-loss": 1.0},
                config={"server-round": msg.content[codec.CONFIG]["server-round"]},  # echo, as our ClientApp
            )
            return Message(content=rd, reply_to=msg)
        raise AssertionError(kind)

    return handle


def test_protocol_end_to_end_with_faulty_sites():
    _, _, ta, fp = tiny_setup()
    box: dict = {}
    grid = FakeGrid(
        {
            1: fake_site(box, 1.0, 10),
            2: fake_site(box, 3.0, 30),
            3: fake_site(box, 0.0, 5, misbehave="bad_candidates"),
            4: fake_site(box, 0.0, 5, misbehave="drop_train"),
            5: fake_site(box, 0.0, 5, misbehave="nan_train"),
        }
    )
    s = MeteredSparseFedAvg(
        head_shapes=HEAD, max_examples=100, min_available_nodes=5, min_train_nodes=5, fraction_evaluate=0.0
    )
    k = CFG.budget_for(48)
    init = codec.update_arrays(np.zeros(k, np.float32), head_arrays(0))
    mask = agree(
        grid, s, config=CFG, task_agnostic=ta, base_fingerprint=fp, initial_arrays=init, candidate_factor=2
    )
    assert mask.k == k and {2, 11} <= set(mask.indices["0.weight"].tolist())
    result = s.start(
        grid=grid, initial_arrays=init, num_rounds=2, train_config=ConfigRecord({"local-epochs": 1})
    )
    values, head = codec.split_arrays(result.arrays)
    # per round: weighted mean of +1 (10 examples), +3 (30) and +0 (node 3, 5; its bad candidates
    # were dropped, its training is fine); node 4 never answers, node 5 sends NaN: both dropped
    step = (1 * 10 + 3 * 30 + 0 * 5) / 45
    np.testing.assert_allclose(values, np.full(k, 2 * step), rtol=1e-6)
    np.testing.assert_allclose(head["2.bias"], np.full(2, 2 * step), rtol=1e-6)
    reasons = {(r["phase"], r["node"]) for r in s.rejected}
    assert ("candidates", 3) in reasons and ("train", 5) in reasons
    # once acknowledged, train messages carry values + head only (no indices), k float32 values
    train_msgs = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert all("mask" not in m.content for m in train_msgs)
    assert all(m.content[codec.ARRAYS]["values"].numpy().shape == (k,) for m in train_msgs)
    rows = [r for r in s.comm_by_round() if r["phase"] == "train"]
    assert rows and all(r["sent"] > 0 for r in rows)
    assert {r["round"] for r in rows} == {1, 2}


def test_unacknowledged_site_gets_mask_with_first_train_message():
    mask = tiny_mask()
    s = strategy_with(mask, min_available_nodes=1, min_train_nodes=1)
    s.mask_record = codec.encode_mask(mask)
    grid = FakeGrid({7: lambda m: None})
    msgs = list(
        s.configure_train(
            1, codec.update_arrays(np.zeros(mask.k, np.float32), head_arrays(0)), ConfigRecord(), grid
        )
    )
    assert "mask" in msgs[0].content and codec.decode_mask(msgs[0].content, "mask", "mask-config").k == mask.k


# ------------------------------------------------------------------------------------------ site split
def test_site_partition_grouped_label_skewed_and_complete():
    rng = np.random.default_rng(0)
    recs = []
    for g in range(60):
        label = g % 2
        for j in range(int(rng.integers(1, 4))):
            recs.append({"image": f"{g}_{j}.jpg", "label": label, "group": g})
    sites = site_partition(recs, 3, skew=0.6, seed=0)
    assert sorted(r["image"] for s in sites for r in s) == sorted(r["image"] for r in recs)
    groups = [{r["group"] for r in s} for s in sites]
    assert not (groups[0] & groups[1]) and not (groups[1] & groups[2]) and not (groups[0] & groups[2])
    pos = [np.mean([r["label"] for r in s]) for s in sites]
    assert pos[0] > 0.6 and pos[2] < 0.4  # label skew in opposite directions
    assert site_partition(recs, 3, skew=0.6, seed=0) == sites  # deterministic


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_simulation_trains_its_sites_through_the_bundle(tmp_path):
    """2 sites, 1 round, tiny random ViT: every site ran the bundle (its run record and the agreed
    mask in its work folder), the report holds the sparse payload next to dense FedAvg."""
    from shpeft_monai.fl import simulate
    from shpeft_monai.io import load_delta, load_mask

    out = tmp_path / "fed"
    args = ["--out", str(out), "--sites", "2", "--rounds", "1", "--train-per-site", "8"]
    args += ["--val-limit", "8", "--test-limit", "8", "--model", "vit_tiny_patch16_224", "--random-init"]
    args += ["--img-size", "32", "--batch-size", "4", "--calibration-batches", "1", "--no-baselines"]
    report = simulate.main([*args, "--bundle", "shpeft#head_warmup_steps=1"])
    saved = json.loads((out / "report.json").read_text())
    assert saved["summary"]["k"] == report["federated"]["k"] > 0
    assert (out / "global_delta.safetensors").is_file() and (out / "report.png").is_file()
    comm = saved["federated"]["communication"]
    assert 0 < comm["ratio_sparse_to_dense"] < 1e-3
    assert set(saved["federated"]["accuracy_per_round"]) == {"0", "1"}
    assert not saved["federated"]["rejected_replies"]
    delta = load_delta(out / "global_delta.safetensors")
    for site in (0, 1):
        work = out / "sites" / f"work{site}"
        run = json.loads((work / "run.json").read_text())  # written by the bundle's resolve_run
        assert run["network_name"] == "vit_tiny_patch16_224" and run["img_size"] == 32
        assert load_mask(work / "mask.safetensors").mask.fingerprint == delta.mask.fingerprint


# ------------------------------------------------------------------------------------------ Flower app
def test_flower_app_manifest_has_no_dependencies_and_known_config_keys():
    import dataclasses
    import importlib
    from pathlib import Path

    import tomllib
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from shpeft_monai.fl.task import Settings
    from shpeft_monai.recipe import DEFAULTS

    repo = Path(__file__).parents[1]
    manifest = tomllib.loads((repo / "federated" / "pyproject.toml").read_text())
    # the app folder is a Flower manifest, not a package: no top-level `federated` module is installed
    assert sorted(p.name for p in (repo / "federated").iterdir() if p.suffix == ".py") == []
    found = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert found["include"] == ["shpeft_monai*"]
    assert manifest["project"]["dependencies"] == []  # a SuperLink must never install torch
    comps = manifest["tool"]["flwr"]["app"]["components"]
    for ref, kind in ((comps["serverapp"], ServerApp), (comps["clientapp"], ClientApp)):
        module, _, attr = ref.partition(":")
        assert module.startswith("shpeft_monai.fl.")
        assert isinstance(getattr(importlib.import_module(module), attr), kind)
    fields = {f.name.replace("_", "-") for f in dataclasses.fields(Settings)}
    config = manifest["tool"]["flwr"]["app"]["config"]
    assert set(config) <= fields
    from tests.test_federated_deploy import TINY  # `flwr run` refuses keys the manifest lacks

    assert set(TINY) <= set(config)
    s = Settings.from_config(config)
    assert s == Settings(), "the manifest's defaults and Settings' defaults differ"
    # the method and its recipe are the bundle's: recipe.DEFAULTS, not the app's own settings
    cfg, parser = s.shpeft(), s.parser()
    assert (cfg.hybrid, cfg.budget) == (DEFAULTS.hybrid, DEFAULTS.budget)
    assert parser.get_parsed_content("lr") == DEFAULTS.lr_selected
    assert parser.get_parsed_content("head_lr") == DEFAULTS.lr_head
    assert parser.get_parsed_content("resume") is False  # overlays/federated.yaml
    tiny = Settings.from_config({"bundle": "img_size=32 shpeft#budget=2200", "local-epochs": 2})
    assert tiny.shpeft().budget == 2200 and tiny.parser().get_parsed_content("max_epochs") == 2


def test_the_default_client_app_carries_no_fault_drill():
    from shpeft_monai.fl.client_app import app
    from shpeft_monai.fl.faults import drill_app

    assert app._mods == [] and len(drill_app._mods) == 1


def test_mask_broadcast_carries_the_mask_once():
    _, _, ta, fp = tiny_setup()
    box: dict = {}
    grid = FakeGrid({1: fake_site(box, 1.0, 10), 2: fake_site(box, 3.0, 30)})
    s = SparseDeltaFedAvg(head_shapes=HEAD, min_available_nodes=2, min_train_nodes=2, fraction_evaluate=0.0)
    init = codec.update_arrays(np.zeros(CFG.budget_for(48), np.float32), head_arrays(0))
    agree(grid, s, config=CFG, task_agnostic=ta, base_fingerprint=fp, initial_arrays=init)
    bcast = [m for m in grid.sent if m.metadata.message_type == "query.mask"]
    assert len(bcast) == 2 and all(set(m.content.keys()) == {codec.MASK, codec.CONFIG} for m in bcast)


def test_initial_head_is_the_weighted_mean_of_the_sites_warmed_heads():
    """Sites warm their head up before scoring (the bundle's recipe) and send it with their
    candidates; a malformed head drops that site's whole candidates reply."""
    _, params, ta, fp = tiny_setup()
    n_el = sum(p.numel() for p in params.values())

    def site(value: float, n: int, head_shapes=HEAD):
        def handle(msg: Message):
            if msg.metadata.message_type == "query.mask":
                return Message(
                    content=RecordDict({codec.METRICS: MetricRecord({"mask-ok": 1})}), reply_to=msg
                )
            head = {k: np.full(s, value, np.float32) for k, s in head_shapes.items()}
            rd = codec.encode_candidates(
                np.array([3, 9], np.int64),
                np.array([1.0, 0.5], np.float32),
                num_examples=n,
                base_fingerprint=fp,
                n_eligible=n_el,
                head=head,
            )
            return Message(content=rd, reply_to=msg)

        return handle

    bad_shapes = {"2.weight": (3, 8), "2.bias": (2,)}
    grid = FakeGrid({1: site(1.0, 10), 2: site(4.0, 30), 3: site(100.0, 60, bad_shapes)})
    s = SparseDeltaFedAvg(head_shapes=HEAD, min_available_nodes=3, min_train_nodes=3, fraction_evaluate=0.0)
    init = codec.update_arrays(np.zeros(CFG.budget_for(n_el), np.float32), head_arrays(0))
    agree(grid, s, config=CFG, task_agnostic=ta, base_fingerprint=fp, initial_arrays=init)
    assert [(r["phase"], r["node"]) for r in s.rejected] == [("candidates", 3)]
    assert "expected float (2, 8)" in s.rejected[0]["reason"]
    np.testing.assert_allclose(s.initial_head["2.weight"], np.full((2, 8), (10 * 1 + 30 * 4) / 40))


def test_simulation_report_settings_name_no_folder_of_the_machine(tmp_path, monkeypatch):
    """Paths under the working directory become relative in the simulation's report (it is copied
    into benchmarks/results); other paths and values stay as they are."""
    from shpeft_monai.fl.simulate import _portable

    monkeypatch.chdir(tmp_path)
    settings = {
        "dataset": str(tmp_path / "runs" / "fed" / "sites" / "site{partition}.json"),
        "out": "runs/fed",
        "checkpoint": "/elsewhere/weights.safetensors",
        "seed": 0,
    }
    assert _portable(settings) == {
        "dataset": "runs/fed/sites/site{partition}.json",
        "out": "runs/fed",
        "checkpoint": "/elsewhere/weights.safetensors",
        "seed": 0,
    }
