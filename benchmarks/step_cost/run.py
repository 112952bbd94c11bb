"""Run every method on every model, each in a fresh spawned process (CPU peak memory needs it)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import logging
import multiprocessing
import time
from collections.abc import Callable, Sequence
from typing import Any

from .measure import measure_method
from .options import METHODS, StepOptions

__all__ = ["run_benchmark"]

logger = logging.getLogger("benchmarks.step_cost")


def _die_with_parent() -> None:
    """Worker initialiser: on Linux, ask for SIGTERM when the parent dies (no orphaned workers)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 15)  # PR_SET_PDEATHSIG, SIGTERM


def _in_subprocess(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=1, mp_context=ctx, initializer=_die_with_parent
    ) as pool:
        return pool.submit(fn, *args).result()


def run_benchmark(
    models: dict[str, dict[str, Any]],
    methods: Sequence[str],
    opts: StepOptions,
    *,
    isolate: bool = True,
    profile: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Measure every method on every model; ``isolate`` runs each in a fresh spawned process.

    SH-PEFT runs before GPS so that GPS masks the very entries SH-PEFT selected. A method that fails
    (out of memory, say) is recorded with its ``error`` and the run goes on. Methods named in
    ``profile`` get two more steps under ``torch.profiler``; their table is left in ``_profile``.
    """
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"methods {sorted(unknown)} are not among {METHODS}.")
    order = sorted(methods, key=lambda m: METHODS.index(m))
    results: list[dict[str, Any]] = []
    for key, spec in models.items():
        spec = dict(spec, key=key)
        mask = None
        for n, method in enumerate(order, 1):
            log(f"[{key}] {n}/{len(order)} {method} ...")
            t0 = time.perf_counter()
            args = (spec, method, opts, mask if method == "gps" else None, 2 if method in profile else 0)
            try:
                res = _in_subprocess(measure_method, *args) if isolate else measure_method(*args)
            except Exception as err:  # keep the other methods' numbers
                logger.exception("%s on %s failed", method, key)
                res = {"model": key, "architecture": spec["name"], "method": method, "error": repr(err)}
            if method == "shpeft":
                mask = res.pop("_mask", None)
            res.pop("_mask", None)
            results.append(res)
            if "error" in res:
                log(f"[{key}] {method}: FAILED {res['error']}")
            else:
                sel = f", selection {res['selection_s']:.1f}s" if res.get("selection_s") is not None else ""
                log(
                    f"[{key}] {method}: step {1e3 * res['step_s']:.1f} ms, peak +{res['peak_bytes'] / 2**20:.0f} MiB"
                    f"{sel} ({time.perf_counter() - t0:.0f}s)"
                )
    return results
