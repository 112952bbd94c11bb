"""Parameter discovery and fingerprints: which tensors SH-PEFT may select, which form the head.

SH-PEFT (arXiv:2405.17877) selects among a pretrained backbone's existing weights and trains a new
classification head densely. This module answers, for any plain ``torch.nn.Module``:

* :func:`eligible_parameters`: the backbone tensors a mask may select from (by kind, include and
  exclude patterns, head excluded), under their base names even while a parametrisation is attached;
* :func:`head_parameters`: the head, trained densely;
* :func:`backbone_fingerprint`: the hash of every non-head tensor that ties a mask or a delta to the
  base weights it was made for (refused on another base with a clear message, see ``docs/``).

It knows nothing of injection beyond skipping SH-PEFT's own tensors, so selection, I/O and the
federated app depend on it without depending on the sparse layers' lifecycle.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator

from torch import nn
from torch.nn.utils import parametrize

from .config import SHPEFTConfig
from .layers import DELTA_NAME, SparseDeltaLayer, SparseOverwrite
from .sparse import fingerprint_tensors

__all__ = [
    "backbone_fingerprint",
    "bare_module",
    "eligible_parameters",
    "head_parameters",
    "is_head",
    "parameter_kind",
]

_PARAMETRIZED = re.compile(r"\.parametrizations\.(\w+)\.original$")
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)


def _canonical(name: str) -> str:
    """``a.parametrizations.weight.original`` -> ``a.weight`` (the name in the base model)."""
    return _PARAMETRIZED.sub(r".\1", name)


def _base_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters of the base model under their original names (no SH-PEFT deltas)."""
    for name, p in model.named_parameters():
        if DELTA_NAME not in name:
            yield _canonical(name), p


def is_head(name: str, config: SHPEFTConfig) -> bool:
    """Whether parameter ``name`` belongs to the classification head (``config.head`` prefixes)."""
    return name.split(".", 1)[0] in config.head


_is_head = is_head  # the private name other modules used before the split


def bare_module(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (or the model itself)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


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
            if pname == DELTA_NAME:
                continue
            full = _canonical(f"{mod_name}.{pname}" if mod_name else pname)
            if is_head(full, config) or parameter_kind(module, pname) not in config.eligible:
                continue
            if include and not any(r.search(full) for r in include):
                continue
            if any(r.search(full) for r in exclude):
                continue
            out[full] = p
        for pname, plist in getattr(module, "parametrizations", {}).items():  # already parametrised
            full = f"{mod_name}.{pname}" if mod_name else pname
            if not is_head(full, config) and parameter_kind(module, pname) in config.eligible:
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
    return {n: p for n, p in _base_named_parameters(model) if is_head(n, config)}


def _has_sparse_layers(model: nn.Module) -> bool:
    return any(
        isinstance(m, SparseDeltaLayer) or any(isinstance(p, SparseOverwrite) for p in m.children())
        for m in model.modules()
    )


def backbone_fingerprint(model: nn.Module, config: SHPEFTConfig) -> str:
    """Fingerprint of every non-head parameter; identifies the base model a mask was made for.

    Raises:
        RuntimeError: the model carries SH-PEFT layers (its weights hold ``base + delta``).
    """
    if getattr(bare_module(model), "_shpeft_mask", None) is not None or _has_sparse_layers(model):
        raise RuntimeError("backbone_fingerprint needs the base model; call it before inject().")
    return fingerprint_tensors((n, p) for n, p in _base_named_parameters(model) if not is_head(n, config))
