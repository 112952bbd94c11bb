"""Methods and BatchNorm: the saved artefact alone rebuilds the model that was trained and validated."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from shpeft_monai import SHPEFTConfig
from shpeft_monai.handlers.checkpoint import _save_trainable, load_trainable_state
from shpeft_monai.methods import freeze_norm_statistics, prepare_method, trainable_parameters
from shpeft_monai.networks import create_network

HEAD = ("fc",)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _train(model: nn.Module, steps: int = 3, size: int = 8) -> None:
    torch.manual_seed(1)
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    for _ in range(steps):
        model.train()  # what MONAI's SupervisedTrainer does every iteration
        x = torch.randn(4, 3, size, size) * 3 + 2  # statistics far from the pretrained ones
        loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 0, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()


def _rebuilt(base: nn.Module, method: str, path) -> nn.Module:
    fresh = prepare_method(copy.deepcopy(base), method, shpeft=SHPEFTConfig(head=HEAD), progress=False)
    load_trainable_state(fresh, path)
    return fresh.eval()


@pytest.mark.parametrize("method", ["linear_probe", "bitfit", "full"])
def test_artefact_rebuilds_the_trained_model(method, tmp_path) -> None:
    torch.manual_seed(0)
    base = SmallCNN()
    model = prepare_method(copy.deepcopy(base), method, shpeft=SHPEFTConfig(head=HEAD), progress=False)
    _train(model)
    stats_moved = not torch.equal(model.bn.running_mean, base.bn.running_mean)
    assert stats_moved == (method == "full")  # only full fine-tuning adapts the running statistics

    _save_trainable(tmp_path / "a.safetensors", model, {})
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(_rebuilt(base, method, tmp_path / "a.safetensors")(x), model.eval()(x))


def test_frozen_batchnorm_normalises_with_pretrained_statistics_in_train_mode() -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    model.bn.running_mean.fill_(0.5)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = model.eval()(x)
        assert freeze_norm_statistics(model) == 1
        assert freeze_norm_statistics(model) == 0  # idempotent
        torch.testing.assert_close(model.train()(x), expected)


def test_real_efficientnet_linear_probe_round_trip(tmp_path) -> None:
    base = create_network("tf_efficientnet_lite0", num_classes=2)
    model = prepare_method(copy.deepcopy(base), "linear_probe", shpeft=SHPEFTConfig(head=("classifier",)))
    _train(model, steps=2, size=32)
    for name, buf in base.named_buffers():
        torch.testing.assert_close(dict(model.named_buffers())[name], buf, msg=f"{name} drifted")
    _save_trainable(tmp_path / "a.safetensors", model, {})
    fresh = prepare_method(copy.deepcopy(base), "linear_probe", shpeft=SHPEFTConfig(head=("classifier",)))
    load_trainable_state(fresh, tmp_path / "a.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x))
