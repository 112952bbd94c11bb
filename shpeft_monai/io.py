"""The on-disk contract of SH-PEFT: artefact file names, the delta and mask files, atomic writers.

File names of a run folder are named once here (in the manner of peft's ``utils/constants.py``):
:data:`MASK_FILE`, :data:`BEST_DELTA_FILE`, :data:`LAST_TRAINER_FILE` and the others below.

A delta (``format = shpeft-delta/2``) and a mask (``format = shpeft-mask/1``) are each one
safetensors file, no pickle:

* tensor ``mask.indices``: int64, the selected flat indices of every tensor, concatenated in name order;
* tensor ``delta.values`` (delta only): float32, the matching changes ``merged - base``;
* tensors ``head.<name>`` (delta only): the dense classification head;
* metadata (canonical JSON strings): ``layout`` (tensor names, shapes, counts, base and mask
  fingerprints), ``config`` (the :class:`SHPEFTConfig`), ``meta`` (free-form run facts) and ``sha256``:
  one SHA-256 per part (``format``, ``layout``, ``config``, ``meta`` over their stored strings,
  ``tensors`` over every tensor's name, shape, dtype and bytes), so that any edit is refused with the
  name of the part that changed.

Writes are atomic (temporary file, fsync, rename). Loading refuses a truncated file or one with
trailing bytes, an edited part, wrong dtypes, out-of-range or unsorted indices, a mask fingerprint
that does not match its indices, and a file of the other kind (a mask passed to :func:`load_delta`,
a delta to :func:`load_mask`). ``shpeft-delta/1`` files (whose checksum covered the tensors only)
are refused with a request to re-create them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .sparse import DeltaMismatchError, SparseDelta, SparseMask, fingerprint_tensors

__all__ = [
    "BEST_DELTA_FILE",
    "BEST_TRAINABLE_FILE",
    "DATALIST_FILE",
    "FEDERATED_REPORT_FILE",
    "FORMAT",
    "GLOBAL_DELTA_FILE",
    "HISTORY_FILE",
    "LAST_STATE_FILE",
    "LAST_TRAINER_FILE",
    "MASK_FILE",
    "MASK_FORMAT",
    "METRICS_FILE",
    "PREDICTIONS_FILE",
    "RUN_FILE",
    "DeltaFileError",
    "MaskFile",
    "atomic_write_bytes",
    "atomic_write_text",
    "delta_from_bytes",
    "delta_to_bytes",
    "dumps_json",
    "load_artefact",
    "load_delta",
    "load_mask",
    "mask_from_bytes",
    "mask_to_bytes",
    "save_delta",
    "save_mask",
    "write_json",
]

FORMAT = "shpeft-delta/2"
MASK_FORMAT = "shpeft-mask/1"
_RETIRED = {"shpeft-delta/1": "its checksum covered the tensors but not the config, meta and layout"}

# ----------------------------------------------------------------------- file names of a run folder
MASK_FILE = "mask.safetensors"
BEST_DELTA_FILE = "best_delta.safetensors"
BEST_TRAINABLE_FILE = "best_trainable.safetensors"
LAST_STATE_FILE = "last_state.pt"  # trainable + optimizer state + counters, one atomic file (weights_only)
LAST_TRAINER_FILE = "last_trainer.json"
HISTORY_FILE = "history.json"
RUN_FILE = "run.json"
DATALIST_FILE = "datalist.json"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
GLOBAL_DELTA_FILE = "global_delta.safetensors"  # a federated run's result
FEDERATED_REPORT_FILE = "federated.json"  # a federated run's report
_ARTEFACTS = (BEST_DELTA_FILE, MASK_FILE, GLOBAL_DELTA_FILE)

_PARTS = ("layout", "config", "meta")
_MAX_HEADER = 100_000_000  # safetensors' own limit on the header length


class DeltaFileError(ValueError):
    """A delta or mask file is corrupt, tampered with, of the other kind or of another format."""


class MaskFile(NamedTuple):
    """What :func:`load_mask` returns: the mask, the config it was selected with, and run facts."""

    mask: SparseMask
    config: dict[str, Any]
    meta: dict[str, Any]


# ------------------------------------------------------------------------------- atomic writers
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
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; an artefact is readable like any other file
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
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _key(k: Any) -> str:
    if isinstance(k, np.generic):
        k = k.item()
    if isinstance(k, str):
        return k
    if k is None or isinstance(k, (bool, int, float)):
        return json.dumps(k)  # what json itself does with such keys
    return str(k)


def _jsonable(obj: Any) -> Any:
    """``obj`` as standard JSON values: non-finite floats -> None, numpy/torch -> Python, Path -> str."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return _jsonable(obj.tolist())
    if isinstance(obj, Mapping):
        return {_key(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        items = [_jsonable(v) for v in obj]
        try:
            return sorted(items)
        except TypeError:
            return items
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    return str(obj)


def dumps_json(obj: Any, indent: int | None = 1, sort_keys: bool = False) -> str:
    """Standard JSON text of ``obj``: NaN/Inf (also numpy's) become ``null``, numpy scalars and
    arrays become numbers and lists, paths become strings, other objects their ``str``."""
    return json.dumps(_jsonable(obj), indent=indent, sort_keys=sort_keys, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1, sort_keys: bool = False) -> Path:
    """Write ``obj`` to ``path`` as standard JSON (see :func:`dumps_json`), atomically; returns the path.

    Example:
        >>> import math, tempfile
        >>> p = write_json(Path(tempfile.mkdtemp()) / "m.json", {"auc": math.nan, "n": np.int64(3)})
        >>> p.read_text()
        '{\\n "auc": null,\\n "n": 3\\n}\\n'
    """
    return atomic_write_text(path, dumps_json(obj, indent, sort_keys) + "\n")


# ------------------------------------------------------------------------------------- writing
def _canonical(obj: Any) -> str:
    return json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _to_bytes(fmt: str, tensors: dict[str, torch.Tensor], parts: dict[str, Any]) -> bytes:
    metadata = {"format": fmt, **{k: _canonical(parts[k]) for k in _PARTS}}
    digests = {k: _sha(v) for k, v in metadata.items()}
    digests["tensors"] = fingerprint_tensors(tensors.items())
    metadata["sha256"] = _canonical(digests)
    return st_save(tensors, metadata=metadata)


def delta_to_bytes(delta: SparseDelta) -> bytes:
    """Serialise a delta in the ``shpeft-delta/2`` format (module docstring)."""
    arrays, layout = delta.mask.to_arrays()
    tensors = {
        "mask.indices": torch.from_numpy(arrays["indices"]).to(torch.int64),
        "delta.values": delta.mask.pack(delta.values),
    }
    for name, t in delta.head.items():
        tensors[f"head.{name}"] = t.detach().to("cpu").contiguous()
    return _to_bytes(FORMAT, tensors, {"layout": layout, "config": delta.config, "meta": delta.meta})


def mask_to_bytes(mask: SparseMask, config: Mapping[str, Any], meta: Mapping[str, Any]) -> bytes:
    """Serialise a mask in the ``shpeft-mask/1`` format (module docstring)."""
    arrays, layout = mask.to_arrays()
    tensors = {"mask.indices": torch.from_numpy(arrays["indices"]).to(torch.int64)}
    return _to_bytes(MASK_FORMAT, tensors, {"layout": layout, "config": dict(config), "meta": dict(meta)})


def save_delta(path: str | os.PathLike, delta: SparseDelta) -> Path:
    """Save ``delta`` atomically to ``path`` (``.safetensors``); returns the path."""
    return atomic_write_bytes(path, delta_to_bytes(delta))


def save_mask(
    path: str | os.PathLike,
    mask: SparseMask,
    config: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``mask`` with the config it was selected with and run facts, atomically; returns the path.

    Example:
        >>> import tempfile
        >>> m = SparseMask({"w": torch.tensor([1, 3])}, {"w": (2, 2)}, "base")
        >>> p = save_mask(Path(tempfile.mkdtemp()) / MASK_FILE, m, {"budget": 2}, {"seconds": 0.1})
        >>> load_mask(p).mask == m
        True
    """
    return atomic_write_bytes(path, mask_to_bytes(mask, config or {}, meta or {}))


# ------------------------------------------------------------------------------------- reading
def _header(data: bytes, where: str) -> dict[str, Any]:
    """The safetensors header, after checking that the file is one and is complete."""
    size = len(data)
    if size < 8:
        raise DeltaFileError(
            f"{where}: not a safetensors file: it is {size} bytes long, shorter than the 8-byte header length."
        )
    (n,) = struct.unpack("<Q", data[:8])
    looks_json = data[8:9] == b"{"
    if n > size - 8:
        if looks_json and n <= _MAX_HEADER:
            raise DeltaFileError(
                f"{where}: truncated: the header promises {n} bytes of JSON but the file ends after "
                f"{size - 8} of them."
            )
        raise DeltaFileError(
            f"{where}: not a safetensors file: its first 8 bytes give a header length of {n} bytes, "
            f"but the whole file is {size} bytes."
        )
    if not looks_json:
        raise DeltaFileError(f"{where}: not a safetensors file: its header does not start with '{{'.")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DeltaFileError(
            f"{where}: not a safetensors file: its header is not valid JSON ({exc})."
        ) from exc
    if not isinstance(header, dict):
        raise DeltaFileError(f"{where}: not a safetensors file: its header is not a JSON object.")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise DeltaFileError(f"{where}: the header's '__metadata__' is not a mapping of strings.")
    try:
        spans = [
            (int(v["data_offsets"][0]), int(v["data_offsets"][1]))
            for k, v in header.items()
            if k != "__metadata__"
        ]
    except (KeyError, IndexError, TypeError, ValueError, OverflowError) as exc:
        raise DeltaFileError(f"{where}: malformed tensor entry in the header ({exc!r}).") from exc
    if any(start < 0 or end < start for start, end in spans):
        raise DeltaFileError(f"{where}: malformed tensor entry in the header (negative or reversed offsets).")
    promised, body = max((end for _, end in spans), default=0), size - 8 - n
    if promised > body:
        raise DeltaFileError(
            f"{where}: truncated: the header promises {promised} bytes of tensor data but the file has {body}."
        )
    if promised < body:
        raise DeltaFileError(
            f"{where}: {body - promised} unexpected bytes after the tensor data (appended to or tampered with)."
        )
    return header


def _strict_json(text: str, what: str, where: str) -> Any:
    def refuse(token: str) -> Any:
        raise ValueError(f"non-standard JSON constant {token}")

    try:
        return json.loads(text, parse_constant=refuse)
    except (ValueError, RecursionError) as exc:
        raise DeltaFileError(f"{where}: the {what} metadata is not valid JSON ({exc}).") from exc


def _verified(data: bytes, where: str) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(format, parsed layout/config/meta, tensors) of an artefact whose every part checks out."""
    metadata = _header(data, where).get("__metadata__") or {}
    fmt = metadata.get("format")
    if fmt is None:
        raise DeltaFileError(
            f"{where}: a safetensors file but not a shpeft-monai artefact (no 'format' in its metadata; "
            "a plain checkpoint?)."
        )
    if fmt in _RETIRED:
        raise DeltaFileError(
            f"{where}: format {fmt!r} is retired ({_RETIRED[fmt]}); re-create the file with this version "
            f"(it reads {FORMAT!r} and {MASK_FORMAT!r}): train again or save the delta again."
        )
    if fmt not in (FORMAT, MASK_FORMAT):
        raise DeltaFileError(
            f"{where}: format {fmt!r} is not one this version reads ({FORMAT!r}, {MASK_FORMAT!r})."
        )
    expected = {"format", *_PARTS, "sha256"}
    if set(metadata) != expected:
        raise DeltaFileError(
            f"{where}: metadata entries {sorted(metadata)} are not the expected {sorted(expected)} "
            "(entries were added or removed after saving)."
        )
    record = _strict_json(metadata["sha256"], "'sha256' integrity", where)
    checked = ("format", *_PARTS)
    if not isinstance(record, dict) or set(record) != {*checked, "tensors"}:
        raise DeltaFileError(f"{where}: the 'sha256' integrity record is malformed (edited after saving?).")
    changed = [k for k in checked if _sha(metadata[k]) != record[k]]
    if changed:
        raise DeltaFileError(
            f"{where}: checksum mismatch: the {', '.join(changed)} metadata was modified after saving "
            "(or the file is corrupt); refusing to load it."
        )
    parts = {k: _strict_json(metadata[k], repr(k), where) for k in _PARTS}
    for k in ("config", "meta", "layout"):
        if not isinstance(parts[k], dict):
            raise DeltaFileError(f"{where}: the {k!r} metadata is not a JSON object.")
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise DeltaFileError(f"{where}: unreadable tensors ({exc}).") from exc
    if fingerprint_tensors(tensors.items()) != record["tensors"]:
        raise DeltaFileError(
            f"{where}: checksum mismatch: the tensor data was modified after saving (or the file is "
            "corrupt); refusing to load it."
        )
    return fmt, parts, tensors


def _mask_of(tensors: dict[str, torch.Tensor], layout: dict[str, Any]) -> SparseMask:
    idx = tensors.get("mask.indices")
    if idx is None:
        raise DeltaMismatchError("missing tensor 'mask.indices'.")
    if idx.dtype != torch.int64:
        raise DeltaMismatchError(f"expected int64 indices, got {idx.dtype}.")
    return SparseMask.from_arrays({"indices": idx.numpy()}, layout)


def _wrong_kind(fmt: str, where: str, wanted: str) -> DeltaFileError:
    if fmt == MASK_FORMAT:
        return DeltaFileError(
            f"{where}: this is a mask file ({MASK_FORMAT!r}: the selected indices, no trained values), "
            "not a delta; load it with shpeft_monai.io.load_mask."
        )
    return DeltaFileError(
        f"{where}: this is a delta file ({fmt!r}: trained values and head), not a {wanted}; load it with "
        "shpeft_monai.io.load_delta (its mask is delta.mask)."
    )


def _delta_of(parts: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> SparseDelta:
    extra = sorted(
        n for n in tensors if n not in ("mask.indices", "delta.values") and not n.startswith("head.")
    )
    try:
        if extra:
            raise DeltaMismatchError(f"unexpected tensors {extra[:5]} in a delta file.")
        vals = tensors.get("delta.values")
        if vals is None:
            raise DeltaMismatchError("missing tensor 'delta.values'.")
        if vals.dtype != torch.float32:
            raise DeltaMismatchError(f"expected float32 values, got {vals.dtype}.")
        mask = _mask_of(tensors, parts["layout"])
        values = mask.unpack(vals)
        head = {k[len("head.") :]: t for k, t in tensors.items() if k.startswith("head.")}
        bad_head = [
            k for k, t in head.items() if not t.is_floating_point() or not bool(torch.isfinite(t).all())
        ]
        if bad_head:
            raise DeltaMismatchError(f"head tensors {bad_head} are not finite floating-point tensors.")
        return SparseDelta(mask, values, head, parts["config"], parts["meta"])
    except (DeltaMismatchError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DeltaFileError(f"{where}: {exc}") from exc


def _mask_file_of(parts: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> MaskFile:
    try:
        if set(tensors) != {"mask.indices"}:
            raise DeltaMismatchError(f"a mask file holds only 'mask.indices', found {sorted(tensors)[:5]}.")
        mask = _mask_of(tensors, parts["layout"])
        return MaskFile(dataclasses.replace(mask, meta=dict(parts["meta"])), parts["config"], parts["meta"])
    except (DeltaMismatchError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DeltaFileError(f"{where}: {exc}") from exc


def delta_from_bytes(data: bytes, where: str = "<bytes>") -> SparseDelta:
    """Parse and verify a delta (see module docstring). Raises :class:`DeltaFileError`."""
    fmt, parts, tensors = _verified(data, where)
    if fmt != FORMAT:
        raise _wrong_kind(fmt, where, "delta")
    return _delta_of(parts, tensors, where)


def mask_from_bytes(data: bytes, where: str = "<bytes>") -> MaskFile:
    """Parse and verify a mask file (see module docstring). Raises :class:`DeltaFileError`."""
    fmt, parts, tensors = _verified(data, where)
    if fmt != MASK_FORMAT:
        raise _wrong_kind(fmt, where, "mask")
    return _mask_file_of(parts, tensors, where)


def _read(path: str | os.PathLike, what: str) -> tuple[bytes, str]:
    path = Path(path)
    if path.is_dir():
        inside = [name for name in _ARTEFACTS if (path / name).is_file()]
        inside = inside or sorted(p.name for p in path.glob("*.safetensors"))
        hint = f", e.g. {str(path / inside[0])!r}" if inside else ""
        raise DeltaFileError(f"{str(path)!r} is a directory, not a {what} file; pass the file itself{hint}.")
    if not path.exists():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist; check the path (or train first).")
    if not path.is_file():
        raise DeltaFileError(f"{str(path)!r} is not a regular file.")
    return path.read_bytes(), str(path)


def load_delta(path: str | os.PathLike) -> SparseDelta:
    """Load and verify a delta saved by :func:`save_delta` (a mask file is refused: :func:`load_mask`)."""
    data, where = _read(path, "delta")
    return delta_from_bytes(data, where)


def load_mask(path: str | os.PathLike) -> MaskFile:
    """Load and verify a mask saved by :func:`save_mask`: ``(mask, config, meta)``; ``mask.meta`` is
    ``meta`` too. A delta file is refused (its mask is ``load_delta(path).mask``)."""
    data, where = _read(path, "mask")
    return mask_from_bytes(data, where)


def load_artefact(path: str | os.PathLike) -> SparseDelta | MaskFile:
    """Load and verify either kind of artefact: a :class:`SparseDelta` or a :class:`MaskFile`."""
    data, where = _read(path, "delta or mask")
    fmt, parts, tensors = _verified(data, where)
    if fmt == MASK_FORMAT:
        return _mask_file_of(parts, tensors, where)
    return _delta_of(parts, tensors, where)
