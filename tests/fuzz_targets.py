"""Fuzz targets: plain functions of raw input that must never raise anything but the documented error.

They are driven by hypothesis in ``tests/test_reliability.py`` (bounded, part of ``make test``) and can
be driven unchanged by atheris for a long, coverage-guided run, e.g.::

    import atheris, sys
    with atheris.instrument_imports():
        from tests.fuzz_targets import fuzz_delta_bytes
    atheris.Setup(sys.argv, fuzz_delta_bytes)
    atheris.Fuzz()

A target returns normally when the input was accepted or refused cleanly; any other exception is a
finding (a crash the caller would not catch).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from shpeft_monai.io import DeltaFileError, MaskFile, delta_from_bytes, mask_from_bytes
from shpeft_monai.sparse import SparseDelta

__all__ = [
    "fuzz_decode_update",
    "fuzz_delta_bytes",
    "fuzz_mask_bytes",
    "fuzz_update_arrays",
    "join_safetensors",
    "split_safetensors",
]


def fuzz_delta_bytes(data: bytes) -> SparseDelta | None:
    """The delta loader on arbitrary bytes: a valid :class:`SparseDelta` or :class:`DeltaFileError`."""
    try:
        delta = delta_from_bytes(bytes(data), "<fuzz>")
    except DeltaFileError:
        return None
    assert isinstance(delta, SparseDelta)
    for name, idx in delta.mask.indices.items():  # an accepted delta is internally consistent
        assert delta.values[name].numel() == idx.numel()
    return delta


def fuzz_mask_bytes(data: bytes) -> MaskFile | None:
    """The mask loader on arbitrary bytes: a valid :class:`MaskFile` or :class:`DeltaFileError`."""
    try:
        loaded = mask_from_bytes(bytes(data), "<fuzz>")
    except DeltaFileError:
        return None
    assert isinstance(loaded, MaskFile) and isinstance(loaded.config, dict) and isinstance(loaded.meta, dict)
    assert loaded.mask.k == sum(loaded.mask.counts().values())
    return loaded


def split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(header JSON, tensor bytes) of a well-formed safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_safetensors(header: Any, body: bytes) -> bytes:
    """A file with ``header`` (any JSON value) and a correct length prefix."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def fuzz_decode_update(
    content: Any, *, mask_fingerprint: str, k: int, head_shapes: Mapping[str, tuple[int, ...]]
) -> tuple[np.ndarray, dict[str, np.ndarray], int] | None:
    """The federated reply decoder: decoded values or :class:`shpeft_monai.fl.codec.ReplyRejected`."""
    from shpeft_monai.fl import codec

    try:
        values, head, n = codec.decode_update(
            content, mask_fingerprint=mask_fingerprint, k=k, head_shapes=head_shapes, max_examples=1000
        )
    except codec.ReplyRejected:
        return None
    assert values.dtype == np.float32 and values.shape == (k,) and np.isfinite(values).all()
    assert set(head) == set(head_shapes) and all(np.isfinite(h).all() for h in head.values())
    assert 1 <= n <= 1000
    return values, head, n


def fuzz_update_arrays(arrays: Mapping[str, Any], metrics: Mapping[str, Any] | None, fingerprint: Any) -> Any:
    """Build a reply ``RecordDict`` from fuzzed parts (numpy arrays or raw ``Array`` objects).

    Construction errors of Flower's own record types (they validate their inputs) are not findings:
    such a reply could not be built or deserialised by Flower in the first place; ``None`` is returned.
    """
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from shpeft_monai.fl import codec

    try:
        rec = ArrayRecord(
            {k: v if isinstance(v, Array) else Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
        )
        rd = RecordDict({codec.ARRAYS: rec, codec.CONFIG: ConfigRecord({codec.MASK_FP: fingerprint})})
        if metrics is not None:
            rd[codec.METRICS] = MetricRecord(dict(metrics))
    except (TypeError, ValueError):
        return None
    return rd
