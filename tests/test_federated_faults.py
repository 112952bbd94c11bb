"""Federated faults inside a real Flower simulation (issue 6): hostile and crashing sites.

Two simulations of the same 8 sites (tiny random ViT, 2 rounds) differ only in how the 6 bad sites
fail in round 2: one run with every kind of hostile reply (NaN, oversized, mis-indexed, wrong dtype,
huge example count, replay of round 1) and a process crash, the other with the same sites raising a
plain error. Both rounds complete; every bad reply is dropped with its node id; and the final global
delta is the same in both runs (up to last-bit rounding of CPU kernels in other worker processes):
what a hostile site sends never reaches the global model.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shpeft_monai.fl.faults import FAULT_KINDS, parse_fault, parse_faults
from shpeft_monai.io import load_delta

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parents[1]
HOSTILE = ["nan", "oversized", "misindexed", "float64", "huge-count", "replay", "crash"]


def _simulate(out: Path, faults: list[str], sites: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "shpeft_monai.fl.simulate", "--out", str(out), "--sites", str(sites)]
    cmd += ["--rounds", "2", "--train-per-site", "6", "--val-limit", "8", "--test-limit", "8"]
    cmd += ["--model", "vit_tiny_patch16_224", "--random-init", "--img-size", "32", "--batch-size", "3"]
    cmd += ["--calibration-batches", "1", "--no-baselines", "--round-timeout", "600", "--ray-cpus", "2"]
    cmd += ["--bundle", "shpeft#head_warmup_steps=1"]
    for f in faults:
        cmd += ["--fault", f]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = proc.communicate(timeout=900)
    finally:  # Ray and its actors live in this process group: end all of them
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, proc.returncode, log)


def test_parse_fault_and_its_errors():
    assert parse_fault("3:nan") == (3, "nan", 2)
    assert parse_faults("1:crash:3,2:replay") == {1: ("crash", 3), 2: ("replay", 2)}
    for bad, msg in (("x:nan", "SITE:KIND"), ("1:melt", "unknown kind"), ("1:nan:0", "round >= 1")):
        with pytest.raises(ValueError, match=msg):
            parse_fault(bad)
    with pytest.raises(ValueError, match="already has a fault"):
        parse_faults(["1:nan", "1:crash"])
    assert set(HOSTILE) <= set(FAULT_KINDS)


def test_hostile_and_crashing_sites_in_a_real_simulation(tmp_path):
    sites = 2 + len(HOSTILE)
    hostile = _simulate(tmp_path / "hostile", [f"{2 + i}:{k}:2" for i, k in enumerate(HOSTILE)], sites)
    assert hostile.returncode == 0, hostile.stdout[-5000:]
    polite = _simulate(tmp_path / "polite", [f"{2 + i}:error:2" for i in range(len(HOSTILE))], sites)
    assert polite.returncode == 0, polite.stdout[-5000:]

    fed = json.loads((tmp_path / "hostile" / "federated.json").read_text())
    train = fed["train_metrics_per_round"]
    assert train["1"]["sites-accepted"] == sites  # round 1: everyone honest
    assert train["2"]["sites-accepted"] == 2 and train["2"]["sites-rejected"] == len(HOSTILE)
    rejected = [r for r in fed["rejected_replies"] if r["phase"] == "train"]
    assert {r["round"] for r in rejected} == {2}
    assert len({r["node"] for r in rejected}) == len(HOSTILE)  # each bad site named once, by node id
    reasons = " | ".join(r["reason"] for r in rejected)
    for needle in (
        "NaN",
        "expected float32",
        "not the agreed mask",
        "num-examples",
        "round 1",
        "error reply",
    ):
        assert needle in reasons, (needle, reasons)
    assert "died" in reasons.lower()  # the crashed site's actor, reported by Flower as an error reply

    # the global model never saw a hostile value: the same as when those sites just failed. Not
    # bitwise: the sites train in other Ray worker processes in the two runs, and CPU kernels may
    # round the last bit differently in another process (measured: at most ~1e-6 of the values).
    # One accepted hostile reply would move them by the whole update or more (NaN, 10^9 examples).
    a = load_delta(tmp_path / "hostile" / "global_delta.safetensors")
    b = load_delta(tmp_path / "polite" / "global_delta.safetensors")
    assert a.mask.fingerprint == b.mask.fingerprint
    for name in a.values:
        assert torch.isfinite(a.values[name]).all(), name
        torch.testing.assert_close(a.values[name], b.values[name], rtol=1e-4, atol=1e-8, msg=name)
    for name in a.head:
        torch.testing.assert_close(a.head[name], b.head[name], rtol=1e-4, atol=1e-8, msg=name)
