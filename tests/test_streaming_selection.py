"""Streaming selection (the default) returns the reference path's mask in every mode and threshold."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from shpeft_monai import SHPEFTConfig, select_mask
from shpeft_monai._ranks import DenseRanks
from shpeft_monai.calibration import calibrate
from shpeft_monai.scoring import normalize_scores, random_scores
from shpeft_monai.selection import select_indices
from shpeft_monai.streaming import LazyScores, lazy_random_scores, stream_select


class _Net(nn.Sequential):
    """A tiny conv + MLP with timm's ``forward_features`` / ``forward_head`` (for ``supcon``)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self[:7](x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self[7](x)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _Net(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 32),
        nn.LayerNorm(32),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 2),
    )


def _loader(n: int = 3, seed: int = 0, batch: int = 6):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 3, 6, 6, generator=gen), torch.randint(0, 2, (batch,), generator=gen))
        for _ in range(n)
    ]


MODES = [
    dict(hybrid="union", rho=0.5),
    dict(hybrid="union", rho=0.25, task_estimator="l2"),
    dict(hybrid="weighted", lam=0.5),
    dict(hybrid="weighted", lam=0.8, taylor=True),
    dict(hybrid="weighted", lam=0.5, normalize="max"),
    dict(hybrid="task_specific"),
    dict(hybrid="task_specific", calibration_loss="supcon"),
    dict(hybrid="task_agnostic", agnostic_estimator="l2"),
    dict(hybrid="random"),
    dict(hybrid="weighted", lam=0.5, task_signal="activation"),
    dict(hybrid="union", rho=0.5, task_signal="activation", task_estimator="l2"),
]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize(
    ("mode", "threshold", "budget"),
    list(itertools.product(range(len(MODES)), ["global", "per_tensor", "per_row"], [5, 0.02, 400])),
)
def test_streaming_mask_equals_reference(mode: int, threshold: str, budget) -> None:
    cfg = SHPEFTConfig(
        budget=budget,
        threshold=threshold,
        head=("7",),
        calibration_batches=2,
        head_warmup_steps=0,
        eligible=("linear", "conv", "bias", "norm"),
        **MODES[mode],
    )
    ref = select_mask(_net(), cfg, _loader(), progress=False, streaming=False)
    got = select_mask(_net(), cfg, _loader(), progress=False)
    assert _same(ref.indices, got.indices)
    assert ref.fingerprint == got.fingerprint


def _scores(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Scores with the ties rank normalisation must get right: zeros, repeats, cross-tensor copies."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"a": (16, 12), "b": (8, 3, 3, 3), "c": (40, 16), "d": (40,)}
    ts = {n: torch.rand(s, generator=gen) ** 3 for n, s in shapes.items()}
    ts["a"][:4] = 0.0
    ts["c"].view(-1)[::7] = ts["c"].view(-1)[3]
    ta = {n: (torch.randn(s, generator=gen) * 0.1).abs() for n, s in shapes.items()}
    ta["d"][:] = ta["a"].view(-1)[:40]
    return ts, ta


@pytest.mark.parametrize("seed", [0, 1])
def test_stream_select_equals_reference_on_tied_scores(seed: int) -> None:
    ts, ta = _scores(seed)
    lazy_ta = LazyScores({n: t.shape for n, t in ta.items()}, lambda n: ta[n].clone())
    modes = [dict(hybrid="weighted", lam=lam) for lam in (0.1, 0.5, 0.9)] + [dict(hybrid="union", rho=0.3)]
    for m, thr, k in itertools.product(modes, ["global", "per_tensor", "per_row"], [1, 9, 60, 500, 1088]):
        cfg = SHPEFTConfig(budget=k, threshold=thr, **m)
        assert _same(select_indices(cfg, k, ts, ta), stream_select(cfg, k, ts, lazy_ta)), (m, thr, k)


def test_stream_select_scans_on_one_thread_and_restores_the_count() -> None:
    ts, ta = _scores(0)
    seen = []

    def score(n: str) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return ta[n].clone()

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = SHPEFTConfig(budget=60, hybrid="weighted", lam=0.5)
        picked = stream_select(cfg, 60, ts, LazyScores({n: t.shape for n, t in ta.items()}, score))
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
        assert _same(select_indices(cfg, 60, ts, ta), picked)
    finally:
        torch.set_num_threads(before)


def test_dense_ranks_equal_global_rank_normalisation() -> None:
    ts, _ = _scores(0)
    ref = normalize_scores(ts, "rank")
    ranks = DenseRanks(ts, keep=True, chunk=50)  # tiny chunks: many value-range passes
    for n, t in ts.items():
        assert torch.equal(ranks.normalized(t), ref[n])


def test_lazy_random_scores_equal_reference_draws() -> None:
    shapes = {"a": torch.Size((3, 4)), "b": torch.Size((5,))}
    ref = random_scores({n: torch.empty(s) for n, s in shapes.items()}, seed=3)
    lazy = lazy_random_scores(shapes, seed=3)
    for n in ("b", "a", "b"):  # any access order
        assert torch.equal(lazy[n], ref[n])


def test_streaming_calibration_is_bit_identical_and_micro_batches_close() -> None:
    cfg = SHPEFTConfig(hybrid="task_specific", head=("7",), calibration_batches=3, head_warmup_steps=0)
    net = _net()
    params = {n: p for n, p in net.named_parameters() if not n.startswith("7")}
    ref = calibrate(net, _loader(), params, cfg, progress=False, streaming=False)
    got = calibrate(net, _loader(), params, cfg, progress=False)
    micro = calibrate(net, _loader(), params, cfg, progress=False, micro_batch=2)
    for n in ref:
        assert torch.equal(ref[n], got[n])
        torch.testing.assert_close(micro[n], ref[n], rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in net.parameters())


def test_micro_batch_refused_where_it_would_change_the_estimator() -> None:
    net = _net()
    params = {"0.weight": net[0].weight}
    cfg = SHPEFTConfig(hybrid="task_specific", head=("7",), calibration_loss="supcon")
    with pytest.raises(ValueError, match="micro_batch"):
        calibrate(net, _loader(), params, cfg, progress=False, micro_batch=2)


def _tiny_vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        depth=2,
        num_classes=2,
        embed_dim=48,
        num_heads=2,
    )


def test_checkpointed_streaming_calibration_is_bit_identical_on_a_timm_vit() -> None:
    cfg = SHPEFTConfig(hybrid="task_specific", calibration_batches=2, head_warmup_steps=0)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 32, 32, generator=gen), torch.tensor([0, 1, 0, 1])) for _ in range(2)]
    net = _tiny_vit()
    params = {
        n: p for n, p in net.named_parameters() if n.endswith("weight") and p.dim() > 1 and "head" not in n
    }
    ref = calibrate(net, data, params, cfg, progress=False, streaming=False)
    seen = []
    net.blocks[0].register_forward_pre_hook(lambda *_: seen.append(1))
    got = calibrate(net, data, params, cfg, progress=False)
    assert len(seen) == 4  # each block forward ran twice per batch: once more in backward (recomputed)
    assert net.grad_checkpointing is False  # restored
    for n in ref:
        assert torch.equal(ref[n], got[n]), n
    for mode in (dict(), dict(hybrid="union"), dict(threshold="per_row")):
        c = SHPEFTConfig(budget=60, calibration_batches=2, head_warmup_steps=0, **mode)
        a = select_mask(_tiny_vit(), c, data, progress=False, streaming=False)
        b = select_mask(_tiny_vit(), c, data, progress=False)
        assert _same(a.indices, b.indices), mode


def test_dense_rank_queries_equal_kept_ranks() -> None:
    """Ranks of chosen entries answered in the counting pass equal the kept-values look-up."""
    ts, _ = _scores(1)
    flat = torch.cat([t.reshape(-1) for t in ts.values()])
    queries = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:200]]
    kept = DenseRanks(ts, keep=True, chunk=50)
    counted = DenseRanks(ts, keep=False, chunk=50, queries=queries)
    assert counted.distinct == kept.distinct
    assert torch.equal(counted.query_ranks, kept.rank(queries))
