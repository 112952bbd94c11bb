"""Save and load SH-PEFT deltas: one safetensors file, no pickle, verified on load.

File layout (``format = shpeft-delta/1``):

* tensor ``mask.indices``: int64, the selected flat indices of every tensor, concatenated in name order;
* tensor ``delta.values``: float32, the matching changes ``merged - base``;
* tensors ``head.<name>``: the dense classification head;
* metadata (JSON strings): ``layout`` (tensor names, shapes, counts, base and mask fingerprints),
  ``config`` (the :class:`SHPEFTConfig`), ``meta`` (free-form run facts) and ``payload_sha256``
  (checksum over every tensor's bytes).

Writes are atomic (temporary file, fsync, rename). Loading refuses a file with trailing bytes, a bad
checksum, wrong dtypes, out-of-range or unsorted indices, or a fingerprint that does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .sparse import DeltaMismatchError, SparseDelta, SparseMask

__all__ = ["FORMAT", "DeltaFileError", "atomic_write_bytes", "atomic_write_text", "load_delta", "save_delta"]

FORMAT = "shpeft-delta/1"


class DeltaFileError(ValueError):
    """A delta file is missing, corrupt, tampered with or of another format."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename (never a half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def delta_to_bytes(delta: SparseDelta) -> bytes:
    """Serialise a delta in the safetensors format above."""
    arrays, layout = delta.mask.to_arrays()
    tensors = {
        "mask.indices": torch.from_numpy(arrays["indices"]).to(torch.int64),
        "delta.values": delta.mask.pack(delta.values),
    }
    for name, t in delta.head.items():
        tensors[f"head.{name}"] = t.detach().to("cpu").contiguous()
    metadata = {
        "format": FORMAT,
        "layout": json.dumps(layout),
        "config": json.dumps(delta.config),
        "meta": json.dumps(delta.meta, default=str),
        "payload_sha256": _checksum(tensors),
    }
    return st_save(tensors, metadata=metadata)


def save_delta(path: str | os.PathLike, delta: SparseDelta) -> Path:
    """Save ``delta`` atomically to ``path`` (``.safetensors``); returns the path."""
    return atomic_write_bytes(path, delta_to_bytes(delta))


def _header(data: bytes, where: str) -> dict[str, Any]:
    if len(data) < 8:
        raise DeltaFileError(f"{where}: file is {len(data)} bytes, too short to be a delta file.")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise DeltaFileError(f"{where}: header length {n} exceeds the file size (truncated file?).")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeltaFileError(f"{where}: the header is not valid JSON ({exc}).") from exc
    if not isinstance(header, dict):
        raise DeltaFileError(f"{where}: the header is not a JSON object.")
    if not isinstance(header.get("__metadata__", {}), dict):
        raise DeltaFileError(f"{where}: '__metadata__' in the header is not an object.")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise DeltaFileError(f"{where}: malformed tensor entry in the header ({exc!r}).") from exc
    if 8 + n + end != len(data):
        raise DeltaFileError(
            f"{where}: the file has {len(data) - 8 - n - end} unexpected bytes after its data "
            "(truncated, appended to or tampered with)."
        )
    return header


def delta_from_bytes(data: bytes, where: str = "<bytes>") -> SparseDelta:
    """Parse and verify a delta (see module docstring). Raises :class:`DeltaFileError`."""
    header = _header(data, where)
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise DeltaFileError(
            f"{where}: format {meta.get('format')!r} is not {FORMAT!r}; is this a delta file?"
        )
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise DeltaFileError(f"{where}: unreadable tensors ({exc}).") from exc
    if _checksum(tensors) != meta.get("payload_sha256"):
        raise DeltaFileError(f"{where}: checksum mismatch: the file was modified or corrupted.")
    idx, vals = tensors.get("mask.indices"), tensors.get("delta.values")
    if idx is None or vals is None:
        raise DeltaFileError(f"{where}: missing tensor 'mask.indices' or 'delta.values'.")
    if idx.dtype != torch.int64 or vals.dtype != torch.float32:
        raise DeltaFileError(
            f"{where}: expected int64 indices and float32 values, got {idx.dtype} and {vals.dtype}."
        )
    try:
        layout = json.loads(meta["layout"])
        mask = SparseMask.from_arrays({"indices": idx.numpy()}, layout)
        values = mask.unpack(vals)
        head = {k[len("head.") :]: t for k, t in tensors.items() if k.startswith("head.")}
        bad_head = [
            k for k, t in head.items() if not t.is_floating_point() or not bool(torch.isfinite(t).all())
        ]
        if bad_head:
            raise DeltaMismatchError(f"head tensors {bad_head} are not finite floating-point tensors.")
        return SparseDelta(
            mask, values, head, json.loads(meta.get("config", "{}")), json.loads(meta.get("meta", "{}"))
        )
    except (DeltaMismatchError, KeyError, json.JSONDecodeError, TypeError, ValueError, AttributeError) as exc:
        raise DeltaFileError(f"{where}: {exc}") from exc


def load_delta(path: str | os.PathLike) -> SparseDelta:
    """Load and verify a delta saved by :func:`save_delta`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"delta file {str(path)!r} does not exist; check the path (or train first).")
    return delta_from_bytes(path.read_bytes(), str(path))
