"""Handlers on bare Ignite engines: select once across repeated run() calls, checkpoints resume."""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events
from torch import nn

from shpeft_monai import SHPEFTConfig, get_mask, trainable_parameters
from shpeft_monai.handlers import SHPEFTSelection, TrainingCheckpoint


def _setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2))
    data = [(torch.randn(4, 6), torch.randint(0, 2, (4,))) for _ in range(3)]
    opt = torch.optim.AdamW(net[2].parameters(), lr=1e-2, weight_decay=0.1)

    def step(engine, batch):
        x, y = batch
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return {"loss": loss}

    return net, data, opt, Engine(step)


def test_selection_handler_selects_once_across_runs() -> None:
    net, data, opt, engine = _setup()
    handler = SHPEFTSelection(net, SHPEFTConfig(budget=7, head=("2",), calibration_batches=2), data, opt)
    handler.attach(engine)
    handler.attach(engine)  # double attachment is harmless
    engine.run(data, max_epochs=1)
    first = get_mask(net).fingerprint
    for _ in range(3):  # MonaiAlgo calls run() once per federated round
        engine.run(data, max_epochs=1)
    assert handler.selections == 1 and get_mask(net).fingerprint == first
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert {id(p) for p in trainable_parameters(net)} == in_opt
    assert sum(p.numel() for p in trainable_parameters(net)) == 7 + 12 * 2 + 2


def test_training_checkpoint_resumes_epoch_and_state(tmp_path) -> None:
    net, data, opt, engine = _setup()
    TrainingCheckpoint(tmp_path, net, opt).attach(engine)
    engine.run(data, max_epochs=2)
    saved = net[2].weight.detach().clone()

    net2, data2, opt2, engine2 = _setup()
    TrainingCheckpoint(tmp_path, net2, opt2).attach(engine2)
    seen = []
    engine2.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.append(e.state.epoch))
    engine2.run(data2, max_epochs=3)
    assert seen == [3]  # epochs 1-2 were restored, only epoch 3 ran
    assert not torch.equal(net2[2].weight, saved)  # and it trained on from the restored weights
    assert opt2.state_dict()["state"]  # optimizer moments were restored


def test_best_artefact_saver_keeps_the_best_across_a_resume(tmp_path) -> None:
    from safetensors import safe_open

    from shpeft_monai.handlers import BestArtefactSaver

    net = nn.Sequential(nn.Linear(3, 2))
    scores = iter([0.9, 0.7, 0.95])

    def make_evaluator():
        def step(engine, batch):
            return {}

        ev = Engine(step)

        @ev.on(Events.EPOCH_COMPLETED)
        def _metric(engine):
            engine.state.metrics = {"val_selection": next(scores)}

        BestArtefactSaver(tmp_path, net).attach(ev)
        return ev

    def saved_best():
        with safe_open(str(tmp_path / "best_trainable.safetensors"), "pt") as f:
            import json

            return json.loads(f.metadata()["meta"])["best_metric"]

    make_evaluator().run([0], max_epochs=1)
    assert saved_best() == 0.9
    make_evaluator().run([0], max_epochs=1)  # a resumed run whose first epoch is worse
    assert saved_best() == 0.9
    make_evaluator().run([0], max_epochs=1)
    assert saved_best() == 0.95


def test_run_summary_reports_the_best_epoch_of_every_method(tmp_path) -> None:
    """Full fine-tuning, BitFit, LoRA and the probe save a trainable state, not a delta: the report
    still says which epoch model selection chose."""
    from types import SimpleNamespace

    from shpeft_monai.bundle import run_summary
    from shpeft_monai.handlers import BestArtefactSaver

    net = nn.Sequential(nn.Linear(3, 2))
    scores = iter([0.5, 0.8, 0.6])
    ev = Engine(lambda engine, batch: {})

    @ev.on(Events.EPOCH_COMPLETED)
    def _metric(engine):
        engine.state.metrics = {"val_selection": next(scores)}

    BestArtefactSaver(tmp_path, net).attach(ev)
    ev.run([0], max_epochs=3)
    run = SimpleNamespace(
        method="full", network_name="n", img_size=8, class_names=("a", "b"), data={}, scored={}
    )
    facts = run_summary(tmp_path, run)
    assert facts["best_epoch"] == 2 and facts["artefact_bytes"] > 0


def test_handlers_see_through_distributed_wrappers(tmp_path) -> None:
    from shpeft_monai import SHPEFTConfig, extract_delta, inject, is_injected, select_mask

    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2))
    cfg = SHPEFTConfig(budget=5, hybrid="task_agnostic", head=("2",))
    inject(net, select_mask(net, cfg), cfg)
    wrapped = nn.DataParallel(net)
    assert is_injected(wrapped) and extract_delta(wrapped).mask.k == 5
