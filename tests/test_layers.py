"""Sparse layers: exact gradients of the selected entries, nothing else moves, zero delta = base."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shpeft_monai import SHPEFTConfig, SparseMask, inject, merge, trainable_parameters
from shpeft_monai.layers import SparseConv2d, SparseLinear
from shpeft_monai.model import backbone_fingerprint


def _mask_for(model: nn.Module, names: list[str], per_tensor: int, seed: int = 0) -> SparseMask:
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    idx = {n: torch.sort(torch.randperm(params[n].numel(), generator=gen)[:per_tensor]).values for n in names}
    return SparseMask(idx, {n: tuple(params[n].shape) for n in names})


CASES = {
    "linear": (
        lambda: nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 3)),
        (4, 7, 12),
        ["0.weight"],
    ),
    "conv": (
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)),
        (2, 3, 9, 9),
        ["0.weight", "2.weight"],
    ),
    "depthwise": (
        lambda: nn.Sequential(nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=6), nn.Conv2d(6, 2, 1)),
        (2, 6, 8, 8),
        ["0.weight"],
    ),
    "conv3d_fallback": (
        lambda: nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1)),
        (2, 2, 5, 5, 5),
        ["0.weight"],
    ),
    "bias_fallback": (lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)), (3, 5), ["0.bias"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_selected_gradient_equals_dense_autograd(case: str) -> None:
    torch.manual_seed(0)
    make, shape, names = CASES[case]
    base = make().double()
    ref = make().double()
    ref.load_state_dict(base.state_dict())
    x = torch.randn(*shape, dtype=torch.double)
    mask = _mask_for(base, names, per_tensor=5)
    inject(base, mask, SHPEFTConfig(head=()))
    base(x).square().sum().backward()
    ref(x).square().sum().backward()
    ref_params = dict(ref.named_parameters())
    for name, module in base.named_modules():
        if hasattr(module, "shpeft_delta"):
            owner = (
                name.replace(".parametrizations", "").rsplit(".", 2)[0]
                if "parametrizations" in name
                else name
            )
            pname = (
                name.split(".parametrizations.")[1].split(".")[0] if "parametrizations" in name else "weight"
            )
            full = f"{owner}.{pname}"
            dense = ref_params[full].grad.reshape(-1)[mask.indices[full]]
            torch.testing.assert_close(module.shpeft_delta.grad.double(), dense, rtol=1e-5, atol=1e-6)


def test_fast_paths_are_used_for_linear_and_conv2d() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    inject(net, _mask_for(net, ["0.weight", "2.weight"], 3), SHPEFTConfig(head=()))
    assert type(net[0]) is SparseConv2d and type(net[2]) is SparseLinear
    assert set(dict(net.named_parameters())) >= {"0.weight", "2.weight"}  # names unchanged


def test_zero_delta_reproduces_base_output_exactly() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(2, 3, 8, 8)
    expected = net(x)
    inject(net, _mask_for(net, ["0.weight", "2.weight", "2.bias"], 4), SHPEFTConfig(head=("4",)))
    assert torch.equal(net(x), expected)


def test_unselected_weights_bit_identical_after_adamw_with_weight_decay() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 3))
    cfg = SHPEFTConfig(head=("4",))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    mask = _mask_for(net, ["0.weight", "2.weight", "2.bias"], 6)
    inject(net, mask, cfg)
    opt = torch.optim.AdamW(trainable_parameters(net), lr=1e-2, weight_decay=0.5)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(net(torch.randn(8, 16)), torch.randint(0, 3, (8,))).backward()
        opt.step()
    merge(net)
    after = dict(net.named_parameters())
    for name in ("0.weight", "2.weight", "2.bias"):
        changed = torch.nonzero(after[name].reshape(-1) != before[name].reshape(-1)).squeeze(1)
        assert set(changed.tolist()) <= set(mask.indices[name].tolist())
        assert changed.numel() > 0  # the selected entries did train
    for name in ("0.bias",):
        assert torch.equal(after[name], before[name])
    assert not torch.equal(after["4.weight"], before["4.weight"])  # the head trains
    assert sum(p.numel() for p in opt.param_groups[0]["params"]) == mask.k + 32 * 3 + 3


def test_merged_output_equals_unmerged_sparse_model() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    x = torch.randn(3, 3, 8, 8)
    inject(net, _mask_for(net, ["0.weight", "2.weight", "0.bias"], 3), SHPEFTConfig(head=()))
    with torch.no_grad():
        for p in trainable_parameters(net):
            p.add_(torch.randn_like(p))
    unmerged = net(x)
    merge(net)
    assert torch.equal(net(x), unmerged)
    assert not any(hasattr(m, "shpeft_delta") for m in net.modules())


def test_eject_restores_base_weights() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    fp = backbone_fingerprint(net, SHPEFTConfig(head=()))
    inject(net, _mask_for(net, ["0.weight", "1.bias"], 2), SHPEFTConfig(head=()))
    with torch.no_grad():
        for p in trainable_parameters(net):
            p.add_(1.0)
    net(torch.randn(1, 4))
    from shpeft_monai import eject

    eject(net)
    assert backbone_fingerprint(net, SHPEFTConfig(head=())) == fp


@pytest.mark.parametrize("first", ["conv", "linear"])
def test_first_layer_computes_no_input_gradient(first: str) -> None:
    """The images need no gradient: a sparse first layer does no input-gradient GEMM/conv at all."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(4)
    layer = nn.Conv2d(3, 8, 4, stride=4) if first == "conv" else nn.Linear(48, 8)
    x = torch.randn(2, 3, 8, 8) if first == "conv" else torch.randn(2, 5, 48)
    inject(layer, _mask_for(layer, ["weight"], 6), SHPEFTConfig(head=()))
    loss = layer(x).square().sum()
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    assert counter.get_total_flops() == 0  # entry gradients are elementwise products, not GEMMs
    assert layer.shpeft_delta.grad is not None and layer.shpeft_delta.grad.abs().sum() > 0
    x.requires_grad_(True)
    layer(x).square().sum().backward()
    assert x.grad is not None  # the same layer does compute it when the input needs one


def test_saved_activations_are_only_the_touched_columns() -> None:
    torch.manual_seed(5)
    net = nn.Linear(64, 16)
    mask = SparseMask({"weight": torch.tensor([3, 64 + 3, 200, 900])}, {"weight": (16, 64)})
    inject(net, mask, SHPEFTConfig(head=()))
    shapes: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        net(torch.randn(10, 64, requires_grad=True)).sum().backward()
    cols = {3, 200 % 64, 900 % 64}
    assert (10, len(cols)) in shapes and not any(s == (10, 64) for s in shapes)
