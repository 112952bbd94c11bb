"""A federated site runs the bundle (issue 12): its base network is the server's, it trains through
the bundle's trainer with the bundle's recipe, and a workflow kept between rounds (simulation
actors) trains exactly like one built afresh (deployment: a new process per message).

Slow: a tiny random ViT at 32 px through the real bundle configs on real Br35H images.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow

TINY = {
    "overlays": "cpu_demo",
    "bundle": "network_name=vit_tiny_patch16_224 img_size=32 batch_size=4 "
    "shpeft#calibration_batches=1 shpeft#head_warmup_steps=1",
    "pretrained": False,
    "num-server-rounds": 3,
    "local-batch-size": 4,  # the bundle's batch (the default would take 4 / min-nodes)
}


def _site_with_mask(tmp_path, **config):
    """A site on 8 generated images, its settings (TINY plus ``config``), the agreed mask of that one
    site, the server's initial head and the site's datalist."""
    from shpeft_monai.agreement import agree_mask, combine_candidates, site_candidates
    from shpeft_monai.fl.partition import site_datalists
    from shpeft_monai.fl.task import Settings, SiteBundle, base_network
    from shpeft_monai.model import eligible_parameters, head_parameters
    from shpeft_monai.scoring import task_agnostic_scores

    (data,) = site_datalists(tmp_path / "data", 1, train_per_site=8, val_per_site=6)
    s = Settings.from_config(TINY, {"dataset": str(data), **config})
    cfg = s.shpeft()
    base = base_network(s)
    head0 = {n: p.detach().numpy().copy() for n, p in head_parameters(base, cfg).items()}
    site = SiteBundle(s, tmp_path / "work")
    c = site.calibrate(head0)
    idx, sc = site_candidates(c["scores"], 40)
    ta = task_agnostic_scores(eligible_parameters(base, cfg), cfg.agnostic_estimator)
    mask = agree_mask(cfg, combine_candidates([(idx, sc, 8)], c["n_eligible"], cfg), ta, c["fingerprint"])
    return site, mask, head0, data


def test_site_trains_through_the_bundle_and_a_kept_workflow_equals_a_new_one(tmp_path):
    from shpeft_monai.agreement import agree_mask, combine_candidates, site_candidates
    from shpeft_monai.fl import task
    from shpeft_monai.fl.partition import site_datalists
    from shpeft_monai.fl.task import Settings, SiteBundle, base_network
    from shpeft_monai.io import load_mask
    from shpeft_monai.model import backbone_fingerprint, eligible_parameters, head_parameters
    from shpeft_monai.scoring import task_agnostic_scores

    (data,) = site_datalists(tmp_path / "data", 1, train_per_site=8, val_per_site=6)
    s = Settings.from_config(TINY, {"dataset": str(data)})
    cfg = s.shpeft()
    base = base_network(s)
    head0 = {n: p.detach().numpy().copy() for n, p in head_parameters(base, cfg).items()}
    site = SiteBundle(s, tmp_path / "work")

    c = site.calibrate(head0)
    assert c["fingerprint"] == backbone_fingerprint(base, cfg)  # the server's base network
    assert c["num_examples"] == 8
    assert not np.array_equal(c["head"]["head.weight"], head0["head.weight"])  # warmed up, as the bundle does
    idx, sc = site_candidates(c["scores"], 40)
    params = eligible_parameters(base, cfg)
    ta = task_agnostic_scores(params, cfg.agnostic_estimator)
    mask = agree_mask(cfg, combine_candidates([(idx, sc, 8)], c["n_eligible"], cfg), ta, c["fingerprint"])

    zeros = np.zeros(mask.k, np.float32)
    v1, h1, n, loss = site.train(mask, zeros, head0, server_round=1)
    assert n == 8 and np.isfinite(loss) and np.abs(v1).max() > 0  # the selected values moved
    assert load_mask(tmp_path / "work" / "mask.safetensors").mask.fingerprint == mask.fingerprint
    trainer = next(iter(task._ROUNDS.values())).workflow.trainer

    kept = site.train(mask, v1, h1, server_round=2)  # the workflow kept from round 1
    # one learning-rate schedule over all rounds: round 2 resumed at round 1's last step (2 steps/epoch)
    assert (trainer.state.epoch, trainer.state.iteration) == (2, 4)
    from shpeft_monai.recipe import DEFAULTS, lr_factor

    peak = DEFAULTS.lr_selected * lr_factor(3, 6, warmup=DEFAULTS.warmup, schedule=DEFAULTS.schedule)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(peak)
    task._ROUNDS.clear()
    new = site.train(mask, v1, h1, server_round=2)  # built again, as in a new process
    np.testing.assert_array_equal(kept[0], new[0])
    for name in kept[1]:
        np.testing.assert_array_equal(kept[1][name], new[1][name])
    assert not np.array_equal(kept[0], v1)

    metrics = site.evaluate(mask, *new[:2])
    assert metrics["num-examples"] == 6 and 0 <= metrics["accuracy"] <= 1


def test_a_site_can_continue_its_optimizer_moments_across_rounds(tmp_path):
    """keep-optimizer-state: round r loads the AdamW moments the site saved after round r - 1 (a
    few KB per round, per mask), so a rebuilt workflow still trains like a kept one, and the moments
    change what round 2 does."""
    from shpeft_monai.fl import task
    from shpeft_monai.fl.task import Settings, SiteBundle

    site, mask, head0, data = _site_with_mask(tmp_path, **{"keep-optimizer-state": "true"})
    assert site.s.keep_optimizer_state

    v1, h1, _, _ = site.train(mask, np.zeros(mask.k, np.float32), head0, server_round=1)
    files = sorted((tmp_path / "work" / "optimizer").iterdir())
    assert [f.name for f in files] == [f"{mask.fingerprint[:16]}_round1.pt"]
    assert files[0].stat().st_size < 200_000  # k values and the head, never the dense model
    task._ROUNDS.clear()
    a = site.train(mask, v1, h1, server_round=2)
    task._ROUNDS.clear()
    b = site.train(mask, v1, h1, server_round=2)  # a retried round repeats itself
    np.testing.assert_array_equal(a[0], b[0])
    task._ROUNDS.clear()
    plain = Settings.from_config(TINY, {"dataset": str(data), "keep-optimizer-state": "false"})
    fresh = SiteBundle(plain, tmp_path / "work2")
    c = fresh.train(mask, v1, h1, server_round=2)  # zero moments: a different step
    assert not np.array_equal(a[0], c[0])


def test_local_batch_size_changes_only_the_rounds_training_batch(tmp_path):
    """local-batch-size: a round trains at the site's batch (more steps per epoch, the schedule
    spanning them), by default the bundle's batch / min-nodes; calibration and the references keep
    the bundle's batch."""
    from shpeft_monai.fl import task
    from shpeft_monai.fl.task import Settings, SiteBundle

    site, mask, head0, data = _site_with_mask(tmp_path, **{"local-batch-size": "2"})
    assert site.s.local_batch_size == 2

    task._ROUNDS.clear()
    site.train(mask, np.zeros(mask.k, np.float32), head0, server_round=1)
    wf = next(iter(task._ROUNDS.values())).workflow
    assert wf.parser.get_parsed_content("train#dataloader").batch_size == 2
    assert wf.trainer.state.iteration == 4  # 8 images at batch 2 (the bundle's batch 4: 2 steps)
    assert wf.parser.get_parsed_content("train#calib_loader").batch_size == 4
    task._ROUNDS.clear()
    reference = site.workflow(max_epochs=1, fl_rounds=1)  # what the simulation's references train
    assert reference.parser.get_parsed_content("train#dataloader").batch_size == 4
    for nodes, expected in ((3, 1), (2, 2), (1, 4)):  # default: round(bundle batch 4 / min-nodes)
        auto = Settings.from_config(TINY, {"dataset": str(data), "local-batch-size": 0, "min-nodes": nodes})
        task._ROUNDS.clear()
        wf = SiteBundle(auto, tmp_path / f"auto{nodes}")._round_workflow(mask).workflow
        assert wf.parser.get_parsed_content("train#dataloader").batch_size == expected
    task._ROUNDS.clear()
