"""Inject a mask into any torch module, train, then extract, merge, eject or apply the delta.

Plain ``torch.nn.Module`` in, plain module out: works on timm and MONAI networks alike. After
:func:`inject`, the only trainable parameters are the per-tensor ``shpeft_delta`` vectors (k values
in all) and the classification head, so any optimizer (with any weight decay) built from
:func:`trainable_parameters` cannot move an unselected weight.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import SHPEFTConfig
from .layers import SparseOverwrite, _SparseSite, fast_path_class
from .sparse import DeltaMismatchError, SparseDelta, SparseMask, fingerprint_tensors

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
_PARAMETRIZED = re.compile(r"\.parametrizations\.(\w+)\.original$")
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)


def _canonical(name: str) -> str:
    return _PARAMETRIZED.sub(r".\1", name)


def _base_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters of the base model under their original names (no SH-PEFT deltas)."""
    for name, p in model.named_parameters():
        if "shpeft_delta" not in name:
            yield _canonical(name), p


def _is_head(name: str, config: SHPEFTConfig) -> bool:
    return name.split(".", 1)[0] in config.head


def parameter_kind(module: nn.Module, param_name: str) -> str:
    """Kind of ``module.<param_name>``: linear, conv, bias, norm or embedding."""
    if param_name == "bias":
        return "bias"
    if isinstance(module, nn.Linear) and param_name == "weight":
        return "linear"
    if isinstance(module, nn.modules.conv._ConvNd) and param_name == "weight":
        return "conv"
    if isinstance(module, _NORMS):
        return "norm"
    if "embed" in param_name or "token" in param_name or isinstance(module, nn.Embedding):
        return "embedding"
    return "norm"  # other scale-like tensors (e.g. layer-scale gamma)


def eligible_parameters(model: nn.Module, config: SHPEFTConfig) -> dict[str, nn.Parameter]:
    """Backbone tensors that SH-PEFT may select from, by name (sorted).

    Raises:
        ValueError: no tensor matches ``config.eligible``/``include``/``exclude``.
    """
    include = [re.compile(p) for p in config.include]
    exclude = [re.compile(p) for p in config.exclude]
    out: dict[str, nn.Parameter] = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, (SparseOverwrite, parametrize.ParametrizationList)):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if pname == "shpeft_delta":
                continue
            full = _canonical(f"{mod_name}.{pname}" if mod_name else pname)
            if _is_head(full, config) or parameter_kind(module, pname) not in config.eligible:
                continue
            if include and not any(r.search(full) for r in include):
                continue
            if any(r.search(full) for r in exclude):
                continue
            out[full] = p
        for pname, plist in getattr(module, "parametrizations", {}).items():  # already parametrised
            full = f"{mod_name}.{pname}" if mod_name else pname
            if not _is_head(full, config) and parameter_kind(module, pname) in config.eligible:
                out[full] = plist.original
    if not out:
        kinds = Counter(
            parameter_kind(m, n)
            for _, m in model.named_modules()
            for n, _ in m.named_parameters(recurse=False)
        )
        raise ValueError(
            f"no parameter is eligible for SH-PEFT: eligible={config.eligible}, include={config.include}, "
            f"exclude={config.exclude}, head={config.head}. The model has these kinds: {dict(kinds)}. "
            "Widen `eligible` or fix the patterns."
        )
    return dict(sorted(out.items()))


def head_parameters(model: nn.Module, config: SHPEFTConfig) -> dict[str, nn.Parameter]:
    """Parameters of the classification head (trained densely)."""
    return {n: p for n, p in _base_named_parameters(model) if _is_head(n, config)}


def backbone_fingerprint(model: nn.Module, config: SHPEFTConfig) -> str:
    """Fingerprint of every non-head parameter; identifies the base model a mask was made for."""
    if is_injected(model):
        raise RuntimeError("backbone_fingerprint needs the base model; call it before inject().")
    return fingerprint_tensors((n, p) for n, p in _base_named_parameters(model) if not _is_head(n, config))


def bare_module(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (or the model itself)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


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


def _sites(model: nn.Module) -> dict[str, nn.Module]:
    out = {}
    for name in get_mask(model).indices:
        mod_name, pname = _split(name)
        module = model.get_submodule(mod_name)
        out[name] = module if isinstance(module, _SparseSite) else module.parametrizations[pname][0]
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
    for name, index in mask.indices.items():
        mod_name, pname = _split(name)
        module = model.get_submodule(mod_name)
        cls = fast_path_class(module, pname)
        if cls is not None:
            module.__class__ = cls
            module.setup_sparse(index)
        else:
            parametrize.register_parametrization(
                module, pname, SparseOverwrite(getattr(module, pname), index)
            )
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
    with torch.no_grad():
        for name, site in sites.items():
            v = torch.as_tensor(values[name])
            if v.shape != site.shpeft_delta.shape:
                raise DeltaMismatchError(
                    f"delta of {name!r} has shape {tuple(v.shape)}, expected {tuple(site.shpeft_delta.shape)}."
                )
            site.shpeft_delta.copy_(v)


def extract_delta(model: nn.Module, meta: dict[str, Any] | None = None) -> SparseDelta:
    """The trained result of an injected model as a :class:`SparseDelta` (CPU copies)."""
    model = bare_module(model)
    mask, config = get_mask(model), model._shpeft_config
    values = {n: s.shpeft_delta.detach().to("cpu", torch.float32).clone() for n, s in _sites(model).items()}
    head = {n: p.detach().to("cpu").clone() for n, p in head_parameters(model, config).items()}
    return SparseDelta(mask, values, head, config.to_dict(), dict(meta or {}))


def _unwrap(model: nn.Module, keep_delta: bool) -> nn.Module:
    for name, site in _sites(model).items():
        mod_name, pname = _split(name)
        module = model.get_submodule(mod_name)
        if isinstance(module, _SparseSite):
            module._sync_weight() if keep_delta else module.restore_base()
            for attr in (
                "shpeft_delta",
                "shpeft_index",
                "shpeft_base",
                "shpeft_rows",
                "shpeft_ucols",
                "shpeft_uchan",
                "shpeft_colpos",
                "_shpeft_synced",
            ):
                if hasattr(module, attr):
                    delattr(module, attr)
            module.__class__ = module.__class__.__mro__[1]  # SparseLinear -> nn.Linear, ...
        else:
            if not keep_delta:
                with torch.no_grad():
                    site.shpeft_delta.zero_()
            parametrize.remove_parametrizations(module, pname, leave_parametrized=True)
            getattr(module, pname).requires_grad_(False)
    del model._shpeft_mask, model._shpeft_config
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold the deltas into the weights and remove SH-PEFT: a plain model at zero extra cost."""
    return _unwrap(model, keep_delta=True)


def eject(model: nn.Module) -> nn.Module:
    """Remove SH-PEFT and restore the base weights (the head keeps its trained values)."""
    return _unwrap(model, keep_delta=False)


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
            new = (flat[i].float() + delta.values[name].to(p.device)).to(p.dtype)
            flat.index_copy_(0, i, new)
        for name, t in delta.head.items():
            params[name].copy_(t)
    return model


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
