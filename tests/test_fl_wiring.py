"""The federated glue's wiring of robust aggregation and site-level differential privacy (issue 12):
the strategy combines only validated replies with the configured rule; a site clips and noises its
update before it leaves; the run config turns a target epsilon into the accountant's noise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shpeft_monai.fl import codec, privacy
from shpeft_monai.fl.task import Settings, private_update
from tests.test_federated import HEAD, head_arrays, reply, strategy_with, task_identity, tiny_mask  # noqa: F401


def _replies(mask, offsets, ns, server_round=1, scale=None):
    rng = np.random.default_rng(0)
    base = rng.normal(size=mask.k).astype(np.float32)
    out = []
    for i, (off, n) in enumerate(zip(offsets, ns)):
        v = base + off + 0.01 * rng.normal(size=mask.k).astype(np.float32)
        if scale is not None and i == scale[0]:
            v = v * scale[1]
        rd = codec.encode_update(v, head_arrays(off), mask.fingerprint, num_examples=n)
        out.append(reply(i + 1, rd, server_round=server_round))
    return out, base


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_robust_rule_resists_a_site_with_large_finite_values(rule):
    """Five honest sites and one sending 1e3-times-larger (finite, valid) values: validation accepts
    it; the mean follows it, the robust rules stay within the honest sites' spread."""
    mask = tiny_mask()
    offsets, ns = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], [10, 10, 10, 10, 10, 10]
    replies, _ = _replies(mask, offsets, ns, scale=(5, 1e3))
    honest = [
        codec.decode_update(r.content, mask_fingerprint=mask.fingerprint, k=mask.k, head_shapes=HEAD)[0]
        for r in replies[:5]
    ]
    lo, hi = np.min(honest, axis=0), np.max(honest, axis=0)

    robust = strategy_with(mask, aggregation=rule, trim_fraction=0.2)
    arrays, metrics = robust.aggregate_train(1, replies)
    values, _ = codec.split_arrays(arrays)
    assert metrics["sites-accepted"] == 6 and not robust.rejected  # nothing for validation to catch
    assert np.all(values >= lo - 1e-6) and np.all(values <= hi + 1e-6)

    mean, _ = codec.split_arrays(strategy_with(mask).aggregate_train(1, replies)[0])
    assert np.abs(mean - np.mean(honest, axis=0)).max() > 10 * (hi - lo).max()  # the mean is dragged


def test_robust_rule_runs_after_validation():
    """A NaN reply is dropped with its reason before the median sees anything."""
    mask = tiny_mask()
    replies, _ = _replies(mask, [0.0, 1.0, 2.0], [10, 10, 10])
    bad = codec.encode_update(
        np.full(mask.k, np.nan, np.float32), head_arrays(0), mask.fingerprint, num_examples=5
    )
    s = strategy_with(mask, aggregation="median")
    arrays, metrics = s.aggregate_train(1, [*replies, reply(9, bad, server_round=1)])
    assert metrics["sites-accepted"] == 3 and [r["node"] for r in s.rejected] == [9]
    assert "NaN" in s.rejected[0]["reason"]
    _, head = codec.split_arrays(arrays)
    np.testing.assert_allclose(head["2.bias"], np.full(2, 1.0))  # median of 0, 1, 2


def test_unknown_rule_is_refused_at_construction():
    with pytest.raises(ValueError, match="aggregation='mode'"):
        strategy_with(tiny_mask(), aggregation="mode")


def test_site_update_is_clipped_before_it_leaves():
    rng = np.random.default_rng(0)
    start_v, start_h = np.zeros(50, np.float32), head_arrays(0.0)
    new_v, new_h = start_v + 3.0, head_arrays(2.0)
    dp = privacy.PrivacyConfig(clip=0.5, noise_multiplier=0.0)
    v, h, stats = private_update(new_v, new_h, start_v, start_h, dp, rng)
    change = codec.flatten_update(v, h) - codec.flatten_update(start_v, start_h)
    assert stats["clipped"] and math.isclose(float(np.linalg.norm(change)), 0.5, rel_tol=1e-5)
    assert v.dtype == np.float32 and {n: t.shape for n, t in h.items()} == HEAD
    # direction kept: the clipped change is a positive multiple of the true change
    true = codec.flatten_update(new_v, new_h) - codec.flatten_update(start_v, start_h)
    np.testing.assert_allclose(change / np.linalg.norm(change), true / np.linalg.norm(true), atol=1e-6)


def test_noise_scale_matches_the_accountants_settings():
    s = Settings.from_config({"dp-epsilon": 8.0, "dp-clip": 0.1, "num-server-rounds": 5})
    dp = s.privacy()
    assert dp.noise_multiplier == pytest.approx(privacy.noise_multiplier_for(8.0, 5, 1e-5))
    assert privacy.epsilon(dp.noise_multiplier, 5, 1e-5) <= 8.0 + 1e-6
    k = 200_000
    start = np.zeros(k, np.float32)
    v, _, _ = private_update(start, {}, start, {}, dp, np.random.default_rng(1))  # zero change: noise only
    assert np.std(v) == pytest.approx(dp.noise_multiplier * 0.1, rel=0.01)


def test_privacy_settings_need_a_clip_and_default_to_off():
    assert Settings().privacy() is None
    with pytest.raises(ValueError, match="dp-clip > 0"):
        Settings.from_config({"dp-epsilon": 4.0}).privacy()
    explicit = Settings.from_config({"dp-noise-multiplier": 1.5, "dp-clip": 1.0, "dp-epsilon": 4.0}).privacy()
    assert explicit.noise_multiplier == 1.5  # the explicit multiplier wins
