"""Selection: exact budget in every mode, determinism, hybrid semantics, clear config errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from shpeft_monai import SHPEFTConfig, select_mask
from shpeft_monai.selection import topk_entries


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 2),
    )


def _loader(n: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 3, 6, 6, generator=gen), torch.randint(0, 2, (6,), generator=gen)) for _ in range(n)
    ]


MODES = [
    dict(hybrid="union", rho=0.5),
    dict(hybrid="union", rho=0.25),
    dict(hybrid="weighted", lam=0.5),
    dict(hybrid="weighted", lam=0.5, normalize="max"),
    dict(hybrid="task_specific"),
    dict(hybrid="task_agnostic"),
    dict(hybrid="random"),
]


@pytest.mark.parametrize(
    ("mode", "threshold", "budget"),
    list(itertools.product(range(len(MODES)), ["global", "per_tensor", "per_row"], [7, 0.01, 150])),
)
def test_exact_budget_every_mode(mode: int, threshold: str, budget) -> None:
    net = _net()
    cfg = SHPEFTConfig(budget=budget, threshold=threshold, head=("7",), calibration_batches=2, **MODES[mode])
    mask = select_mask(net, cfg, _loader(), progress=False)
    n_eligible = 8 * 3 * 9 + 288 * 32 + 32 * 32
    assert mask.k == cfg.budget_for(n_eligible)
    assert "7.weight" not in mask.indices  # the head is never selected
    for idx in mask.indices.values():
        assert torch.equal(idx, torch.unique(idx))


def test_same_seed_and_data_give_same_mask() -> None:
    cfg = SHPEFTConfig(budget=40, hybrid="union", head=("7",), calibration_batches=3, taylor=True)
    a = select_mask(_net(), cfg, _loader(), progress=False)
    b = select_mask(_net(), cfg, _loader(), progress=False)
    assert a.fingerprint == b.fingerprint
    c = select_mask(_net(), cfg, _loader(seed=1), progress=False)
    assert c.fingerprint != a.fingerprint  # other data gives another task-specific part


def test_union_takes_rho_share_by_task_specific_then_refills_by_magnitude() -> None:
    net = _net()
    base = dict(head=("7",), calibration_batches=2, head_warmup_steps=0)  # the same gradients in both calls
    ts_half = select_mask(
        net, SHPEFTConfig(hybrid="task_specific", budget=30, **base), _loader(), progress=False
    )
    union = select_mask(
        net, SHPEFTConfig(hybrid="union", rho=0.5, budget=60, **base), _loader(), progress=False
    )

    def entries(m):
        return {(n, int(i)) for n, idx in m.indices.items() for i in idx}

    assert entries(ts_half) <= entries(union)  # the top 30 by task-specific importance are in
    rest = entries(union) - entries(ts_half)
    params = {n: p.detach().reshape(-1).abs() for n, p in net.named_parameters()}
    eligible = [(n, i) for n in ("0.weight", "3.weight", "5.weight") for i in range(params[n].numel())]
    remaining = sorted(
        (e for e in eligible if e not in entries(ts_half)), key=lambda e: -float(params[e[0]][e[1]])
    )
    assert rest == set(remaining[:30])  # refilled by magnitude, duplicates excluded


def test_task_agnostic_picks_largest_magnitudes() -> None:
    net = _net()
    mask = select_mask(net, SHPEFTConfig(budget=25, hybrid="task_agnostic", head=("7",)))
    params = dict(net.named_parameters())
    chosen = torch.cat([params[n].detach().reshape(-1)[i].abs() for n, i in mask.indices.items()])
    everything = torch.cat(
        [params[n].detach().reshape(-1).abs() for n in ("0.weight", "3.weight", "5.weight")]
    )
    assert torch.equal(torch.sort(chosen).values, torch.sort(torch.topk(everything, 25).values).values)


def test_ties_break_deterministically_by_index() -> None:
    scores = {"a": torch.ones(10), "b": torch.ones(10)}
    picked = topk_entries(scores, 5)
    assert picked["a"].tolist() == [0, 1, 2, 3, 4] and picked["b"].numel() == 0


def test_per_row_gives_every_row_its_share() -> None:
    scores = {"w": torch.rand(10, 8, generator=torch.Generator().manual_seed(0))}
    picked = topk_entries(scores, 20, "per_row")["w"]
    rows = torch.bincount(picked // 8, minlength=10)
    assert torch.all(rows == 2)


def test_per_row_with_fewer_entries_than_rows_picks_best_rows() -> None:
    m = torch.zeros(6, 4)
    m[2, 1], m[5, 3] = 5.0, 9.0
    picked = topk_entries({"w": m}, 2, "per_row")["w"]
    assert picked.tolist() == [2 * 4 + 1, 5 * 4 + 3]


@pytest.mark.parametrize("bad", [0, -3, 1.5, float("nan"), "1e-4", True])
def test_budget_out_of_range_is_refused(bad) -> None:
    with pytest.raises(ValueError, match="budget"):
        SHPEFTConfig(budget=bad)


def test_budget_larger_than_eligible_is_refused() -> None:
    with pytest.raises(ValueError, match="only .* are eligible"):
        select_mask(_net(), SHPEFTConfig(budget=10**7, hybrid="task_agnostic", head=("7",)))


def test_no_eligible_tensor_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no parameter is eligible"):
        select_mask(_net(), SHPEFTConfig(hybrid="task_agnostic", include=(r"^does_not_exist",)))


def test_empty_calibration_loader_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="yielded no batches"):
        select_mask(_net(), SHPEFTConfig(budget=5, head=("7",)), [], progress=False)


def test_missing_calibration_loader_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="calibration loader"):
        select_mask(_net(), SHPEFTConfig(budget=5, head=("7",)))


def test_nan_in_data_or_weights_is_a_clear_error() -> None:
    batch = [(torch.full((2, 3, 6, 6), float("nan")), torch.tensor([0, 1]))]
    with pytest.raises(FloatingPointError, match="NaN"):
        select_mask(_net(), SHPEFTConfig(budget=5, head=("7",)), batch, progress=False)
    net = _net()
    with torch.no_grad():
        net[3].weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="3.weight"):
        select_mask(net, SHPEFTConfig(budget=5, hybrid="task_agnostic", head=("7",)))


def test_unknown_choice_names_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="hybrid='mixed' is not one of"):
        SHPEFTConfig(hybrid="mixed")


def test_config_json_round_trip() -> None:
    cfg = SHPEFTConfig(
        budget=0.001, hybrid="weighted", lam=0.3, eligible=["linear", "bias"], threshold="per_row"
    )
    assert SHPEFTConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown SHPEFTConfig keys"):
        SHPEFTConfig.from_dict({"budgett": 3})


def test_supcon_and_head_warmup_calibration_run_on_timm_vit() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, img_size=32, depth=2)
    data = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))] * 2
    for cfg in (
        SHPEFTConfig(budget=50, calibration_loss="supcon", calibration_batches=2, head_warmup_steps=0),
        SHPEFTConfig(budget=50, head_warmup_steps=3, calibration_batches=2),
    ):
        head_before = vit.head.weight.detach().clone()
        mask = select_mask(vit, cfg, data, progress=False)
        assert mask.k == 50
        assert all(not n.startswith("head") for n in mask.indices)
        assert torch.equal(vit.head.weight, head_before) == (cfg.head_warmup_steps == 0)
