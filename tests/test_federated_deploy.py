"""Deployment on loopback: TLS SuperLink with SuperNode authentication, two registered SuperNodes
with their own datalists, one unregistered SuperNode that must be refused, one `flwr run` round.

Slow (about 1.5 to 4 minutes on 2 cores): every process runs in its own session and is ended by
process group, whatever the outcome; FLWR_HOME lives in tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

pytestmark = pytest.mark.slow

TINY = {
    "model": "vit_tiny_patch16_224",
    "pretrained": False,
    "img-size": 32,
    "batch-size": 4,
    "calibration-batches": 1,
    "num-server-rounds": 1,
    "min-nodes": 2,
    "num-threads": 1,
}


@pytest.fixture
def deployment(tmp_path):
    if shutil.which("flower-superlink") is None and not os.path.exists(
        os.path.join(os.path.dirname(os.sys.executable), "flower-superlink")
    ):
        pytest.skip("flwr is not installed (pip install -e '.[federated]')")
    from federated.deploy import Deployment

    os.environ["PATH"] = os.path.dirname(os.sys.executable) + os.pathsep + os.environ.get("PATH", "")
    d = Deployment(tmp_path / "deploy", n_nodes=2)
    try:
        yield d
    finally:
        d.stop()
        for name, proc in d.procs.items():
            assert proc.poll() is not None, f"{name} still running after stop()"
        assert d.alive_groups() == []  # whole process groups gone, ClientApp children included


def test_tls_auth_deployment_runs_a_round_and_refuses_unregistered_node(deployment, tmp_path):
    from federated.deploy import demo_datalists

    d = deployment
    assert d.flwr_home.is_relative_to(tmp_path)
    lists = demo_datalists(tmp_path / "data", 3, train_per_site=8, val_per_site=6)
    d.start_superlink()
    for i in range(2):
        d.register(i)
        d.start_supernode(i, {"data-list": str(lists[i]), "num-threads": 1})
    intruder = d.start_supernode(2, {"data-list": str(lists[2]), "num-threads": 1}, name="intruder")

    out = tmp_path / "out"
    run_id = d.run({**TINY, "out": str(out)})
    status = d.wait_run(run_id, timeout=540)
    assert status == "finished:completed", (status, d.log("superlink")[-3000:])

    report = json.loads((out / "federated.json").read_text())
    assert report["k"] > 0 and not report["rejected_replies"]
    nodes = {r["node"] for r in report["communication"]["per_site_per_round"]}
    assert len(nodes) == 2  # the unregistered node never took part
    assert (out / "global_delta.safetensors").is_file()
    assert set(report["accuracy_per_round"]) == {"1"}
    train = [r for r in report["communication"]["per_site_per_round"] if r["phase"] == "train"]
    assert len(train) == 2 and all(0 < r["sent"] < 20_000 for r in train)

    # the unregistered SuperNode is refused by the SuperLink: activation fails (Flower exit code 305)
    end = time.monotonic() + 60
    while intruder.poll() is None and time.monotonic() < end:
        time.sleep(1)
    log = d.log("intruder").lower()
    assert "supernode id:" not in log, log[-2000:]
    assert intruder.poll() not in (None, 0) and "failed to activate supernode" in log, log[-2000:]
    assert "activate-node" in d.log("superlink")
