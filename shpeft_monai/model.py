"""Inject a mask into any torch module, train, then extract, merge, eject or apply the delta.

Plain ``torch.nn.Module`` in, plain module out: works on timm and MONAI networks alike. After
:func:`inject`, the only trainable parameters are the per-tensor ``shpeft_delta`` vectors (k values
in all) and the classification head, so any optimizer (with any weight decay) built from
:func:`trainable_parameters` cannot move an unselected weight.

This module only decides which tensors carry a sparse layer and iterates over them; each layer
sets itself up, tears itself down and gives its delta (:mod:`shpeft_monai.layers`). Parameter
discovery and fingerprints live in :mod:`shpeft_monai.parameters` and are re-exported here, as is
:func:`~shpeft_monai.sparse.mask_summary`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from . import layers
from .config import SHPEFTConfig
from .parameters import (
    _base_named_parameters,
    _is_head,
    backbone_fingerprint,
    bare_module,
    eligible_parameters,
    head_parameters,
    parameter_kind,
)
from .sparse import DeltaMismatchError, SparseDelta, SparseMask, mask_summary

__all__ = [
    "apply_delta",
    "backbone_fingerprint",
    "bare_module",
    "eject",
    "eligible_parameters",
    "extract_delta",
    "get_mask",
    "head_parameters",
    "inject",
    "is_injected",
    "load_delta_values",
    "mask_summary",
    "merge",
    "parameter_kind",
    "trainable_parameters",
    "trainable_report",
]

logger = logging.getLogger(__name__)


def is_injected(model: nn.Module) -> bool:
    return getattr(bare_module(model), "_shpeft_mask", None) is not None


def get_mask(model: nn.Module) -> SparseMask:
    mask = getattr(bare_module(model), "_shpeft_mask", None)
    if mask is None:
        raise RuntimeError("the model has no SH-PEFT mask; call shpeft_monai.inject(model, mask) first.")
    return mask


def _split(name: str) -> tuple[str, str]:
    mod, _, pname = name.rpartition(".")
    return mod, pname


def _sites(model: nn.Module) -> dict[str, layers.SparseDeltaLayer]:
    """Each masked tensor's sparse layer, by base parameter name (mask order)."""
    model, out = bare_module(model), {}
    for name in get_mask(model).indices:
        mod_name, pname = _split(name)
        out[name] = layers.layer_of(model.get_submodule(mod_name), pname)
    return out


def inject(model: nn.Module, mask: SparseMask, config: SHPEFTConfig | None = None) -> nn.Module:
    """Freeze ``model`` and make exactly the masked entries (plus the head) trainable, in place.

    Raises:
        DeltaMismatchError: the mask was made for another base model or other tensor shapes.
    """
    config = config or SHPEFTConfig()
    if is_injected(model):
        raise RuntimeError("the model already carries an SH-PEFT mask; merge() or eject() it first.")
    params = dict(_base_named_parameters(model))
    bad = [
        f"{n}: mask {mask.shapes[n]} vs model {tuple(params[n].shape) if n in params else 'missing'}"
        for n in mask.indices
        if n not in params or tuple(params[n].shape) != mask.shapes[n]
    ]
    if bad:
        raise DeltaMismatchError(
            f"the mask does not fit this model ({len(bad)} tensors differ, e.g. {bad[:3]}); "
            "it was made for another architecture."
        )
    if mask.base_fingerprint:
        fp = backbone_fingerprint(model, config)
        if fp != mask.base_fingerprint:
            raise DeltaMismatchError(
                f"the mask was made for base weights {mask.base_fingerprint[:12]}, this model has "
                f"{fp[:12]}; load the same pretrained weights the mask was selected on."
            )
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head_parameters(model, config).values():
        p.requires_grad_(True)

    def fallback(name: str) -> bool:  # fast paths first: a parametrised module is no longer plain
        mod_name, pname = _split(name)
        return layers.fast_path_class(model.get_submodule(mod_name), pname) is None

    for name in sorted(mask.indices, key=fallback):
        mod_name, pname = _split(name)
        layers.attach(model.get_submodule(mod_name), pname, mask.indices[name])
    model._shpeft_mask = mask
    model._shpeft_config = config
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimizer must hold: the k selected values and the head (nothing else)."""
    return [p for p in model.parameters() if p.requires_grad]


def load_delta_values(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Set the trained deltas of an injected model (resume, federated rounds)."""
    sites = _sites(model)
    if set(values) != set(sites):
        raise DeltaMismatchError(
            f"delta tensors {sorted(set(values) ^ set(sites))[:5]} do not match the model's mask."
        )
    for name, site in sites.items():
        v = torch.as_tensor(values[name])
        if v.shape != site.shpeft_delta.shape:
            raise DeltaMismatchError(
                f"delta of {name!r} has shape {tuple(v.shape)}, expected {tuple(site.shpeft_delta.shape)}."
            )
        site.load_delta(v)


def extract_delta(model: nn.Module, meta: dict[str, Any] | None = None) -> SparseDelta:
    """The trained result of an injected model as a :class:`SparseDelta` (CPU copies)."""
    model = bare_module(model)
    mask, config = get_mask(model), model._shpeft_config
    values = {n: s.delta_values() for n, s in _sites(model).items()}
    head = {n: p.detach().to("cpu").clone() for n, p in head_parameters(model, config).items()}
    return SparseDelta(mask, values, head, config.to_dict(), dict(meta or {}))


def _unwrap(model: nn.Module, merge: bool) -> nn.Module:
    model = bare_module(model)
    sites = _sites(model)
    attached = sorted(sites, key=lambda n: isinstance(sites[n], layers.SparseOverwrite))  # as inject did
    for name in reversed(attached):  # last in, first out: each module gets its own state back
        mod_name, pname = _split(name)
        layers.detach(model.get_submodule(mod_name), pname, merge=merge)
    del model._shpeft_mask, model._shpeft_config
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold the deltas into the weights and remove SH-PEFT: a plain model at zero extra cost."""
    return _unwrap(model, merge=True)


def eject(model: nn.Module) -> nn.Module:
    """Remove SH-PEFT and restore the base weights (the head keeps its trained values)."""
    return _unwrap(model, merge=False)


def apply_delta(model: nn.Module, delta: SparseDelta, *, check_fingerprint: bool = True) -> nn.Module:
    """Merge a saved delta and head into a plain base model, in place, for inference.

    Raises:
        DeltaMismatchError: the delta was made for another base model, or the head does not fit.
    """
    config = SHPEFTConfig.from_dict(delta.config) if delta.config else SHPEFTConfig()
    params = dict(_base_named_parameters(model))
    if check_fingerprint and delta.mask.base_fingerprint:
        fp = backbone_fingerprint(model, config)
        if fp != delta.mask.base_fingerprint:
            raise DeltaMismatchError(
                f"this delta was made for base weights {delta.mask.base_fingerprint[:12]} but the model has "
                f"{fp[:12]}: build the model from the same pretrained checkpoint (and architecture) "
                "the delta was trained on."
            )
    for name, t in delta.head.items():
        if name not in params or params[name].shape != t.shape:
            got = tuple(params[name].shape) if name in params else "missing"
            raise DeltaMismatchError(
                f"head tensor {name!r} has shape {tuple(t.shape)} in the delta but {got} in the model: "
                "create the model with the same number of classes."
            )
    with torch.no_grad():
        for name, idx in delta.mask.indices.items():
            p = params.get(name)
            if p is None or tuple(p.shape) != delta.mask.shapes[name]:
                raise DeltaMismatchError(f"delta tensor {name!r} does not fit the model.")
            flat = p.view(-1)
            i = idx.to(p.device)
            acc = torch.promote_types(p.dtype, torch.float32)  # as the layers' merge sums them
            new = (flat[i].to(acc) + delta.values[name].to(p.device, acc)).to(p.dtype)
            flat.index_copy_(0, i, new)
        for name, t in delta.head.items():
            params[name].copy_(t)
    return model


def trainable_report(model: nn.Module) -> dict[str, Any]:
    """Selected backbone weights, head parameters and their share of the backbone."""
    model = bare_module(model)
    mask, config = get_mask(model), model._shpeft_config
    head = sum(p.numel() for p in head_parameters(model, config).values())
    backbone = sum(p.numel() for n, p in _base_named_parameters(model) if not _is_head(n, config))
    trainable = sum(p.numel() for p in trainable_parameters(model))
    return {
        "selected_backbone_weights": mask.k,
        "head_parameters": int(head),
        "trainable_total": int(trainable),
        "backbone_parameters": int(backbone),
        "selected_share_of_backbone": mask.k / max(backbone, 1),
    }
