"""Each sparse layer owns its lifecycle: attach adds exactly its listed state, detach restores the base."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from shpeft_monai import SHPEFTConfig, SparseMask, eject, inject, merge
from shpeft_monai.layers import (
    DELTA_NAME,
    SparseConv2d,
    SparseLinear,
    SparseOverwrite,
    attach,
    detach,
    layer_of,
)
from shpeft_monai.sparse import DeltaMismatchError, fingerprint_tensors

# (module factory, tensor name, expected site class)
SITES = {
    "linear": (lambda: nn.Linear(12, 7), "weight", SparseLinear),
    "conv2d": (lambda: nn.Conv2d(3, 5, 3, padding=1, groups=1), "weight", SparseConv2d),
    "depthwise": (lambda: nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4), "weight", SparseConv2d),
    "conv3d_overwrite": (lambda: nn.Conv3d(2, 3, 3), "weight", SparseOverwrite),
    "bias_overwrite": (lambda: nn.Linear(6, 5), "bias", SparseOverwrite),
    "norm_overwrite": (lambda: nn.LayerNorm(8), "weight", SparseOverwrite),
    "same_pad_overwrite": (lambda: nn.Conv2d(2, 3, 3, padding="same"), "weight", SparseOverwrite),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def _snapshot(m: nn.Module) -> dict[str, Any]:
    """Everything that makes a module what it is, weights compared bit for bit."""
    return {
        "class": type(m),
        "attributes": sorted(vars(m)),
        "parameters": [(n, p.dtype, p.requires_grad) for n, p in m._parameters.items()],
        "buffers": list(m._buffers),
        "non_persistent": sorted(m._non_persistent_buffers_set),
        "modules": list(m._modules),
        "hooks": {k: len(v) for k, v in vars(m).items() if "hook" in k and hasattr(v, "__len__")},
        "state_keys": [(k, v.dtype) for k, v in m.state_dict().items()],
        "bits": fingerprint_tensors(m.state_dict().items()),
    }


def _site(case: str, dtype: torch.dtype) -> tuple[nn.Module, str, type, torch.Tensor]:
    torch.manual_seed(0)
    make, pname, cls = SITES[case]
    module = make().to(dtype)
    numel = getattr(module, pname).numel()
    index = torch.sort(torch.randperm(numel)[: max(1, numel // 4)]).values
    return module, pname, cls, index


def _train_a_little(site: Any) -> None:
    with torch.no_grad():
        site.shpeft_delta.add_(torch.linspace(0.5, 1.5, site.shpeft_delta.numel()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SITES))
def test_detach_without_merge_restores_the_base_module_bit_identical(case: str, dtype: torch.dtype) -> None:
    module, pname, cls, index = _site(case, dtype)
    before = _snapshot(module)
    tensor_id = id(getattr(module, pname) if cls is not SparseOverwrite else module._parameters[pname])
    site = attach(module, pname, index)
    assert isinstance(site, cls) and layer_of(module, pname) is site
    frozen = module.parametrizations[pname].original if cls is SparseOverwrite else module.weight
    assert not frozen.requires_grad  # only the delta trains
    _train_a_little(site)
    if cls is not SparseOverwrite:
        module.train()
        x = torch.randn(2, *((12,) if case == "linear" else (module.in_channels, 6, 6)), dtype=dtype)
        module(x)  # writes base + delta into the weight in place
    detach(module, pname, merge=False)
    assert _snapshot(module) == before
    assert id(module._parameters[pname]) == tensor_id  # optimizers built before attach stay valid
    with pytest.raises(LookupError, match="no SH-PEFT site"):
        layer_of(module, pname)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SITES))
def test_detach_with_merge_changes_only_the_selected_entries(case: str, dtype: torch.dtype) -> None:
    module, pname, _, index = _site(case, dtype)
    base = getattr(module, pname).detach().clone()
    expected_meta = {k: v for k, v in _snapshot(module).items() if k != "bits"}
    site = attach(module, pname, index)
    _train_a_little(site)
    merged = site.merged_values(base.dtype)
    detach(module, pname, merge=True)
    assert {k: v for k, v in _snapshot(module).items() if k != "bits"} == expected_meta
    after = getattr(module, pname).detach().reshape(-1)
    assert torch.equal(after[index], merged)
    keep = torch.ones_like(after, dtype=torch.bool)
    keep[index] = False
    assert torch.equal(after[keep], base.reshape(-1)[keep])


@pytest.mark.parametrize("case", list(SITES))
def test_attach_adds_exactly_the_state_the_layer_lists(case: str) -> None:
    module, pname, cls, index = _site(case, torch.float32)
    names = set(vars(module)) | set(module._parameters) | set(module._buffers)
    site = attach(module, pname, index)
    if cls is SparseOverwrite:  # the fallback adds one thing to the module: the parametrisation
        assert set(vars(module)) | set(module._parameters) | set(module._buffers) | {pname} >= names
        assert set(module._modules) == {"parametrizations"}
        holder: Any = site
        added = set(vars(holder)) | set(holder._parameters) | set(holder._buffers)
        assert set(cls.shpeft_state) <= added
    else:
        added = set(vars(module)) | set(module._parameters) | set(module._buffers)
        assert added - names == set(cls.shpeft_state)
    assert DELTA_NAME in cls.shpeft_state and site.shpeft_delta.requires_grad
    assert site.shpeft_delta.dtype == torch.float32 and site.delta_values().shape == index.shape


def test_bf16_weights_get_a_float32_delta_and_an_exact_base() -> None:
    module, pname, _, index = _site("linear", torch.bfloat16)
    base = module.weight.detach().clone()
    site = attach(module, pname, index)
    assert site.shpeft_delta.dtype == torch.float32 and site.shpeft_base.dtype == torch.bfloat16
    assert torch.equal(site.shpeft_base, base.reshape(-1)[index])


def test_load_delta_and_delta_values_round_trip() -> None:
    module, pname, _, index = _site("conv2d", torch.float32)
    site = attach(module, pname, index)
    values = torch.randn(index.numel())
    site.load_delta(values)
    assert torch.equal(site.delta_values(), values)
    with pytest.raises(DeltaMismatchError, match="another mask"):
        site.load_delta(torch.zeros(index.numel() + 1))
    with pytest.raises(TypeError, match="no such fast path"):
        SparseLinear.attach(nn.Conv2d(2, 2, 1), "weight", torch.tensor([0]))


def _mixed_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(4, 4, 3, padding="same"),
        nn.Flatten(),
        nn.LayerNorm(4 * 5 * 5),
        nn.Linear(4 * 5 * 5, 6),
        nn.Linear(6, 2),
    )


@pytest.mark.parametrize("finish", ["eject", "merge"])
def test_model_level_inject_then_eject_or_merge_leaves_plain_modules(finish: str) -> None:
    net = _mixed_model()
    reference = copy.deepcopy(net)
    names = ["0.weight", "1.weight", "3.weight", "4.weight", "4.bias"]
    params = dict(net.named_parameters())
    gen = torch.Generator().manual_seed(0)
    mask = SparseMask(
        {n: torch.sort(torch.randperm(params[n].numel(), generator=gen)[:3]).values for n in names},
        {n: tuple(params[n].shape) for n in names},
    )
    inject(net, mask, SHPEFTConfig(head=("5",)))
    net(torch.randn(2, 3, 5, 5)).sum().backward()
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n.endswith(DELTA_NAME):
                p.add_(0.25)
    (eject if finish == "eject" else merge)(net)
    assert not hasattr(net, "_shpeft_mask") and not hasattr(net, "_shpeft_config")
    for (name, got), (_, ref) in zip(net.named_modules(), reference.named_modules()):
        snap, ref_snap = _snapshot(got), _snapshot(ref)
        ref_snap["parameters"] = [
            (n, d, name == "5") for n, d, _ in ref_snap["parameters"]
        ]  # frozen, head not
        if finish == "merge" and (not name or any(n.startswith(f"{name}.") for n in names)):
            snap.pop("bits"), ref_snap.pop("bits")
        assert snap == ref_snap, name


def test_sites_are_found_through_a_data_parallel_wrapper() -> None:
    from shpeft_monai import extract_delta, load_delta_values

    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    mask = SparseMask({"0.weight": torch.tensor([1, 6])}, {"0.weight": (4, 4)})
    inject(net, mask, SHPEFTConfig(head=("1",)))
    wrapped = nn.DataParallel(net)  # on CPU: a plain wrapper whose names gain "module."
    load_delta_values(wrapped, {"0.weight": torch.tensor([0.5, -0.5])})
    assert torch.equal(extract_delta(wrapped).values["0.weight"], torch.tensor([0.5, -0.5]))
    merge(wrapped)
    assert type(net[0]) is nn.Linear
