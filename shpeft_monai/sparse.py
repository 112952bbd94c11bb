"""Value types of SH-PEFT: the mask (which weights are trained) and the delta (what they became).

One representation serves checkpoints, inference and federated messages: per tensor, sorted int64
flat indices and float32 values, plus fingerprints of the base weights and of the mask. Tensors are
ordered by name, so a mask also defines a single flat vector layout ("packed" form) that the
federated codec sends as one array.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["DeltaMismatchError", "SparseDelta", "SparseMask", "fingerprint_tensors", "mask_summary"]


class DeltaMismatchError(ValueError):
    """A delta or a federated update does not fit the model or mask it is applied to."""


def fingerprint_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes of the given tensors (order-independent).

    The one tensor hash of the project: the base-model fingerprint and the ``tensors`` checksum of
    every saved delta and mask (:mod:`shpeft_monai.io`).
    """
    h = hashlib.sha256()
    for name, t in sorted(tensors, key=lambda item: item[0]):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class SparseMask:
    """Which entries of which tensors are trained.

    Args:
        indices: parameter name -> sorted, unique int64 flat indices into that tensor.
        shapes: parameter name -> full tensor shape.
        base_fingerprint: fingerprint of the base model's backbone weights the mask was made for.

    Example:
        >>> m = SparseMask({"w": torch.tensor([1, 3])}, {"w": (2, 2)}, "base")
        >>> m.k, m.offsets()
        (2, {'w': 0})
    """

    indices: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    base_fingerprint: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        clean: dict[str, torch.Tensor] = {}
        for name in sorted(self.indices):
            if name not in self.shapes:
                raise DeltaMismatchError(f"mask tensor {name!r} has no shape entry.")
            idx = torch.as_tensor(self.indices[name]).detach().to("cpu")
            if idx.dtype != torch.int64 or idx.dim() != 1:
                raise DeltaMismatchError(
                    f"mask indices of {name!r} must be a 1-D int64 tensor, got {idx.dtype} {tuple(idx.shape)}."
                )
            numel = int(np.prod(self.shapes[name])) if self.shapes[name] else 1
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                raise DeltaMismatchError(
                    f"mask indices of {name!r} fall outside [0, {numel}) for shape {self.shapes[name]}."
                )
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise DeltaMismatchError(f"mask indices of {name!r} must be sorted and unique.")
            if idx.numel():
                clean[name] = idx.contiguous()
        object.__setattr__(self, "indices", clean)
        object.__setattr__(self, "shapes", {n: tuple(int(s) for s in self.shapes[n]) for n in sorted(clean)})

    @property
    def k(self) -> int:
        """Total number of selected entries."""
        return sum(int(i.numel()) for i in self.indices.values())

    @property
    def names(self) -> list[str]:
        return list(self.indices)

    def counts(self) -> dict[str, int]:
        return {n: int(i.numel()) for n, i in self.indices.items()}

    def offsets(self) -> dict[str, int]:
        """Start of each tensor's values in the packed vector."""
        out, pos = {}, 0
        for n, i in self.indices.items():
            out[n] = pos
            pos += int(i.numel())
        return out

    @property
    def fingerprint(self) -> str:
        """Identifies the mask: tensor names, shapes and indices, and the base weights."""
        h = hashlib.sha256(self.base_fingerprint.encode())
        for n, i in self.indices.items():
            h.update(f"{n}|{self.shapes[n]}|".encode())
            h.update(i.numpy().tobytes())
        return h.hexdigest()

    def pack(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate per-tensor values into one float32 vector in mask order."""
        missing = [n for n in self.indices if n not in values]
        if missing:
            raise DeltaMismatchError(f"values missing for masked tensors {missing[:5]}.")
        return torch.cat([values[n].detach().to("cpu", torch.float32).reshape(-1) for n in self.indices])

    def unpack(self, vector: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """Split a packed vector back into per-tensor values; the length must equal ``k``."""
        v = torch.as_tensor(vector)
        if v.dim() != 1 or v.numel() != self.k:
            raise DeltaMismatchError(
                f"packed values have shape {tuple(v.shape)}, expected ({self.k},) for this mask "
                f"(fingerprint {self.fingerprint[:12]})."
            )
        if not v.is_floating_point():
            raise DeltaMismatchError(f"packed values must be floating point, got {v.dtype}.")
        if not bool(torch.isfinite(v).all()):
            raise DeltaMismatchError("packed values contain NaN or Inf.")
        out, pos = {}, 0
        for n, i in self.indices.items():
            out[n] = v[pos : pos + i.numel()].to(torch.float32).clone()
            pos += int(i.numel())
        return out

    def layout(self) -> dict[str, Any]:
        """JSON-able description (names, shapes, counts, fingerprints) without the indices."""
        return {
            "k": self.k,
            "base_fingerprint": self.base_fingerprint,
            "mask_fingerprint": self.fingerprint,
            "tensors": {n: {"shape": list(self.shapes[n]), "count": c} for n, c in self.counts().items()},
        }

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Codec: ``{"indices": concatenated int64 indices}`` plus JSON-able metadata."""
        idx = torch.cat(list(self.indices.values())).numpy() if self.indices else np.zeros(0, dtype=np.int64)
        return {"indices": idx}, self.layout()

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], layout: Mapping[str, Any]) -> SparseMask:
        """Inverse of :meth:`to_arrays`; verifies the mask fingerprint."""
        try:
            idx = torch.from_numpy(np.ascontiguousarray(arrays["indices"]))
            tensors = layout["tensors"]
            shapes = {n: tuple(t["shape"]) for n, t in tensors.items()}
            counts = [int(t["count"]) for t in tensors.values()]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DeltaMismatchError(f"malformed mask payload: {exc!r}") from exc
        if idx.dim() != 1 or sum(counts) != idx.numel():
            raise DeltaMismatchError(
                f"mask payload has {idx.numel()} indices but its layout lists {sum(counts)}."
            )
        parts = dict(zip(tensors, torch.split(idx, counts)))
        mask = cls(parts, shapes, str(layout.get("base_fingerprint", "")))
        expected = layout.get("mask_fingerprint")
        if expected is not None and expected != mask.fingerprint:
            raise DeltaMismatchError("mask payload fingerprint does not match its indices (tampered?).")
        return mask


@dataclass
class SparseDelta:
    """A trained SH-PEFT result: selected-value changes, the new head, and how they were made.

    ``values[name]`` holds, for each index in ``mask.indices[name]``, the change from the base
    weight (``merged = base + delta``). ``head`` is the dense state of the classification head.
    """

    mask: SparseMask
    values: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for n, idx in self.mask.indices.items():
            v = self.values.get(n)
            if v is None or v.dim() != 1 or v.numel() != idx.numel():
                got = None if v is None else tuple(v.shape)
                raise DeltaMismatchError(
                    f"delta values of {n!r} have shape {got}, expected ({idx.numel()},)."
                )
        extra = sorted(set(self.values) - set(self.mask.indices))
        if extra:
            raise DeltaMismatchError(f"delta has values for tensors that are not in its mask: {extra[:5]}")

    @property
    def head_numel(self) -> int:
        return sum(int(t.numel()) for t in self.head.values())

    def summary(self) -> dict[str, Any]:
        return {
            "selected_backbone_weights": self.mask.k,
            "head_parameters": self.head_numel,
            "trainable_total": self.mask.k + self.head_numel,
            "tensors": len(self.mask.indices),
            "mask_fingerprint": self.mask.fingerprint,
            "base_fingerprint": self.mask.base_fingerprint,
        }

    def __repr__(self) -> str:  # keep logs short
        return f"SparseDelta({json.dumps(self.summary())})"


def _block_of(name: str) -> str:
    m = re.match(r"^(.*?\.\d+)\.", name)
    return m.group(1) if m else name.split(".", 1)[0]


def mask_summary(mask: SparseMask) -> dict[str, Any]:
    """Counts of selected weights per tensor, per block and per tensor type (numbers stripped)."""
    by_block: Counter[str] = Counter()
    by_type: Counter[str] = Counter()
    for name, count in mask.counts().items():
        by_block[_block_of(name)] += count
        by_type[re.sub(r"\.\d+\.", ".*.", name)] += count

    def natural(item: tuple[str, int]) -> list:  # blocks.2 before blocks.10
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", item[0])]

    return {
        "k": mask.k,
        "by_tensor": mask.counts(),
        "by_block": dict(sorted(by_block.items(), key=natural)),
        "by_type": dict(sorted(by_type.items(), key=natural)),
    }
