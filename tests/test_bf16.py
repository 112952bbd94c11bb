"""bf16 autocast through the sparse layers: same forward as the base model, entry gradients near float32.

Tolerance: bf16 keeps 8 significant bits (relative rounding 2**-9, about 0.2 %). Inputs, weights and
output gradients are rounded once each and the products are summed in float32, so the entry
gradients must agree with float32 to 3 % in relative L2 norm, and must be no worse than 1.5 times
the error of dense autograd under the same autocast (what full fine-tuning would compute).
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from shpeft_monai import SHPEFTConfig, SparseMask, inject
from shpeft_monai.layers import SparseConv2d, SparseLinear, layer_of

REL_TOL = 3e-2
BF16 = torch.bfloat16


def _mask(model: nn.Module, names: list[str], per_tensor: int, seed: int = 0) -> SparseMask:
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    idx = {n: torch.sort(torch.randperm(params[n].numel(), generator=gen)[:per_tensor]).values for n in names}
    return SparseMask(idx, {n: tuple(params[n].shape) for n in names})


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.GELU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 32),
        nn.GELU(),
        nn.Linear(32, 3),
    )


def _vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, depth=2)


CASES = {
    "cnn": (_cnn, (4, 3, 16, 16), ["0.weight", "2.weight", "4.weight", "4.bias"]),
    "vit": (
        _vit,
        (4, 3, 32, 32),
        [
            "patch_embed.proj.weight",
            "blocks.0.attn.qkv.weight",
            "blocks.1.mlp.fc2.weight",
            "blocks.1.norm1.weight",
        ],
    ),
}


def _entry_grads(model: nn.Module, x: torch.Tensor, names: list[str], amp: bool) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=BF16, enabled=amp):
        out = model(x)
    out.float().square().mean().backward()
    grads = []
    for name in names:
        mod, _, pname = name.rpartition(".")
        grads.append(layer_of(model.get_submodule(mod), pname).shpeft_delta.grad)
    return torch.cat(grads)


def _dense_grads(model: nn.Module, x: torch.Tensor, mask: SparseMask, amp: bool) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=BF16, enabled=amp):
        out = model(x)
    out.float().square().mean().backward()
    params = dict(model.named_parameters())
    return torch.cat([params[n].grad.reshape(-1)[i] for n, i in mask.indices.items()])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _check_entry_gradients(case: str, device: str) -> None:
    torch.manual_seed(0)
    make, shape, names = CASES[case]
    model = make().to(device)
    dense = copy.deepcopy(model)
    mask = _mask(model, names, per_tensor=40)
    inject(model, mask, SHPEFTConfig(head=()))
    assert isinstance(model.get_submodule(names[0].rpartition(".")[0]), (SparseConv2d, SparseLinear))
    x = torch.randn(*shape).to(device)
    fp32 = _entry_grads(model, x, sorted(mask.indices), amp=False)
    bf16 = _entry_grads(model, x, sorted(mask.indices), amp=True)
    assert fp32.dtype == bf16.dtype == torch.float32
    torch.testing.assert_close(fp32, _dense_grads(dense, x, mask, amp=False), rtol=1e-4, atol=1e-6)
    err = _rel(bf16, fp32)
    dense_err = _rel(_dense_grads(dense, x, mask, amp=True), fp32)
    assert err < REL_TOL, (err, dense_err)
    assert err <= 1.5 * dense_err + 1e-3, (err, dense_err)


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_entry_gradients_agree_with_float32(case: str) -> None:
    _check_entry_gradients(case, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", list(CASES))
def test_bf16_entry_gradients_agree_with_float32_on_cuda(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # a float32 reference
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    _check_entry_gradients(case, "cuda")


@pytest.mark.parametrize("case", list(CASES))
def test_zero_delta_forward_under_autocast_equals_the_base_model(case: str) -> None:
    torch.manual_seed(1)
    make, shape, names = CASES[case]
    model = make().train()
    base = copy.deepcopy(model)
    inject(model, _mask(model, names, per_tensor=10), SHPEFTConfig(head=()))
    x = torch.randn(*shape)
    with torch.autocast("cpu", dtype=BF16):
        got, expected = model(x), base(x)
        with torch.no_grad():
            got_eval = model(x)
    assert got.dtype == expected.dtype == BF16
    assert torch.equal(got, expected) and torch.equal(got_eval, expected)


def test_saved_columns_are_kept_in_the_autocast_dtype() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 2))
    inject(net, _mask(net, ["0.weight", "2.weight"], 8), SHPEFTConfig(head=()))
    saved: list[torch.dtype] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            saved.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=BF16):
        net(torch.randn(16, 64)).float().sum().backward()
    assert saved and all(d == BF16 for d in saved), saved
