"""Sparse-delta layers: train k selected entries of a frozen weight without its dense gradient.

Design (DESIGN.md, "Principles"):

* The base weight stays in place. It holds ``base + delta`` at the selected entries, rewritten in
  O(k) only when the trainable ``delta`` changed (tracked through its version counter), so the
  forward pass is the ordinary ``F.linear``/``F.conv2d`` with no copy of W.
* The backward pass returns the input gradient and the gradient of the k selected entries only.
  For a Linear layer, entry (r, c) of the weight gradient is ``sum_t grad_out[t, r] * x[t, c]``; for
  a Conv2d layer the same sum runs over the unfolded input patch. The dense weight gradient is never
  formed, and only the input columns (channels) that selected entries touch are saved.
* Layers outside the fast paths (Conv1d/3d, convs with custom padding such as timm's
  ``Conv2dSame``, biases, norms, embeddings) use :class:`SparseOverwrite`, a
  ``torch.nn.utils.parametrize`` fallback: exact, but it materialises ``W`` with the overwritten
  entries each forward.

Fast-path modules are re-classed in place (``SparseLinear`` is an ``nn.Linear``), so parameter
names and ``state_dict`` keys of the base model do not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SparseConv2d", "SparseLinear", "SparseOverwrite", "fast_path_class"]

_CHUNK = 4096  # selected entries per chunk in the backward pass (bounds T x chunk temporaries)


def _init_site(site: nn.Module, weight: torch.Tensor, index: torch.Tensor) -> None:
    index = index.to(weight.device, torch.int64)
    site.register_buffer("shpeft_index", index, persistent=False)
    site.register_buffer("shpeft_base", weight.detach().reshape(-1)[index].clone().float(), persistent=False)
    site.shpeft_delta = nn.Parameter(torch.zeros(index.numel(), device=weight.device))


class _SparseSite:
    """Mixin of the fast-path layers: keeps the in-place weight in sync with the delta."""

    shpeft_index: torch.Tensor
    shpeft_base: torch.Tensor
    shpeft_delta: nn.Parameter
    weight: nn.Parameter

    def _sync_weight(self) -> None:
        version = (self.shpeft_delta._version, self.shpeft_delta.data_ptr())
        if getattr(self, "_shpeft_synced", None) != version:
            with torch.no_grad():
                new = (self.shpeft_base + self.shpeft_delta.float()).to(self.weight.dtype)
                self.weight.view(-1).index_copy_(0, self.shpeft_index, new)
            self._shpeft_synced = (self.shpeft_delta._version, self.shpeft_delta.data_ptr())

    def restore_base(self) -> None:
        """Write the base values back into the weight (the delta stays as it is)."""
        with torch.no_grad():
            self.weight.view(-1).index_copy_(0, self.shpeft_index, self.shpeft_base.to(self.weight.dtype))
        self._shpeft_synced = None


def _entry_grads(go: torch.Tensor, rows: torch.Tensor, xs: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``out[j] = sum over dim 0 (and 2) of go[:, rows[j]] * xs[:, cols[j]]``, chunked over j."""
    out = torch.empty(rows.numel(), dtype=torch.float32, device=go.device)
    for s in range(0, rows.numel(), _CHUNK):
        r, c = rows[s : s + _CHUNK], cols[s : s + _CHUNK]
        prod = go.index_select(1, r).float() * xs.index_select(1, c).float()
        out[s : s + _CHUNK] = prod.sum(dim=(0, 2)) if prod.dim() == 3 else prod.sum(0)
    return out


class _SparseLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, delta, rows, ucols, colpos):
        out = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        ctx.weight = weight  # a persistent frozen buffer; no copy is saved
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x.detach()[..., ucols] if ctx.needs_input_grad[3] else None, rows, colpos)
        return out

    @staticmethod
    def backward(ctx, go):
        xs, rows, colpos = ctx.saved_tensors
        grad_x = grad_bias = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = go.matmul(ctx.weight.to(go.dtype))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = go.reshape(-1, go.shape[-1]).sum(0)
        if ctx.needs_input_grad[3]:
            g2 = go.reshape(-1, go.shape[-1])
            grad_delta = _entry_grads(g2, rows, xs.reshape(-1, xs.shape[-1]), colpos)
        return grad_x, None, grad_bias, grad_delta, None, None, None


class SparseLinear(nn.Linear, _SparseSite):
    """``nn.Linear`` whose selected weight entries are trained through ``shpeft_delta``."""

    def setup_sparse(self, index: torch.Tensor) -> None:
        self.weight.requires_grad_(False)
        _init_site(self, self.weight, index)
        rows = self.shpeft_index // self.in_features
        cols = self.shpeft_index % self.in_features
        ucols, colpos = torch.unique(cols, return_inverse=True)
        self.register_buffer("shpeft_rows", rows, persistent=False)
        self.register_buffer("shpeft_ucols", ucols, persistent=False)
        self.register_buffer("shpeft_colpos", colpos, persistent=False)
        self._shpeft_synced = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._sync_weight()
        if not torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        return _SparseLinearFn.apply(
            x,
            self.weight,
            self.bias,
            self.shpeft_delta,
            self.shpeft_rows,
            self.shpeft_ucols,
            self.shpeft_colpos,
        )


class _SparseConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, delta, rows, uchan, colpos, conv):
        stride, padding, dilation, groups = conv
        w = weight.to(x.dtype)
        out = F.conv2d(x, w, None if bias is None else bias.to(x.dtype), stride, padding, dilation, groups)
        ctx.weight, ctx.conv, ctx.x_shape = weight, conv, x.shape
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x.detach()[:, uchan] if ctx.needs_input_grad[3] else None, rows, colpos)
        return out

    @staticmethod
    def backward(ctx, go):
        xs, rows, colpos = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        grad_x = grad_bias = grad_delta = None
        w = ctx.weight
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(
                ctx.x_shape, w.to(go.dtype), go, stride, padding, dilation, groups
            )
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = go.sum(dim=(0, 2, 3))
        if ctx.needs_input_grad[3]:
            kh, kw = w.shape[2], w.shape[3]
            cols = F.unfold(xs, (kh, kw), dilation=dilation, padding=padding, stride=stride)
            g3 = go.reshape(go.shape[0], go.shape[1], -1)
            grad_delta = _entry_grads(g3, rows, cols, colpos)
        return grad_x, None, grad_bias, grad_delta, None, None, None, None


class SparseConv2d(nn.Conv2d, _SparseSite):
    """``nn.Conv2d`` (zero padding, integer padding) trained at selected entries only."""

    def setup_sparse(self, index: torch.Tensor) -> None:
        self.weight.requires_grad_(False)
        _init_site(self, self.weight, index)
        out_ch, in_per_group, kh, kw = self.weight.shape
        kk = kh * kw
        per_entry = in_per_group * kk
        rows = self.shpeft_index // per_entry  # output channel
        rest = self.shpeft_index % per_entry
        cin = (rows // (out_ch // self.groups)) * in_per_group + rest // kk  # absolute input channel
        uchan, chanpos = torch.unique(cin, return_inverse=True)
        self.register_buffer("shpeft_rows", rows, persistent=False)
        self.register_buffer("shpeft_uchan", uchan, persistent=False)
        self.register_buffer("shpeft_colpos", chanpos * kk + rest % kk, persistent=False)
        self._shpeft_synced = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._sync_weight()
        if not torch.is_grad_enabled():
            return self._conv_forward(x, self.weight, self.bias)
        conv = (self.stride, self.padding, self.dilation, self.groups)
        return _SparseConv2dFn.apply(
            x,
            self.weight,
            self.bias,
            self.shpeft_delta,
            self.shpeft_rows,
            self.shpeft_uchan,
            self.shpeft_colpos,
            conv,
        )


def fast_path_class(module: nn.Module, param_name: str) -> type[nn.Module] | None:
    """The fast-path class for ``module.<param_name>``, or None when the fallback applies."""
    if param_name != "weight":
        return None
    if type(module) is nn.Linear:
        return SparseLinear
    if type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return SparseConv2d
    return None


class SparseOverwrite(nn.Module):
    """Parametrisation fallback: ``W -> W`` with ``base + delta`` written at the selected entries."""

    def __init__(self, weight: torch.Tensor, index: torch.Tensor) -> None:
        super().__init__()
        _init_site(self, weight, index)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        new = (self.shpeft_base + self.shpeft_delta).to(w.dtype)
        return w.reshape(-1).index_put((self.shpeft_index,), new).view_as(w)
