"""The forward-only estimator (task_signal='activation') against a hand computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shpeft_monai import SHPEFTConfig, select_mask
from shpeft_monai.estimators import activation_scores


class _Tiny(nn.Module):
    """Tokens -> Linear(3, 4) -> grouped 1x1 conv on a 2x2 grid -> head (not "fc": a head name).

    Its forward asserts that no autograd graph is built.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(3, 4)
        self.conv = nn.Conv2d(4, 2, kernel_size=1, groups=2)
        self.head = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled(), "the forward-only estimator must not build a graph"
        h = self.proj(x)  # (B, 4 tokens, 4)
        h = h.transpose(1, 2).reshape(x.shape[0], 4, 2, 2)
        return self.head(self.conv(h).mean((2, 3)))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 4, 3, generator=gen), torch.zeros(b, dtype=torch.long)) for b in (2, 3)]


def _hand(model: _Tiny, estimator: str) -> dict[str, torch.Tensor]:
    f = torch.abs if estimator == "l1" else torch.square
    xs = torch.cat([x.reshape(-1, 3) for x, _ in _batches()])  # every token of every batch
    proj_in = f(xs).mean(0)
    with torch.no_grad():
        h = torch.cat([model.proj(x).transpose(1, 2).reshape(x.shape[0], 4, -1) for x, _ in _batches()], 0)
    conv_in = f(h).mean((0, 2))  # per input channel, over batch and space
    w_conv = f(model.conv.weight.detach())[:, :, 0, 0]  # (2 out, 2 in per group)
    return {
        "proj.weight": f(model.proj.weight.detach()) * proj_in,
        "proj.bias": f(model.proj.bias.detach()),  # input taken as the constant 1
        "conv.weight": (w_conv * torch.stack([conv_in[0:2], conv_in[2:4]])).view(2, 2, 1, 1),
        "conv.bias": f(model.conv.bias.detach()),
    }


@pytest.mark.parametrize("estimator", ["l1", "l2"])
def test_activation_scores_match_hand_computation(estimator: str) -> None:
    model = _Tiny()
    cfg = SHPEFTConfig(task_signal="activation", task_estimator=estimator, calibration_batches=2)
    params = {n: p for n, p in model.named_parameters() if not n.startswith("head")}
    scores = activation_scores(model, _batches(), params, cfg, progress=False)
    hand = _hand(model, estimator)
    assert set(scores) == set(hand)
    for n, expected in hand.items():
        torch.testing.assert_close(scores[n], expected, rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())


def test_activation_selection_takes_the_top_hand_scores() -> None:
    model = _Tiny()
    cfg = SHPEFTConfig(
        budget=5,
        hybrid="task_specific",
        task_signal="activation",
        calibration_batches=2,
        eligible=("linear", "conv", "bias"),
        head_warmup_steps=0,
    )
    mask = select_mask(model, cfg, _batches(), progress=False)
    hand = _hand(model, "l1")
    flat = torch.cat([hand[n].reshape(-1) for n in sorted(hand)])
    fifth = torch.sort(flat, descending=True).values[4]
    for n, idx in mask.indices.items():
        assert bool((hand[n].reshape(-1)[idx] >= fifth).all())
    assert mask.k == 5


def test_activation_signal_refuses_taylor() -> None:
    with pytest.raises(ValueError, match="taylor"):
        SHPEFTConfig(task_signal="activation", taylor=True)
