"""Helpers shared by the benchmark programs: machine facts, the memory probe, JSON and number formats,
the bundle run as a user runs it.

Used by ``benchmarks.suite`` (accuracy) and ``benchmarks.step_cost`` (train-step cost); see
docs/benchmarks.md. Nothing here imports the library, so ``benchmarks.stats`` and the report
renderers stay usable on a machine without the training stack.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "RESULTS_DIR",
    "MemoryProbe",
    "cpu_model",
    "fmt_bytes",
    "fmt_ratio",
    "git_commit",
    "machine_facts",
    "package_version",
    "run_bundle",
    "write_json",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------------
# memory


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class MemoryProbe:
    """Peak memory above a baseline: CUDA allocator bytes, or resident-set growth on CPU.

    On CPU the kernel's peak resident set (``VmHWM``) is reset to the current resident set at
    :meth:`reset` (``echo 5 > /proc/self/clear_refs``, after ``gc.collect()`` and ``malloc_trim``);
    where that file cannot be written the growth of ``ru_maxrss`` is used instead (it under-reports
    when something earlier peaked higher). ``how`` names the measure used.

    Example:
        >>> import torch
        >>> probe = MemoryProbe(torch.device("cpu"))
        >>> probe.reset(); _ = bytearray(10 << 20); probe.peak() >= 0
        True
    """

    def __init__(self, device: Any) -> None:
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.how = "cuda.max_memory_allocated" if self.cuda else "VmHWM (clear_refs reset)"
        self.base = 0

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        _malloc_trim()
        rss = _status_bytes("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            if rss is None:
                raise OSError("no /proc/self/status")
            self.how, self.base = "VmHWM (clear_refs reset)", rss
        except OSError:
            self.how, self.base = "ru_maxrss growth", _maxrss_bytes()

    def total(self) -> int:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        if self.how.startswith("VmHWM"):
            return int(_status_bytes("VmHWM") or 0)
        return _maxrss_bytes()

    def peak(self) -> int:
        return max(0, self.total() - self.base)


# ----------------------------------------------------------------------------------------------
# machine facts


def git_commit() -> str | None:
    """HEAD of the repository the benchmarks live in (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def package_version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_facts(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """Platform, versions, CPU, torch threads, git commit and load average (plus the GPU on CUDA)."""
    import torch

    cpu = not str(device).startswith("cuda")
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    facts: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": package_version("timm"),
        "peft": package_version("peft"),
        "monai": package_version("monai"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": threads if cpu and threads else torch.get_num_threads(),
        "device_name": cpu_model(),
        "git_commit": git_commit(),
        "load_average_1_5_15": load,
        "loadavg": [round(x, 1) for x in load] if load else None,
    }
    if not cpu and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        facts.update(
            device_name=props.name,
            gpu_memory_bytes=int(props.total_memory),
            cuda=torch.version.cuda,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    return facts


# ----------------------------------------------------------------------------------------------
# files and formats


def write_json(path: Path, obj: Any, *, compact: tuple[str, ...] = (), indent: int = 1) -> None:
    """Write ``obj`` as indented JSON, atomically; values under the keys in ``compact`` on one line.

    Long per-sample arrays (a run's test predictions) stay one line each instead of one line per
    number, which keeps the committed results readable and small.
    """
    held: list[str] = []

    def hold(x: Any) -> Any:
        if isinstance(x, dict):
            out = {}
            for k, v in x.items():
                if k in compact and v is not None:
                    held.append(json.dumps(v, separators=(",", ":"), default=float))
                    out[k] = f"\x00compact{len(held) - 1}\x00"
                else:
                    out[k] = hold(v)
            return out
        if isinstance(x, list):
            return [hold(v) for v in x]
        return x

    text = json.dumps(hold(obj), indent=indent, default=float)
    for i, body in enumerate(held):
        text = text.replace(json.dumps(f"\x00compact{i}\x00"), body, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def fmt_bytes(b: float | None) -> str:
    """``1536 -> '1.5 KiB'``; ``None`` or 0 -> ``'-'``."""
    if not b:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return "-"


def fmt_ratio(x: float | None) -> str:
    """``0.5 -> '0.50x'``; ``None`` or NaN -> ``'-'``."""
    return f"{x:.2f}x" if x is not None and x == x else "-"


def run_bundle(
    run_id: str, configs: list[Path], out: Path, extra: list[str], env: dict[str, str] | None = None
) -> None:
    """``python -m monai.bundle run <run_id>`` with ``configs`` into ``out`` (a subprocess, as a user
    runs it; ``env`` replaces its environment), logged to ``<out>.<run_id>.log`` beside it."""
    configs_arg = str([str(c) for c in configs])
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", configs_arg]
    cmd += ["--output_dir", str(out), *extra]
    with open(out.parent / f"{out.name}.{run_id}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
