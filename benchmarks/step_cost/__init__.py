"""Train-step cost of SH-PEFT beside its peers, measured side by side in one run.

METHOD.md section 4 asks for "train-step time and peak memory relative to full fine-tuning in the
same run, selection time". This program measures, for each model and method, one training step
(forward + loss + backward + optimizer step) on a fixed batch of random images:

* ``full``: full fine-tuning, AdamW over every parameter;
* ``shpeft``: SH-PEFT at the default budget (1e-4 of the eligible backbone weights, hybrid
  ``union``), selected by :func:`shpeft_monai.select_mask` with a one-batch calibration loader of
  random data (timed: cost does not depend on which entries are chosen), injected with
  :func:`shpeft_monai.inject`, AdamW over :func:`shpeft_monai.trainable_parameters` only;
* ``gps``: GPS-style gradient masking: every parameter requires a gradient, a dense AdamW with
  ``weight_decay=0`` holds them all, and after ``backward()`` the gradients are multiplied by a mask
  of the same k entries (plus the head), as GPS's training code does. The masks are stored only for
  the tensors that hold selected entries (the other backbone gradients are zeroed), which is if
  anything cheaper than GPS's own per-tensor float masks;
* ``lora``: LoRA through Hugging Face ``peft`` (``LoraConfig(r=8, target_modules=["qkv"],
  modules_to_save=["head"])`` on the timm model), AdamW over its trainable parameters;
* ``floor``: every backbone weight frozen and only the head trained, but the backward pass runs
  through the whole backbone for input gradients (the patch embedding's output is marked as needing
  a gradient): forward plus input-gradient backward, the cost a sparse method cannot go below.
  SH-PEFT's ratio to it (``time_vs_floor`` in the targets) is what its sparse layers still add;
* ``linear_probe``: the head alone (no backward pass through the backbone at all).

What is reported, per method:

* step time: median over ``--steps`` timed steps after ``--warmup`` steps, plus per-phase medians
  (forward + loss, backward, optimizer step); on CUDA every phase ends with a synchronisation. Also
  the process CPU time of the step (``time.process_time``, all threads), which other load on a
  shared machine disturbs far less than wall time (useful on CPU; on CUDA it is host time only);
* peak memory above a baseline taken after the model, the batch and the (still empty) optimizer
  exist, so it counts gradients, optimizer state, saved activations and temporaries:
  on CUDA ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` at the baseline
  (allocator bytes, the caching allocator's reserve not counted); on CPU, with each method in a fresh
  spawned process (``--isolate``, the default), the kernel's peak resident set (``VmHWM``) is reset
  to the current resident set at the baseline (``echo 5 > /proc/self/clear_refs``, after
  ``gc.collect()`` and ``malloc_trim``) and read after the steps: peak resident growth of the step,
  allocator caching included. Where ``clear_refs`` cannot be written the growth of ``ru_maxrss`` is
  used instead, which under-reports when model construction peaked higher than the steps;
* FLOPs per sample of one step (a further step on one sample, after the measured ones) as
  ``torch.utils.flop_counter`` counts them (matrix products, convolutions, attention; not
  elementwise, gather or optimizer work): a figure that no machine load disturbs;
* bytes saved for backward by one forward pass on the batch (``saved_for_backward_bytes``, each
  storage once, parameters excluded): activations, the sparse layers' saved input columns, and the
  weight copies autocast keeps for frozen layers; also load-independent (off with ``--no-flops``);
* trainable parameters, parameters that can change (GPS: k + head although all require grad),
  optimizer state bytes (every tensor in ``optimizer.state`` after the steps), gradient bytes after
  the last backward, and for SH-PEFT the selection time and its peak memory.

Run ``python -m benchmarks.step_cost`` (CPU: 2 threads, batch 8) or ``--device cuda`` (batch 64);
``--autocast bf16`` runs every forward pass under ``torch.autocast`` in bfloat16;
results go to ``benchmarks/results/step_cost.json`` / ``step_cost_<gpu>.json`` and a markdown table
beside it. Timing is never asserted anywhere: ``tests/test_bench_step.py`` checks the schema and the
invariants (trainable counts, optimizer state) on a tiny model.

Modules: :mod:`.options` (settings, models, methods), :mod:`.prepare` (each method's model, optimizer
and gradient hook), :mod:`.measure` (one method's timed steps), :mod:`.run` (every method, each in a
fresh process), :mod:`.report` (ratios, targets, tables, the JSON report), :mod:`.cli`.
"""

from __future__ import annotations

from .cli import default_out, main
from .measure import build_model, measure_method
from .options import METHODS, MODELS, TARGETS, StepOptions
from .report import make_report, render_markdown, render_table, summarize
from .run import run_benchmark

__all__ = [
    "METHODS",
    "MODELS",
    "TARGETS",
    "StepOptions",
    "build_model",
    "default_out",
    "main",
    "make_report",
    "measure_method",
    "render_markdown",
    "render_table",
    "run_benchmark",
    "summarize",
]
