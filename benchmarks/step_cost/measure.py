"""One method's training steps on one model: step and phase times, peak memory, FLOPs, state bytes."""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import MemoryProbe

from .options import StepOptions
from .prepare import count, optimizer_state_bytes, prepare_step

__all__ = ["build_model", "measure_method"]

logger = logging.getLogger("benchmarks.step_cost")


def build_model(spec: dict[str, Any], num_classes: int, img_size: int) -> tuple[nn.Module, str]:
    """The model of ``spec`` and a description of its weights.

    A ``pretrained`` spec loads the real weights through ``shpeft_monai.networks.create_network``
    (``spec["checkpoint"]`` may point at a local file); when they cannot be found it falls back to
    random initialisation of the same architecture (cost does not depend on the values) and says so.
    """
    import timm

    kwargs = dict(spec.get("kwargs", {}))
    if spec.get("pretrained"):
        from shpeft_monai.networks import create_network

        try:
            model = create_network(
                spec["name"], num_classes, img_size=img_size, checkpoint=spec.get("checkpoint"), **kwargs
            )
            return model, f"pretrained ({spec.get('checkpoint') or 'converted cache'})"
        except (FileNotFoundError, ImportError, RuntimeError, OSError) as err:
            logger.warning("real weights of %s unavailable (%s); using random init", spec["name"], err)
            why = f"random init (pretrained weights unavailable: {type(err).__name__})"
    else:
        why = "random init"
    model = timm.create_model(
        spec["name"], pretrained=False, num_classes=num_classes, img_size=img_size, **kwargs
    )
    return model, why


def saved_for_backward_bytes(model: nn.Module, x: torch.Tensor, amp: Any) -> int:
    """Bytes that one forward pass on ``x`` keeps for the backward pass (parameters excluded).

    Counted through ``torch.autograd.graph.saved_tensors_hooks``, each storage once: activations,
    the saved input columns of the sparse layers, weight copies that autocast keeps for a frozen
    layer's backward. Like FLOPs, a figure that no machine load disturbs.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if t.is_floating_point() and st.data_ptr() not in params:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        model(x)
    return int(sum(storages.values()))


def measure_method(
    spec: dict[str, Any],
    method: str,
    opts: StepOptions,
    mask_indices: dict[str, torch.Tensor] | None = None,
    profile_steps: int = 0,
) -> dict[str, Any]:
    """Build the model of ``spec``, prepare it for ``method`` and time its training steps.

    With ``profile_steps > 0``, that many further steps run under ``torch.profiler`` (after the
    timed ones, so the numbers above are not disturbed) and the operator table is returned.

    Returns a flat dict of JSON-able numbers (plus ``_mask``, the selected indices, for ``shpeft``,
    and ``_profile``, the profiler table, when asked for).
    """
    device = torch.device(opts.device)
    if device.type == "cpu" and opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    mem = MemoryProbe(device)
    model, weights = build_model(spec, opts.num_classes, opts.img_size)
    model = model.to(device).train()
    gen = torch.Generator().manual_seed(opts.seed)
    x = torch.randn(opts.batch_size, 3, opts.img_size, opts.img_size, generator=gen).to(device)
    y = torch.randint(0, opts.num_classes, (opts.batch_size,), generator=gen).to(device)
    total_params = count(model.parameters())

    model, opt, post, info = prepare_step(method, model, opts, (x, y), mask_indices, mem, sync)
    trainable = count(p for p in model.parameters() if p.requires_grad)
    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16) if opts.amp == "bf16" else contextlib.nullcontext()
    )

    def one_step(n: int | None = None) -> tuple[float, float, float, float, float]:
        """One training step on the batch (its first ``n`` samples if given): phase times."""
        nonlocal loss
        xb, yb = (x, y) if n is None else (x[:n], y[:n])
        sync()
        c0 = time.process_time()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with amp:
            out = model(xb)
        loss = F.cross_entropy(out.float(), yb)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        if post is not None:
            post()
        sync()
        t2 = time.perf_counter()
        opt.step()
        sync()
        t3 = time.perf_counter()
        return t3 - t0, t1 - t0, t2 - t1, t3 - t2, time.process_time() - c0

    loss = torch.zeros(())
    mem.reset()
    baseline = mem.base
    phases = [one_step() for _ in range(opts.warmup + opts.steps)][opts.warmup :]
    peak = mem.peak()
    peak_total = mem.total()
    grad_bytes = int(
        sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    )

    flops = None
    if opts.count_flops:  # one more step on one sample, after the measured ones, under the counter
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            one_step(1)
        flops = int(counter.get_total_flops())

    saved_bytes = saved_for_backward_bytes(model, x, amp) if opts.count_flops else None

    profile_table = None
    if profile_steps:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch_profile(activities=activities) as prof:
            for _ in range(profile_steps):
                one_step()
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        profile_table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60)

    def med(j: int) -> float:
        return float(statistics.median(p[j] for p in phases)) if phases else float("nan")

    result: dict[str, Any] = {
        "model": spec.get("key", spec["name"]),
        "architecture": spec["name"],
        "method": method,
        "weights": weights,
        "total_params": total_params,
        "trainable_params": trainable,
        "updated_params": int(info.pop("updated_params")),
        "selected_backbone_weights": info.pop("selected_backbone_weights"),
        "head_params": int(info.pop("head_params")),
        "step_s": med(0),
        "forward_s": med(1),
        "backward_s": med(2),
        "optimizer_s": med(3),
        "step_flops_per_sample": flops,
        "saved_for_backward_bytes": saved_bytes,
        "step_s_min": min((p[0] for p in phases), default=float("nan")),
        "step_s_all": [p[0] for p in phases],
        "step_cpu_s": med(4),
        "peak_bytes": int(peak),
        "peak_total_bytes": int(peak_total),
        "baseline_bytes": int(baseline),
        "optimizer_state_bytes": optimizer_state_bytes(opt),
        "grad_bytes": grad_bytes,
        "final_loss": float(loss.detach().float().cpu()),
        "memory_method": mem.how,
        "selection_s": None,
        "selection_peak_bytes": None,
    }
    result.update(info)
    if profile_table is not None:
        result["_profile"] = profile_table
    return result
