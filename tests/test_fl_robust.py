"""Contracts of the robust aggregation rules on fixed-length sparse site vectors."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from shpeft_monai.fl.robust import RULES, aggregate, trimmed_count


def _honest(rng: np.random.Generator, n: int = 5, length: int = 2916) -> list[np.ndarray]:
    """n honest sites: one shared update plus site-specific scatter (length = 2,146 values + 770 head)."""
    base = rng.normal(0.0, 1e-3, size=length)
    return [(base + rng.normal(0.0, 1e-4, size=length)).astype(np.float32) for _ in range(n)]


def test_mean_is_the_example_weighted_mean() -> None:
    v = [np.array([1.0, 0.0, 4.0]), np.array([3.0, 2.0, -2.0])]
    np.testing.assert_allclose(aggregate(v, [1, 3], "mean"), [2.5, 1.5, -0.5])


def test_median_equals_hand_computation() -> None:
    v = [np.array([1.0, 9.0, -1.0]), np.array([2.0, 8.0, 5.0]), np.array([100.0, 7.0, 0.0])]
    np.testing.assert_array_equal(aggregate(v, [1, 1, 1], "median"), [2.0, 8.0, 0.0])
    # even count: mean of the two middle values
    v4 = [*v, np.array([3.0, 6.0, 1.0])]
    np.testing.assert_array_equal(aggregate(v4, [1, 1, 1, 1], "median"), [2.5, 7.5, 0.5])


def test_median_ignores_the_example_counts() -> None:
    v = [np.array([0.0]), np.array([1.0]), np.array([50.0])]
    assert aggregate(v, [1, 1, 1e9], "median")[0] == 1.0


def test_trimmed_mean_equals_hand_computation() -> None:
    # 5 sites, 0.2 -> drop 1 lowest and 1 highest per coordinate, average the middle 3
    cols = np.array([[5.0, -1.0], [1.0, 0.0], [3.0, 10.0], [2.0, 2.0], [100.0, 4.0]])
    out = aggregate(list(cols), [1] * 5, "trimmed_mean", trim_fraction=0.2)
    np.testing.assert_allclose(out, [(2 + 3 + 5) / 3, (0 + 2 + 4) / 3])


def test_trimmed_count_floors() -> None:
    assert trimmed_count(5, 0.2) == 1
    assert trimmed_count(3, 0.2) == 0
    assert trimmed_count(3, 1 / 3 + 1e-9) == 1
    assert trimmed_count(10, 0.49) == 4


def test_trimmed_mean_that_trims_nothing_warns(caplog: pytest.LogCaptureFixture) -> None:
    v = [np.array([0.0]), np.array([1.0]), np.array([5.0])]
    with caplog.at_level(logging.WARNING, logger="shpeft_monai.fl.robust"):
        out = aggregate(v, [1, 1, 1], "trimmed_mean", trim_fraction=0.2)
    assert out[0] == pytest.approx(2.0)
    assert "trims no site" in caplog.text


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_robust_rule_resists_a_site_sending_1e3_times_larger_values(rule: str) -> None:
    """The issue's target: the large-value site moves the aggregate by less than the honest spread."""
    rng = np.random.default_rng(0)
    honest = _honest(rng)
    weights = [96.0] * 6
    attacker = honest[0] * 1e3  # large but finite: passes the finite-value validation
    clean = aggregate(honest, weights[:5], rule, trim_fraction=0.2)
    attacked = aggregate([*honest, attacker], weights, rule, trim_fraction=0.2)
    spread = np.linalg.norm(np.std(np.stack(honest), axis=0))
    shift = np.linalg.norm(attacked - clean)
    assert shift < spread, (rule, shift, spread)
    # ... while the weighted mean is dragged far away by the same site
    mean_shift = np.linalg.norm(
        aggregate([*honest, attacker], weights, "mean") - aggregate(honest, weights[:5])
    )
    assert mean_shift > 100 * spread


def test_median_of_three_sites_stays_inside_the_honest_range() -> None:
    """The simulation's shape (3 sites, one sending 1e3-times-larger values): per coordinate the median
    is one of the two honest values, so the attacker cannot push it outside the honest range.
    (Its shift is then about one honest spread, not less: the strict target needs 5 or more sites.)"""
    rng = np.random.default_rng(1)
    honest = _honest(rng, n=3)
    attacked = aggregate([honest[0], honest[1], honest[2] * 1e3], [96, 96, 96], "median")
    lo, hi = np.minimum(honest[0], honest[1]), np.maximum(honest[0], honest[1])
    assert np.all((attacked >= lo) & (attacked <= hi))
    assert np.abs(aggregate([honest[0], honest[1], honest[2] * 1e3], [96] * 3, "mean")).max() > 0.1


@pytest.mark.parametrize("rule", RULES)
def test_output_dtype_follows_inputs(rule: str) -> None:
    v = [np.ones(4, dtype=np.float32), np.zeros(4, dtype=np.float32), np.ones(4, dtype=np.float32)]
    assert aggregate(v, [1, 1, 1], rule).dtype == np.float32
    assert aggregate([np.arange(3), np.arange(3)], [1, 1], rule).dtype == np.float64


def test_matches_flowers_median_and_trimmed_mean_helpers() -> None:
    agg = pytest.importorskip("flwr.server.strategy.aggregate")
    rng = np.random.default_rng(2)
    v = [rng.normal(size=50) for _ in range(7)]
    results = [([x], 10 + i) for i, x in enumerate(v)]
    np.testing.assert_allclose(aggregate(v, [1] * 7, "median"), agg.aggregate_median(results)[0])
    np.testing.assert_allclose(
        aggregate(v, [1] * 7, "trimmed_mean", trim_fraction=0.3), agg.aggregate_trimmed_avg(results, 0.3)[0]
    )


@pytest.mark.parametrize(
    ("vectors", "weights", "kwargs", "match"),
    [
        ([], [], {}, "vectors is empty"),
        ([np.ones(3), np.ones(4)], [1, 1], {}, "unequal lengths"),
        ([np.ones(3), np.array([1.0, np.nan, 0.0])], [1, 1], {}, r"vectors \[1\] contain NaN"),
        ([np.ones(3), np.array([1.0, np.inf, 0.0])], [1, 1], {}, "infinite"),
        ([np.ones((2, 2))], [1], {}, "flatten"),
        ([np.ones(3)], [1, 2], {}, "one number per site"),
        ([np.ones(3)], [0], {}, "positive and finite"),
        ([np.ones(3)], [np.nan], {}, "positive and finite"),
        ([np.ones(3)], [1], {"rule": "krum"}, "rule must be one of"),
        ([np.ones(3)], [1], {"rule": "trimmed_mean", "trim_fraction": 0.5}, r"\[0, 0.5\)"),
        ([np.ones(3)], [1], {"trim_fraction": -0.1}, r"\[0, 0.5\)"),
    ],
)
def test_bad_input_is_refused_with_a_reason(vectors, weights, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        aggregate(vectors, weights, **kwargs)
