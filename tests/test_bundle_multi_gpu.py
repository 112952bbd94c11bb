"""The multi-GPU overlay through torchrun: two CPU processes on gloo train one epoch with one SH-PEFT mask."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from shpeft_monai import load_delta
from shpeft_monai.io import load_mask
from tests.conftest import BUNDLE

TIMEOUT_S = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_with_the_same_mask(tmp_path) -> None:
    out = tmp_path / "run"
    configs = [
        str(BUNDLE / "train.yaml"),
        str(BUNDLE / "overlays" / "cpu_demo.yaml"),
        str(BUNDLE / "overlays" / "multi_gpu.yaml"),
    ]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "monai.bundle", "run", "training", "--config_file", repr(configs),
        "--dist_backend", "gloo", "--device", "cpu",
        "--train_subset", "16", "--val_subset", "8", "--max_epochs", "1", "--img_size", "28",
        "--batch_size", "4", "--num_workers", "0", "--cache_rate", "0.0",
        "--shpeft#calibration_batches", "1", "--shpeft#head_warmup_steps", "1",
        "--output_dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group: a timeout kills torchrun and both workers
    )  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S}s:\n{log[-4000:]}")
    assert proc.returncode == 0, log[-6000:]

    reported = dict(re.findall(r"rank (\d+) SH-PEFT mask fingerprint ([0-9a-f]+)", log))
    assert set(reported) == {"0", "1"}, log[-4000:]
    saved = load_mask(out / "mask.safetensors").mask.fingerprint
    best = load_delta(out / "best_delta.safetensors")
    assert reported["0"] == reported["1"] == saved == best.mask.fingerprint
    assert best.meta["epoch"] == 1

    # logging and artefact handlers ran on rank 0 only: every TensorBoard file comes from one process
    writers = {p.name.split(".")[-2] for p in (out / "tensorboard").iterdir()}
    assert len(writers) == 1
    assert (out / "history.json").is_file() and (out / "last_trainer.json").is_file()
