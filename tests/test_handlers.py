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
