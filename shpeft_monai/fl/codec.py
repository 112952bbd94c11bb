"""Flower records for federated SH-PEFT, over the core codec of :class:`shpeft_monai.SparseMask`.

The core already defines the wire layout: ``SparseMask.to_arrays()/from_arrays()`` (concatenated
int64 indices + JSON layout, fingerprint verified) and ``SparseMask.pack()/unpack()`` (one float32
vector of the k selected values in mask order). This module only puts those arrays into Flower
``ArrayRecord``/``ConfigRecord``/``MetricRecord`` objects and checks what comes back from a site.

Messages (record keys inside the ``RecordDict`` of a Flower ``Message``):

* candidates reply (site -> server, once): ``arrays`` = {``indices``: int64 global flat indices into
  the eligible layout (eligible tensors in name order, each flattened), ``scores``: float32};
  ``config`` = {``base-fingerprint``, ``n-eligible``}; ``metrics`` = {``num-examples``}.
* mask broadcast (server -> site, once): ``mask`` = {``indices``}; ``config`` = {``layout`` (JSON),
  ``mask-fingerprint``}.
* train/evaluate (both directions, every round): ``arrays`` = {``values``: float32 (k,),
  ``head.<name>``: dense head tensors}; ``config`` = {``mask-fingerprint``, ...};
  replies add ``metrics`` = {``num-examples``, ``train-loss`` ...}.

Every decoder raises :class:`ReplyRejected` with a reason, so the strategy can drop and log a bad
site without stopping the round.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

__all__ = [
    "ARRAYS",
    "CONFIG",
    "METRICS",
    "NUM_EXAMPLES",
    "ReplyRejected",
    "decode_candidate_head",
    "decode_candidates",
    "decode_mask",
    "decode_update",
    "encode_candidates",
    "encode_mask",
    "encode_update",
    "flatten_update",
    "num_examples",
    "record_nbytes",
    "unflatten_update",
]

ARRAYS, CONFIG, METRICS, MASK = "arrays", "config", "metrics", "mask"
NUM_EXAMPLES = "num-examples"
MASK_FP = "mask-fingerprint"
BASE_FP = "base-fingerprint"
HEAD_PREFIX = "head."


class ReplyRejected(ValueError):
    """A site's reply is malformed or does not fit the agreed mask; it is dropped, not aggregated."""


def _array(a: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(a))


def _get(content: RecordDict, key: str, kind: type) -> Any:
    try:
        rec = content[key]
    except KeyError:
        rec = None
    if not isinstance(rec, kind):
        raise ReplyRejected(f"missing {kind.__name__} {key!r} (has {sorted(content.keys())})")
    return rec


def _numpy(rec: ArrayRecord, key: str) -> np.ndarray:
    if key not in rec:
        raise ReplyRejected(f"missing array {key!r} (has {sorted(rec.keys())})")
    try:
        return rec[key].numpy()
    except Exception as exc:  # corrupt array bytes
        raise ReplyRejected(f"array {key!r} cannot be decoded: {exc!r}") from exc


def _decode_head(arrays: ArrayRecord, head_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The head tensors of a reply as float32, each checked for shape, float dtype and finite values."""
    head: dict[str, np.ndarray] = {}
    for name, shape in head_shapes.items():
        t = _numpy(arrays, HEAD_PREFIX + name)
        if not np.issubdtype(t.dtype, np.floating) or tuple(t.shape) != tuple(shape):
            raise ReplyRejected(f"head {name!r} has {t.dtype} {t.shape}, expected float {tuple(shape)}")
        if not np.isfinite(t).all():
            raise ReplyRejected(f"head {name!r} contains NaN/Inf")
        head[name] = t.astype(np.float32)
    return head


def num_examples(content: RecordDict, max_examples: int) -> int:
    """The reply's ``num-examples``: a positive integer no larger than ``max_examples``."""
    metrics = _get(content, METRICS, MetricRecord)
    n = metrics.get(NUM_EXAMPLES)
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n):
        raise ReplyRejected(f"{NUM_EXAMPLES}={n!r} is not a number")
    if n != int(n) or not 0 < n <= max_examples:
        raise ReplyRejected(f"{NUM_EXAMPLES}={n!r} is not an integer in [1, {max_examples}]")
    return int(n)


# ---------------------------------------------------------------- training payload (every round)
def encode_update(
    values: np.ndarray,
    head: Mapping[str, np.ndarray],
    mask_fingerprint: str,
    *,
    num_examples: int | None = None,
    metrics: Mapping[str, float] | None = None,
    config: Mapping[str, Any] | None = None,
) -> RecordDict:
    """Packed values (k float32) + dense head + mask fingerprint (+ example count for replies)."""
    arrays = {"values": _array(np.asarray(values, dtype=np.float32).reshape(-1))}
    for name in sorted(head):
        arrays[HEAD_PREFIX + name] = _array(np.asarray(head[name], dtype=np.float32))
    cfg = ConfigRecord({MASK_FP: mask_fingerprint, **dict(config or {})})
    rd = RecordDict({ARRAYS: ArrayRecord(arrays), CONFIG: cfg})
    if num_examples is not None or metrics:
        m = {k: float(v) for k, v in dict(metrics or {}).items()}
        if num_examples is not None:
            m[NUM_EXAMPLES] = int(num_examples)
        rd[METRICS] = MetricRecord(m)
    return rd


def update_arrays(values: np.ndarray, head: Mapping[str, np.ndarray]) -> ArrayRecord:
    """The global model state the strategy carries between rounds: values + head."""
    return encode_update(values, head, "")[ARRAYS]


def flatten_update(values: np.ndarray, head: Mapping[str, np.ndarray]) -> np.ndarray:
    """One float64 vector: the k values, then every head tensor flattened in name order (what the
    robust aggregation and differential privacy act on)."""
    parts = [np.asarray(values, dtype=np.float64).reshape(-1)]
    parts += [np.asarray(head[n], dtype=np.float64).reshape(-1) for n in sorted(head)]
    return np.concatenate(parts)


def unflatten_update(
    flat: np.ndarray, k: int, head_shapes: Mapping[str, tuple[int, ...]]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Inverse of :func:`flatten_update` (float32 values and head)."""
    need = k + sum(int(np.prod(s)) for s in head_shapes.values())
    if flat.shape != (need,):
        raise ValueError(f"flat update has shape {flat.shape}, expected ({need},)")
    values, pos, head = flat[:k].astype(np.float32), k, {}
    for name in sorted(head_shapes):
        size = int(np.prod(head_shapes[name]))
        head[name] = flat[pos : pos + size].astype(np.float32).reshape(head_shapes[name])
        pos += size
    return values, head


def split_arrays(arrays: ArrayRecord) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Inverse of :func:`update_arrays` (no validation: server-side state)."""
    values = arrays["values"].numpy()
    head = {k[len(HEAD_PREFIX) :]: arrays[k].numpy() for k in arrays if k.startswith(HEAD_PREFIX)}
    return values, head


def decode_update(
    content: RecordDict,
    *,
    mask_fingerprint: str,
    k: int,
    head_shapes: Mapping[str, tuple[int, ...]],
    max_examples: int = 1_000_000,
    need_examples: bool = True,
) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """Validate a train reply (or a train request on the site) and return (values, head, n).

    Raises:
        ReplyRejected: missing record or key, another mask, wrong length/dtype/shape, NaN/Inf,
            or an implausible example count.
    """
    cfg = _get(content, CONFIG, ConfigRecord)
    fp = cfg.get(MASK_FP)
    if fp != mask_fingerprint:
        raise ReplyRejected(
            f"mask fingerprint {str(fp)[:12]!r} is not the agreed mask {mask_fingerprint[:12]!r}"
        )
    arrays = _get(content, ARRAYS, ArrayRecord)
    values = _numpy(arrays, "values")
    if values.dtype != np.float32 or values.ndim != 1 or values.shape[0] != k:
        raise ReplyRejected(f"values have {values.dtype} {values.shape}, expected float32 ({k},)")
    if not np.isfinite(values).all():
        raise ReplyRejected(f"values contain {int((~np.isfinite(values)).sum())} NaN/Inf entries")
    head = _decode_head(arrays, head_shapes)
    extra = sorted(set(arrays.keys()) - {"values"} - {HEAD_PREFIX + n for n in head_shapes})
    if extra:
        raise ReplyRejected(f"unexpected arrays {extra[:5]}")
    n = num_examples(content, max_examples) if need_examples else 0
    return values, head, n


# ---------------------------------------------------------------- mask broadcast (once)
def encode_mask(mask: Any) -> RecordDict:
    """The agreed :class:`shpeft_monai.SparseMask` through its core codec (indices + layout)."""
    arrays, layout = mask.to_arrays()
    return RecordDict(
        {
            MASK: ArrayRecord({"indices": _array(arrays["indices"].astype(np.int64))}),
            CONFIG: ConfigRecord({"layout": json.dumps(layout), MASK_FP: layout["mask_fingerprint"]}),
        }
    )


def decode_mask(content: RecordDict, mask_key: str = MASK, config_key: str = CONFIG) -> Any:
    """Inverse of :func:`encode_mask`; the core verifies indices against the fingerprint."""
    from shpeft_monai import DeltaMismatchError, SparseMask

    arrays = _get(content, mask_key, ArrayRecord)
    cfg = _get(content, config_key, ConfigRecord)
    try:
        layout = json.loads(str(cfg["layout"]))
        return SparseMask.from_arrays({"indices": _numpy(arrays, "indices")}, layout)
    except (KeyError, json.JSONDecodeError, DeltaMismatchError) as exc:
        raise ReplyRejected(f"malformed mask payload: {exc}") from exc


# ---------------------------------------------------------------- mask agreement candidates (once)
def encode_candidates(
    indices: np.ndarray,
    scores: np.ndarray,
    *,
    num_examples: int,
    base_fingerprint: str,
    n_eligible: int,
    head: Mapping[str, np.ndarray] | None = None,
) -> RecordDict:
    """A site's top task-specific candidates: global flat indices and their scores, never data;
    with ``head``, the head the site warmed up before scoring (the bundle's recipe)."""
    arrays = {
        "indices": _array(np.asarray(indices, dtype=np.int64)),
        "scores": _array(np.asarray(scores, dtype=np.float32)),
    }
    for name in sorted(head or {}):
        arrays[HEAD_PREFIX + name] = _array(np.asarray(head[name], dtype=np.float32))
    return RecordDict(
        {
            ARRAYS: ArrayRecord(arrays),
            CONFIG: ConfigRecord({BASE_FP: base_fingerprint, "n-eligible": int(n_eligible)}),
            METRICS: MetricRecord({NUM_EXAMPLES: int(num_examples)}),
        }
    )


def decode_candidates(
    content: RecordDict,
    *,
    base_fingerprint: str,
    n_eligible: int,
    max_candidates: int,
    max_examples: int = 1_000_000,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate a candidates reply; returns (indices, scores, num_examples).

    Raises:
        ReplyRejected: another base model, wrong dtype or length, duplicate or out-of-range
            indices, negative or non-finite scores, too many candidates, bad example count.
    """
    cfg = _get(content, CONFIG, ConfigRecord)
    if cfg.get(BASE_FP) != base_fingerprint:
        raise ReplyRejected(
            f"base fingerprint {str(cfg.get(BASE_FP))[:12]!r} is not the server's {base_fingerprint[:12]!r}"
        )
    if cfg.get("n-eligible") != n_eligible:
        raise ReplyRejected(f"n-eligible={cfg.get('n-eligible')!r}, expected {n_eligible}")
    arrays = _get(content, ARRAYS, ArrayRecord)
    idx, sc = _numpy(arrays, "indices"), _numpy(arrays, "scores")
    if idx.dtype != np.int64 or idx.ndim != 1 or sc.ndim != 1 or idx.shape != sc.shape:
        raise ReplyRejected(f"candidates have {idx.dtype} {idx.shape} / {sc.dtype} {sc.shape}")
    if not np.issubdtype(sc.dtype, np.floating) or not 0 < idx.size <= max_candidates:
        raise ReplyRejected(f"{idx.size} candidates of {sc.dtype}; allowed 1..{max_candidates} floats")
    if idx.min() < 0 or idx.max() >= n_eligible:
        raise ReplyRejected(f"candidate indices outside [0, {n_eligible})")
    if np.unique(idx).size != idx.size:
        raise ReplyRejected("duplicate candidate indices")
    if not np.isfinite(sc).all() or (sc < 0).any():
        raise ReplyRejected("candidate scores must be finite and >= 0")
    return idx, sc.astype(np.float32), num_examples(content, max_examples)


def decode_candidate_head(
    content: RecordDict, head_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray] | None:
    """The warmed-up head of a candidates reply, or None when the site sent none.

    Raises:
        ReplyRejected: part of the head is missing, or a tensor has another shape, a non-float
            dtype or NaN/Inf values.
    """
    arrays = _get(content, ARRAYS, ArrayRecord)
    names = [k for k in arrays if k.startswith(HEAD_PREFIX)]
    if not names:
        return None
    head = _decode_head(arrays, head_shapes)
    extra = sorted(set(names) - {HEAD_PREFIX + n for n in head_shapes})
    if extra:
        raise ReplyRejected(f"unexpected arrays {extra[:5]}")
    return head


# ---------------------------------------------------------------- accounting
def record_nbytes(content: RecordDict) -> int:
    """Bytes of a ``RecordDict`` as Flower serialises it (its protobuf message)."""
    from flwr.common.serde import recorddict_to_proto

    return len(recorddict_to_proto(content).SerializeToString())
