"""Sparse-delta layers: train k selected entries of a frozen weight; each layer owns its lifecycle.

SH-PEFT (arXiv:2405.17877) trains a small set of existing weights. Every site is a
:class:`SparseDeltaLayer`, which, like a Hugging Face ``peft`` tuner layer, lists the state it adds
in one tuple (:attr:`~SparseDeltaLayer.shpeft_state`) and carries its whole lifecycle:

* :meth:`~SparseDeltaLayer.attach` sets a site up on a module's tensor (the tensor is frozen, a
  trainable ``shpeft_delta`` of k values appears);
* :meth:`~SparseDeltaLayer.detach` tears it down, folding the delta in (``merge=True``) or restoring
  the base values bit for bit (``merge=False``); either way the module's class, parameter order,
  ``requires_grad`` flags and attributes are those it had before :meth:`attach`;
* :meth:`~SparseDeltaLayer.delta_values` / :meth:`~SparseDeltaLayer.load_delta` read and set the
  trained values; :meth:`~SparseDeltaLayer.merged_values` gives ``base + delta``.

:mod:`shpeft_monai.model` only decides which tensors get a site (:func:`attach`, :func:`detach`,
:func:`layer_of`). Two kinds of site:

* fast paths (``nn.Linear``; ``nn.Conv2d`` with zero, integer padding): the module is re-classed in
  place (:class:`SparseLinear` is an ``nn.Linear``, so parameter names and ``state_dict`` keys do not
  change), its weight holds ``base + delta`` at the selected entries, rewritten in O(k) only when
  the delta changed, and :mod:`shpeft_monai._sparse_ops` computes the input gradient and the k entry
  gradients without the dense weight gradient;
* :class:`SparseOverwrite`, a ``torch.nn.utils.parametrize`` fallback for every other tensor (Conv1d
  /3d, custom padding such as timm's ``Conv2dSame``, biases, norms, embeddings): exact, but it
  materialises the tensor with the overwritten entries at each forward.

Example:
    >>> lin = nn.Linear(4, 3)
    >>> site = attach(lin, "weight", torch.tensor([0, 5]))
    >>> site.delta_values().shape
    torch.Size([2])
    >>> detach(lin, "weight", merge=False); type(lin).__name__
    'Linear'
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._sparse_ops import SparseConv2dFn, SparseLinearFn
from .sparse import DeltaMismatchError

__all__ = [
    "DELTA_NAME",
    "SparseConv2d",
    "SparseDeltaLayer",
    "SparseLinear",
    "SparseOverwrite",
    "attach",
    "detach",
    "fast_path_class",
    "layer_of",
]

DELTA_NAME = "shpeft_delta"  # the trainable parameter of every site (optimizer groups match on it)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32 and lower precisions, float64 for float64: the dtype of the delta."""
    return torch.promote_types(dtype, torch.float32)


class SparseDeltaLayer:
    """What every sparse site has and does (``peft``'s tuner-layer pattern).

    ``shpeft_state`` names every attribute, buffer and parameter that :meth:`attach` adds;
    :meth:`detach` removes exactly those.
    """

    shpeft_state: ClassVar[tuple[str, ...]] = (
        DELTA_NAME,
        "shpeft_index",
        "shpeft_base",
        "_shpeft_requires_grad",
    )
    shpeft_delta: nn.Parameter
    shpeft_index: torch.Tensor
    shpeft_base: torch.Tensor

    @classmethod
    def attach(cls, module: nn.Module, pname: str, index: torch.Tensor) -> SparseDeltaLayer:
        """Set up a site on ``module.<pname>`` for the sorted flat ``index``; returns the site."""
        raise NotImplementedError

    def detach(self, module: nn.Module, pname: str, *, merge: bool) -> None:
        """Remove the site from ``module.<pname>``, folding the delta in or restoring the base."""
        raise NotImplementedError

    def _init_state(self, tensor: torch.Tensor, index: torch.Tensor) -> None:
        index = index.to(tensor.device, torch.int64)
        self.register_buffer("shpeft_index", index, persistent=False)  # type: ignore[attr-defined]
        base = tensor.detach().reshape(-1).index_select(0, index).clone()  # in the tensor's own dtype
        self.register_buffer("shpeft_base", base, persistent=False)  # type: ignore[attr-defined]
        zeros = torch.zeros(index.numel(), device=tensor.device, dtype=_accumulate_dtype(tensor.dtype))
        setattr(self, DELTA_NAME, nn.Parameter(zeros))

    def _drop_state(self) -> None:
        for name in self.shpeft_state:
            delattr(self, name)

    def merged_values(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``base + delta`` at the selected entries (summed in float32 or wider), cast to ``dtype``."""
        acc = self.shpeft_delta.dtype
        return (self.shpeft_base.to(acc) + self.shpeft_delta.detach()).to(dtype or self.shpeft_base.dtype)

    def delta_values(self) -> torch.Tensor:
        """The trained values (k entries) as a float32 CPU copy: the payload of a saved delta."""
        return self.shpeft_delta.detach().to("cpu", torch.float32).clone()

    def load_delta(self, values: torch.Tensor) -> None:
        """Set the trained values (resume, federated rounds); shape ``(k,)``.

        Raises:
            DeltaMismatchError: ``values`` does not have this site's ``(k,)`` shape.
        """
        values = torch.as_tensor(values)
        if values.shape != self.shpeft_delta.shape:
            raise DeltaMismatchError(
                f"delta values have shape {tuple(values.shape)}, this site expects "
                f"{tuple(self.shpeft_delta.shape)}: they were trained with another mask."
            )
        with torch.no_grad():
            self.shpeft_delta.copy_(values)


class _FastPath(SparseDeltaLayer):
    """Re-classed ``nn.Linear`` / ``nn.Conv2d``: the weight holds ``base + delta`` in place."""

    shpeft_state = (
        *SparseDeltaLayer.shpeft_state,
        *("shpeft_rows", "shpeft_cols", "shpeft_colpos", "_shpeft_synced", "_shpeft_base_class"),
    )
    weight: nn.Parameter

    @classmethod
    def attach(cls, module: nn.Module, pname: str, index: torch.Tensor) -> SparseDeltaLayer:
        if fast_path_class(module, pname) is not cls:
            raise TypeError(
                f"{cls.__name__}.attach: {type(module).__name__}.{pname} has no such fast path (only "
                "nn.Linear.weight and zero-padded nn.Conv2d.weight do); call layers.attach(), which "
                "falls back to SparseOverwrite."
            )
        base_class = type(module)
        module.__class__ = cls
        site: _FastPath = module  # type: ignore[assignment]
        site._shpeft_base_class = base_class
        site._shpeft_requires_grad = site.weight.requires_grad
        site.weight.requires_grad_(False)
        site._init_state(site.weight, index)
        rows, cols, colpos = site._geometry(site.shpeft_index)
        for name, t in (("shpeft_rows", rows), ("shpeft_cols", cols), ("shpeft_colpos", colpos)):
            site.register_buffer(name, t, persistent=False)
        site._shpeft_synced = None
        return site

    def _geometry(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(output row of each entry, the input columns to save, each entry's column among them)."""
        raise NotImplementedError

    def detach(self, module: nn.Module, pname: str, *, merge: bool) -> None:
        if merge:
            self._sync_weight()
        else:
            self._write(self.shpeft_base)
        self.weight.requires_grad_(self._shpeft_requires_grad)
        base_class = self._shpeft_base_class
        self._drop_state()
        self.__class__ = base_class

    def _write(self, values: torch.Tensor) -> None:
        with torch.no_grad():
            self.weight.view(-1).index_copy_(0, self.shpeft_index, values.to(self.weight.dtype))

    def _sync_weight(self) -> None:
        """Write ``base + delta`` into the weight if the delta changed since the last write."""
        version = (self.shpeft_delta._version, self.shpeft_delta.data_ptr())
        if self._shpeft_synced != version:
            self._write(self.merged_values(self.weight.dtype))
            self._shpeft_synced = (self.shpeft_delta._version, self.shpeft_delta.data_ptr())

    def restore_base(self) -> None:
        """Write the base values back into the weight (the delta stays as it is)."""
        self._write(self.shpeft_base)
        self._shpeft_synced = None


class SparseLinear(nn.Linear, _FastPath):
    """``nn.Linear`` whose selected weight entries are trained through ``shpeft_delta``."""

    def _geometry(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ucols, colpos = torch.unique(index % self.in_features, return_inverse=True)
        return index // self.in_features, ucols, colpos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._sync_weight()
        if not torch.is_grad_enabled():
            return super().forward(x)
        args = (self.shpeft_delta, self.shpeft_rows, self.shpeft_cols, self.shpeft_colpos)
        return SparseLinearFn.apply(x, self.weight, self.bias, *args)


class SparseConv2d(nn.Conv2d, _FastPath):
    """``nn.Conv2d`` (zero padding, integer padding) trained at selected entries only."""

    def _geometry(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out_ch, in_per_group, kh, kw = self.weight.shape
        kk = kh * kw
        rows = index // (in_per_group * kk)  # output channel
        rest = index % (in_per_group * kk)
        cin = (rows // (out_ch // self.groups)) * in_per_group + rest // kk  # absolute input channel
        uchan, chanpos = torch.unique(cin, return_inverse=True)
        return rows, uchan, chanpos * kk + rest % kk  # position in the unfolded saved channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._sync_weight()
        if not torch.is_grad_enabled():
            return self._conv_forward(x, self.weight, self.bias)
        conv = (self.stride, self.padding, self.dilation, self.groups)
        args = (self.shpeft_delta, self.shpeft_rows, self.shpeft_cols, self.shpeft_colpos, conv)
        return SparseConv2dFn.apply(x, self.weight, self.bias, *args)


def fast_path_class(module: nn.Module, param_name: str) -> type[_FastPath] | None:
    """The fast-path class for ``module.<param_name>``, or None when the fallback applies."""
    if param_name != "weight":
        return None
    if type(module) is nn.Linear:
        return SparseLinear
    if type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return SparseConv2d
    return None


class SparseOverwrite(nn.Module, SparseDeltaLayer):
    """Parametrisation fallback: ``W -> W`` with ``base + delta`` written at the selected entries."""

    shpeft_state = SparseDeltaLayer.shpeft_state

    def __init__(self, tensor: torch.Tensor, index: torch.Tensor) -> None:
        super().__init__()
        self._init_state(tensor, index)
        self._shpeft_requires_grad = tensor.requires_grad

    @classmethod
    def attach(cls, module: nn.Module, pname: str, index: torch.Tensor) -> SparseDeltaLayer:
        tensor = getattr(module, pname)
        site = cls(tensor, index)
        order = (tuple(module._parameters), tuple(module._buffers))
        site._shpeft_order = order  # restored by detach (removal re-registers the tensor last)
        tensor.requires_grad_(False)
        parametrize.register_parametrization(module, pname, site)
        return site

    def detach(self, module: nn.Module, pname: str, *, merge: bool) -> None:
        plist = module.parametrizations[pname]
        if len(plist) > 1:  # someone else's parametrisation stays: drop ours only
            if merge:
                raise RuntimeError(
                    f"cannot merge the SH-PEFT delta of {pname!r}: the tensor carries other "
                    "parametrisations too; eject() it, or remove the others first."
                )
            del plist[next(i for i, p in enumerate(plist) if p is self)]
            return
        parametrize.remove_parametrizations(module, pname, leave_parametrized=merge)
        getattr(module, pname).requires_grad_(self._shpeft_requires_grad)
        for store, names in zip((module._parameters, module._buffers), self._shpeft_order):
            for name in names:  # re-insert in the original order
                if name in store:
                    store[name] = store.pop(name)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        new = (self.shpeft_base.to(self.shpeft_delta.dtype) + self.shpeft_delta).to(w.dtype)
        return w.reshape(-1).index_put((self.shpeft_index,), new).view_as(w)


def layer_of(module: nn.Module, pname: str) -> SparseDeltaLayer:
    """The site on ``module.<pname>``.

    Raises:
        LookupError: the tensor carries no SH-PEFT site.
    """
    if isinstance(module, _FastPath) and pname == "weight":
        return module
    plist = module.parametrizations[pname] if parametrize.is_parametrized(module, pname) else ()
    for p in plist:
        if isinstance(p, SparseOverwrite):
            return p
    raise LookupError(f"{type(module).__name__}.{pname} carries no SH-PEFT site; inject() a mask first.")


def attach(module: nn.Module, pname: str, index: torch.Tensor) -> SparseDeltaLayer:
    """Set up a site on ``module.<pname>``: the fast path when one applies, else the fallback."""
    return (fast_path_class(module, pname) or SparseOverwrite).attach(module, pname, index)


def detach(module: nn.Module, pname: str, *, merge: bool) -> None:
    """Tear the site on ``module.<pname>`` down: merge the delta in, or restore the base exactly."""
    layer_of(module, pname).detach(module, pname, merge=merge)
