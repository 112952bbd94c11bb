"""Contracts of site-level DP: clipping, noise scale, and the accountant."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from shpeft_monai.fl.privacy import (
    METHODS,
    PrivacyConfig,
    epsilon,
    gdp_delta,
    noise_multiplier_for,
    privatize,
)

K = 2146 + 770  # the simulation's payload: k sparse values then the 2-class head


def test_clipping_bounds_the_change_norm() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=K).astype(np.float32)
    cfg = PrivacyConfig(clip=0.05, noise_multiplier=0.0)
    for scale in (1e-4, 1e-2, 1.0, 1e3):
        upd = ref + rng.normal(0, scale, size=K).astype(np.float32)
        out, stats = privatize(upd, ref, cfg, rng)
        change = out.astype(np.float64) - ref
        assert np.linalg.norm(change) <= cfg.clip * (1 + 1e-5)
        assert stats["norm"] == pytest.approx(np.linalg.norm(upd.astype(np.float64) - ref), rel=1e-6)
        assert stats["clipped"] == (stats["norm"] > cfg.clip)
        assert out.dtype == np.float32


def test_small_change_passes_unclipped_and_keeps_its_direction() -> None:
    ref = np.zeros(4)
    upd = np.array([0.3, 0.0, -0.4, 0.0])  # norm 0.5
    out, stats = privatize(upd, ref, PrivacyConfig(clip=1.0, noise_multiplier=0.0), np.random.default_rng(0))
    np.testing.assert_allclose(out, upd)
    assert not stats["clipped"]
    out, stats = privatize(upd, ref, PrivacyConfig(clip=0.25, noise_multiplier=0.0), np.random.default_rng(0))
    np.testing.assert_allclose(out, upd / 2)
    assert stats["clipped"]


def test_noise_std_matches_the_configured_scale() -> None:
    cfg = PrivacyConfig(clip=0.1, noise_multiplier=1.3)
    ref = np.full(200_000, 0.5)
    out, stats = privatize(ref.copy(), ref, cfg, np.random.default_rng(42))  # zero change: pure noise
    noise = out - ref
    assert stats["noise_std"] == pytest.approx(0.13)
    assert np.std(noise) == pytest.approx(cfg.noise_multiplier * cfg.clip, rel=0.01)
    assert abs(np.mean(noise)) < 5 * 0.13 / math.sqrt(noise.size)


def test_noise_is_added_after_clipping() -> None:
    """Clipped change plus noise: the noise does not depend on how large the raw change was."""
    cfg = PrivacyConfig(clip=1.0, noise_multiplier=0.5)
    ref = np.zeros(100_000)
    big = np.full(100_000, 10.0)
    out, _ = privatize(big, ref, cfg, np.random.default_rng(3))
    clipped = big * (cfg.clip / np.linalg.norm(big))
    assert np.std(out - clipped) == pytest.approx(0.5, rel=0.02)


def test_same_seed_same_noise() -> None:
    cfg = PrivacyConfig(clip=1.0, noise_multiplier=1.0)
    a, _ = privatize(np.ones(10), np.zeros(10), cfg, np.random.default_rng(7))
    b, _ = privatize(np.ones(10), np.zeros(10), cfg, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method", METHODS)
def test_epsilon_is_monotone(method: str) -> None:
    sigmas = [0.5, 0.8, 1.0, 2.0, 4.0, 10.0]
    eps = [epsilon(s, 3, 1e-5, method=method) for s in sigmas]
    assert all(a > b for a, b in itertools.pairwise(eps))  # more noise, less epsilon
    by_rounds = [epsilon(1.0, t, 1e-5, method=method) for t in (1, 2, 5, 20)]
    assert all(a < b for a, b in itertools.pairwise(by_rounds))  # more rounds, more epsilon
    by_delta = [epsilon(1.0, 3, d, method=method) for d in (1e-7, 1e-5, 1e-3)]
    assert all(a > b for a, b in itertools.pairwise(by_delta))


def test_zcdp_matches_hand_computation() -> None:
    # sigma 2, 8 rounds: rho = 8 / (2 * 4) = 1; eps = 1 + 2 sqrt(ln 1e5) = 1 + 2 * 3.39307 = 7.78615
    assert epsilon(2.0, 8, 1e-5, method="zcdp") == pytest.approx(1 + 2 * math.sqrt(math.log(1e5)), rel=1e-12)
    assert epsilon(2.0, 8, 1e-5, method="zcdp") == pytest.approx(7.78615, abs=1e-5)


def test_gdp_is_exact_and_composes_as_one_gaussian() -> None:
    # 4 rounds at sigma 2 are one Gaussian at sigma 1 (mu = 1)
    assert epsilon(2.0, 4, 1e-5) == pytest.approx(epsilon(1.0, 1, 1e-5), rel=1e-9)
    eps = epsilon(1.0, 1, 1e-5)
    assert gdp_delta(1.0, eps) == pytest.approx(1e-5, rel=1e-6)  # it solves the exact delta(eps) curve
    # hand value: delta(eps) = Phi(-eps + 1/2) - e^eps Phi(-eps - 1/2) at eps = 4.377 (Balle & Wang 2018)
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    assert phi(-eps + 0.5) - math.exp(eps) * phi(-eps - 0.5) == pytest.approx(1e-5, rel=1e-6)
    assert eps == pytest.approx(4.3772, abs=1e-3)


@pytest.mark.parametrize("sigma", [0.4, 1.0, 3.0, 20.0])
def test_exact_accountant_is_tightest(sigma: float) -> None:
    gdp, rdp, zcdp = (epsilon(sigma, 3, 1e-5, method=m) for m in ("gdp", "rdp", "zcdp"))
    assert gdp < rdp < zcdp


@pytest.mark.parametrize("method", METHODS)
def test_tiny_noise_gives_a_huge_finite_epsilon(method: str) -> None:
    """A clip-only run with negligible noise (what the sweep's probe uses) must not overflow."""
    eps = [epsilon(s, 3, 1e-5, method=method) for s in (1e-15, 1e-9, 1e-5, 1e-4, 1e-3)]
    assert all(math.isfinite(e) for e in eps)
    assert all(a > b for a, b in itertools.pairwise(eps))
    assert eps[0] > 1e29


def test_no_noise_means_no_guarantee() -> None:
    assert epsilon(0.0, 3, 1e-5) == math.inf
    assert noise_multiplier_for(math.inf, 3, 1e-5) == 0.0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("target", [8.0, 2.0, 0.5])
def test_noise_multiplier_for_inverts_epsilon(method: str, target: float) -> None:
    z = noise_multiplier_for(target, 3, 1e-5, method=method)
    assert epsilon(z, 3, 1e-5, method=method) <= target
    assert epsilon(z * (1 - 1e-4), 3, 1e-5, method=method) > target  # and it is the smallest such z


def test_config_reports_epsilon_and_noise() -> None:
    cfg = PrivacyConfig(clip=0.2, noise_multiplier=noise_multiplier_for(8.0, 3, 1e-5))
    assert cfg.epsilon(3) == pytest.approx(8.0, rel=1e-5)
    assert cfg.noise_std == pytest.approx(0.2 * cfg.noise_multiplier)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip": 0.0, "noise_multiplier": 1.0}, "clip must be a positive"),
        ({"clip": math.inf, "noise_multiplier": 1.0}, "clip must be a positive"),
        ({"clip": 1.0, "noise_multiplier": -1.0}, "noise_multiplier must be >= 0"),
        ({"clip": 1.0, "noise_multiplier": math.nan}, "noise_multiplier must be a finite"),
        ({"clip": 1.0, "noise_multiplier": 1.0, "delta": 0.0}, r"delta must be in \(0, 1\)"),
        ({"clip": 1.0, "noise_multiplier": 1.0, "delta": 1.0}, r"delta must be in \(0, 1\)"),
    ],
)
def test_bad_config_is_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PrivacyConfig(**kwargs)


def test_bad_privatize_input_is_refused() -> None:
    cfg, rng = PrivacyConfig(clip=1.0, noise_multiplier=1.0), np.random.default_rng(0)
    with pytest.raises(ValueError, match="same agreed coordinates"):
        privatize(np.ones(3), np.ones(4), cfg, rng)
    with pytest.raises(ValueError, match="update contains NaN"):
        privatize(np.array([1.0, np.nan]), np.ones(2), cfg, rng)
    with pytest.raises(ValueError, match="reference contains NaN"):
        privatize(np.ones(2), np.array([np.inf, 0.0]), cfg, rng)
    with pytest.raises(ValueError, match="flatten"):
        privatize(np.ones((2, 2)), np.ones((2, 2)), cfg, rng)
    with pytest.raises(ValueError, match="numpy.random.Generator"):
        privatize(np.ones(2), np.ones(2), cfg, 0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((1.0, 0, 1e-5), "rounds must be an integer >= 1"),
        ((1.0, 2.5, 1e-5), "rounds must be an integer >= 1"),
        ((-1.0, 3, 1e-5), "noise_multiplier must be a finite number >= 0"),
        ((1.0, 3, 2.0), r"delta must be in \(0, 1\)"),
    ],
)
def test_bad_accountant_input_is_refused(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        epsilon(*args)
    with pytest.raises(ValueError, match="method must be one of"):
        epsilon(1.0, 3, 1e-5, method="moments")
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        noise_multiplier_for(0.0, 3, 1e-5)


@pytest.mark.slow
def test_flower_secaggplus_sums_the_fixed_length_sparse_vector() -> None:
    """Flower's SecAgg+ (legacy workflow inside a Message-API ServerApp) returns the example-weighted
    mean of 3 sites' 2,916-value vectors to within its quantisation error (about 20 s)."""
    pytest.importorskip("flwr")
    from benchmarks.fed_privacy import secagg

    r = secagg(clipping_range=8.0, max_weight=100.0)
    # each site's weighted value is stochastically rounded (error < one step); the sum of 3 errors is
    # divided by the total weight ratio sum(examples) / max_weight
    bound = r["sites"] * r["quantization_step"] / (sum(r["examples"]) / r["max_weight"])
    assert r["max_abs_error"] <= bound
    assert r["max_abs_error"] < 1e-3 * r["value_scale_std"]
