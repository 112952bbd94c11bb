"""Autograd of the sparse-delta fast paths: input gradient plus k entry gradients, nothing dense.

The cost floor of a sparse-tuning step is forward plus input-gradient backward (DESIGN.md,
"Principles"). Above it these functions add only O(tokens x k) work per layer:

* forward: the ordinary ``F.linear`` / ``F.conv2d`` on the weight held in place, plus one
  ``index_select`` of the input columns (channels) that selected entries touch, saved for backward
  (nothing is saved when the delta needs no gradient);
* backward: the input gradient only when an input needs one (``ctx.needs_input_grad``: the first
  layer's input, the images, never does), and entry ``(r, c)`` of the weight gradient as
  ``sum_t grad_out[t, r] * x[t, c]`` from the saved columns (the unfolded patch for a conv),
  accumulated in float32. The dense weight gradient is never formed.

Autocast (``torch.autocast`` on CPU or CUDA, bf16 or fp16): inputs, weight and bias are cast to the
autocast dtype as autocast would for ``linear``/``conv2d``; the saved columns are kept in that dtype
(half the activation memory) and the entry gradients are still summed in float32. The backward pass
casts the frozen weight again instead of keeping a low-precision copy alive between forward and
backward; every backward operation has explicit dtypes, so it gives the same result inside or
outside an autocast region.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["SparseConv2dFn", "SparseLinearFn", "compute_dtype", "entry_grads"]

_MAX_TEMP = 1 << 24  # elements of each tokens x entries temporary in the backward pass (64 MiB in fp32)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``linear``/``conv2d`` would run in for ``x``: the autocast dtype when it applies."""
    dev = x.device.type
    if x.dtype != torch.float64 and x.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def entry_grads(go: torch.Tensor, rows: torch.Tensor, xs: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``out[j] = sum over dims 0 (and 2) of go[:, rows[j]] * xs[:, cols[j]]`` in float32 (or wider).

    ``go`` is (tokens, out) or (batch, out, positions); ``xs`` matches it with the saved columns.
    """
    dims = (0, 2) if go.dim() == 3 else (0,)
    acc = torch.promote_types(go.dtype, torch.float32)
    chunk = max(64, _MAX_TEMP // max(1, go.numel() // go.shape[1]))
    parts = []
    for s in range(0, rows.numel(), chunk):
        a = go.index_select(1, rows[s : s + chunk] if rows.numel() > chunk else rows)
        b = xs.index_select(1, cols[s : s + chunk] if rows.numel() > chunk else cols)
        if a.dtype != acc:  # products and sums of low-precision factors in float32
            a, b = a.to(acc), b.to(acc)
        parts.append(a.mul_(b).sum(dims) if a.dtype == b.dtype else (a * b).sum(dims))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _to(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


class SparseLinearFn(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` whose backward returns the gradient of the selected entries."""

    @staticmethod
    def forward(ctx: Any, x, weight, bias, delta, rows, ucols, colpos):
        dt = compute_dtype(x)
        x = _to(x, dt)
        out = F.linear(x, _to(weight, dt), _to(bias, dt))
        ctx.weight = weight  # the frozen parameter itself (held by the module): no copy is saved
        ctx.has_bias = bias is not None
        # gather from the 2-D view: index_select on the last dim of a 3-D tensor is ~3x slower on CPU
        xs = x.reshape(-1, x.shape[-1]).index_select(1, ucols) if ctx.needs_input_grad[3] else None
        ctx.save_for_backward(xs, rows, colpos)
        return out

    @staticmethod
    def backward(ctx: Any, go: torch.Tensor):
        xs, rows, colpos = ctx.saved_tensors
        grad_x = grad_bias = grad_delta = None
        go2 = go.reshape(-1, go.shape[-1])  # one copy at most, when go is not contiguous
        if ctx.needs_input_grad[0]:
            w = _to(ctx.weight, go.dtype)
            grad_x = go2.mm(w).view(*go.shape[:-1], w.shape[1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = go2.sum(0)
        if ctx.needs_input_grad[3]:
            grad_delta = entry_grads(go2, rows, xs, colpos)
        return grad_x, None, grad_bias, grad_delta, None, None, None


class SparseConv2dFn(torch.autograd.Function):
    """``F.conv2d`` (zero, integer padding) whose backward returns the selected entries' gradient."""

    @staticmethod
    def forward(ctx: Any, x, weight, bias, delta, rows, uchan, colpos, conv):
        stride, padding, dilation, groups = conv
        dt = compute_dtype(x)
        x = _to(x, dt)
        out = F.conv2d(x, _to(weight, dt), _to(bias, dt), stride, padding, dilation, groups)
        ctx.weight, ctx.conv, ctx.x_shape = weight, conv, x.shape
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x.index_select(1, uchan) if ctx.needs_input_grad[3] else None, rows, colpos)
        return out

    @staticmethod
    def backward(ctx: Any, go: torch.Tensor):
        xs, rows, colpos = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        grad_x = grad_bias = grad_delta = None
        w = ctx.weight
        if ctx.needs_input_grad[0]:  # never for the first layer (its input is the images)
            grad_x = torch.nn.grad.conv2d_input(
                ctx.x_shape, _to(w, go.dtype), go, stride, padding, dilation, groups
            )
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = go.sum(dim=(0, 2, 3))
        if ctx.needs_input_grad[3]:
            cols = F.unfold(xs, w.shape[2:], dilation=dilation, padding=padding, stride=stride)
            grad_delta = entry_grads(go.reshape(go.shape[0], go.shape[1], -1), rows, cols, colpos)
        return grad_x, None, grad_bias, grad_delta, None, None, None, None
