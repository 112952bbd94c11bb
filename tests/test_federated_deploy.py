"""Deployment on loopback: TLS SuperLink with SuperNode authentication, two registered SuperNodes
with their own datalists, one unregistered SuperNode that must be refused, one `flwr run` round;
and faults (issue 6): a site that sends NaN, a SuperNode killed mid-round and restarted.

Slow (about 1.5 to 4 minutes on 2 cores): every process runs in its own session and is ended by
process group, whatever the outcome; FLWR_HOME lives in tmp_path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest

pytestmark = pytest.mark.slow

TINY = {  # every site trains through the bundle (cpu_demo overlay) with a tiny random ViT
    "overlays": "cpu_demo",
    "bundle": "network_name=vit_tiny_patch16_224 img_size=32 batch_size=4 "
    "shpeft#calibration_batches=1 shpeft#head_warmup_steps=1",
    "pretrained": False,
    "num-server-rounds": 1,
    "min-nodes": 2,
    "num-threads": 1,
    "account-bytes": True,
}


@pytest.fixture
def deployment(tmp_path, request):
    if shutil.which("flower-superlink") is None and not os.path.exists(
        os.path.join(os.path.dirname(os.sys.executable), "flower-superlink")
    ):
        pytest.skip("flwr is not installed (pip install -e '.[federated]')")
    from shpeft_monai.fl.deploy import Deployment

    os.environ["PATH"] = os.path.dirname(os.sys.executable) + os.pathsep + os.environ.get("PATH", "")
    d = Deployment(tmp_path / "deploy", n_nodes=getattr(request, "param", 2))
    try:
        yield d
    finally:
        d.stop()
        for name, proc in d.procs.items():
            assert proc.poll() is not None, f"{name} still running after stop()"
        assert d.alive_groups() == []  # whole process groups gone, ClientApp children included


def test_tls_auth_deployment_runs_a_round_and_refuses_unregistered_node(deployment, tmp_path):
    from shpeft_monai.fl.deploy import demo_datalists

    d = deployment
    assert d.flwr_home.is_relative_to(tmp_path)
    lists = demo_datalists(tmp_path / "data", 3, train_per_site=8, val_per_site=6)
    d.start_superlink()
    for i in range(2):
        d.register(i)
        d.start_supernode(i, {"dataset": str(lists[i]), "num-threads": 1})
    intruder = d.start_supernode(2, {"dataset": str(lists[2]), "num-threads": 1}, name="intruder")

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


def _node_id(d, name: str) -> int:
    d.wait_for(lambda: "SuperNode ID:" in d.log(name), 120, f"{name} to activate")
    return int(re.search(r"SuperNode ID: (\d+)", d.log(name)).group(1))


@pytest.mark.reliability
@pytest.mark.parametrize("deployment", [3], indirect=True)
def test_deployment_survives_a_nan_site_and_a_supernode_killed_mid_round(deployment, tmp_path):
    """3 sites, 3 rounds. Round 2: site 2 sends NaN (fault drill); site 1's SuperNode is SIGKILLed
    (ClientApp included) right after it pulled its train message, then restarted with the same key.

    What Flower 1.41 does, asserted below:
    * the killed node's pending message is never answered by the node; the SuperLink answers it
      itself with a "Node Unavailable" error reply once the node has missed its heartbeats
      (HEARTBEAT_PATIENCE 2 x 30 s after the last one), well before `round-timeout`. Its sender is
      the SuperLink (node id 1): the strategy names the silent node from the message it answers;
    * the SuperLink refuses to re-activate a node it still believes online, so the restart waits
      for round 2's training to be settled: the server then waits for 3 online nodes before
      evaluating round 2 ("Waiting for nodes to connect"), the signal to restart on;
    * the restarted SuperNode gets the same node id (the SuperLink looks it up by public key), but
      its ClientApp context.state is gone: it answers round 2's evaluation with "unknown mask", the
      strategy re-attaches the mask to its round-3 message, and round 3 accepts all 3 sites.
    """
    from shpeft_monai.fl.deploy import demo_datalists
    from shpeft_monai.io import load_delta

    d = deployment
    lists = demo_datalists(tmp_path / "data", 3, train_per_site=8, val_per_site=6)
    cfg = [{"dataset": str(p), "num-threads": 1} for p in lists]
    cfg[2].update({"fault": "nan", "fault-round": 2})
    d.start_superlink()
    for i in range(3):
        d.register(i)
        d.start_supernode(i, cfg[i])
    ids = [_node_id(d, f"supernode{i}") for i in range(3)]

    out = tmp_path / "out"
    rc = {**TINY, "num-server-rounds": 3, "min-nodes": 3, "round-timeout": 180, "out": str(out)}
    run_id = d.run(rc)
    d.follow(run_id)  # the ServerApp's log, in logs/serverapp.log
    n_train = "Receiving: train message"  # rounds have no marker in a SuperNode's log: count them
    d.wait_for(lambda: d.log("supernode1").count(n_train) == 2, 420, "round 2's train message at supernode1")
    d.kill("supernode1")  # its ClientApp is starting or training: no reply for round 2
    assert d.log("supernode1").count("Sending: train message") == 1, d.log("supernode1")[-2000:]
    mark = len(d.log("serverapp"))
    d.wait_for(lambda: "Waiting for nodes to connect" in d.log("serverapp")[mark:], 240, "round 2 to settle")
    d.start_supernode(1, cfg[1], name="supernode1-restarted")
    assert _node_id(d, "supernode1-restarted") == ids[1]  # same key, same identity

    status = d.wait_run(run_id, timeout=600)
    assert status == "finished:completed", (status, d.log("superlink")[-3000:])
    fed = json.loads((out / "federated.json").read_text())
    rejected = {(r["phase"], r["round"], r["node"]): r["reason"] for r in fed["rejected_replies"]}
    assert "NaN" in rejected.pop(("train", 2, ids[2]))  # the bad update, named by its node id
    assert "Node Unavailable" in rejected.pop(("train", 2, ids[1]))  # the dead node, by the SuperLink
    assert "unknown mask" in rejected.pop(("evaluate", 2, ids[1]))  # restarted: context.state lost
    assert not rejected, rejected
    train = fed["train_metrics_per_round"]
    assert (train["2"]["sites-accepted"], train["2"]["sites-rejected"]) == (1, 2)  # site 0 only
    assert (train["3"]["sites-accepted"], train["3"]["sites-rejected"]) == (3, 0)  # site 1 is back
    rows = fed["communication"]["per_site_per_round"]
    back = {r["node"] for r in rows if (r["phase"], r["round"]) == ("train", 3) and r["received"]}
    assert back == set(ids)  # every site, the restarted one included, replied in round 3
    delta = load_delta(out / "global_delta.safetensors")
    for t in [*delta.values.values(), *delta.head.values()]:
        assert t.isfinite().all()
