"""Statistics of the benchmark tables (benchmarks/stats.py): grouped bootstrap and paired differences.

Each test checks one invariant against a hand computation on a tiny table.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.stats import (
    group_sums,
    grouped_bootstrap,
    mean_sd,
    paired_difference,
    resample_counts,
    resampled_accuracy,
)


def test_mean_and_sample_sd():
    assert mean_sd([0.5, 0.7, None, float("nan")]) == pytest.approx((0.6, np.std([0.5, 0.7], ddof=1)))
    assert mean_sd([0.8]) == (0.8, 0.0)


def test_group_sums_by_hand():
    # files 0,1 in group "a" (1 correct + 1 correct), file 2 in "b" (wrong), files 3,4 in "c" (1 + 0)
    sums, sizes = group_sums(np.array([[1, 1, 0, 1, 0]]), ["a", "a", "b", "c", "c"])
    assert sums.tolist() == [[2.0, 0.0, 1.0]] and sizes.tolist() == [2.0, 1.0, 2.0]


def test_resampled_accuracy_takes_all_files_of_each_drawn_group():
    sums, sizes = np.array([[2.0, 0.0, 1.0]]), np.array([2.0, 1.0, 2.0])
    counts = np.array([[2, 0, 1], [0, 3, 0], [1, 1, 1]], dtype=float)  # how often each group is drawn
    acc = resampled_accuracy(counts, sums, sizes)[:, 0]
    # (2*2 + 1) / (2*2 + 2) ; 0 / 3 ; (2 + 0 + 1) / (2 + 1 + 2)
    assert acc.tolist() == pytest.approx([5 / 6, 0.0, 3 / 5])


def test_resample_counts_draw_as_many_groups_as_there_are():
    counts = resample_counts(7, 50, np.random.default_rng(0))
    assert counts.shape == (50, 7) and (counts.sum(1) == 7).all()


def test_grouped_bootstrap_of_an_enumerable_case():
    # group 0: three correct files; group 1: one wrong file. Two draws of two groups:
    # {0,0} -> 1 (p 1/4), {0,1} -> 3/4 (p 1/2), {1,1} -> 0 (p 1/4): the 95 % interval is [0, 1]
    correct, groups = np.array([1, 1, 1, 0]), [0, 0, 0, 1]
    sums, sizes = group_sums(correct, groups)
    counts = resample_counts(2, 4000, np.random.default_rng(1))
    values = resampled_accuracy(counts, sums, sizes)[:, 0]
    freq = {v: np.mean(np.isclose(values, v)) for v in (1.0, 0.75, 0.0)}
    assert sum(freq.values()) == pytest.approx(1.0)
    assert freq[1.0] == pytest.approx(0.25, abs=0.03) and freq[0.75] == pytest.approx(0.5, abs=0.03)
    ci = grouped_bootstrap(correct, groups, n_boot=4000)
    assert (ci["estimate"], ci["low"], ci["high"]) == (0.75, 0.0, 1.0)
    assert (ci["n_groups"], ci["n_files"], ci["n_seeds"]) == (2, 4, 1)


def test_resampling_duplicated_groups_widens_the_interval():
    # 10 groups of 10 near-identical files each (same correctness within a group): 100 files but
    # only 10 independent cases
    correct = np.repeat([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], 10)
    groups = np.repeat(np.arange(10), 10)
    grouped = grouped_bootstrap(correct, groups, n_boot=2000)
    files = grouped_bootstrap(correct, np.arange(100), n_boot=2000)
    assert grouped["estimate"] == files["estimate"] == 0.6
    assert (grouped["high"] - grouped["low"]) > 2 * (files["high"] - files["low"])
    assert (grouped["n_groups"], files["n_groups"]) == (10, 100)


def test_seed_average_shares_one_draw_of_groups():
    # two seeds with complementary errors: every resample averages to exactly 1/2
    a = np.array([[1, 1, 0, 0], [0, 0, 1, 1]])
    ci = grouped_bootstrap(a, [0, 0, 1, 1], n_boot=500)
    assert (ci["estimate"], ci["low"], ci["high"], ci["n_seeds"]) == (0.5, 0.5, 0.5, 2)


def test_paired_difference_per_seed_and_mean_by_hand():
    a = np.array([[1, 1, 1, 0], [1, 1, 0, 1]])  # accuracies 0.75, 0.75
    b = np.array([[1, 0, 0, 0], [0, 1, 0, 1]])  # accuracies 0.25, 0.50
    d = paired_difference(a, b, [0, 0, 1, 2], n_boot=500)
    assert d["per_seed"] == pytest.approx([0.5, 0.25])
    assert d["mean"] == pytest.approx(0.375) and d["sd"] == pytest.approx(np.std([0.5, 0.25], ddof=1))
    assert d["n_groups"] == 3 and d["n_seeds"] == 2
    assert d["low"] <= d["mean"] <= d["high"]


def test_paired_interval_of_identical_methods_is_zero_and_does_not_exclude_it():
    a = np.array([[1, 0, 1, 1, 0, 1]])
    d = paired_difference(a, a.copy(), [0, 0, 1, 1, 2, 3], n_boot=300)
    assert (d["mean"], d["low"], d["high"], d["excludes_zero"]) == (0.0, 0.0, 0.0, False)


def test_paired_interval_excludes_zero_when_a_wins_in_every_group():
    a, b = np.ones((2, 6)), np.array([[0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]])
    d = paired_difference(a, b, [0, 0, 1, 1, 2, 2], n_boot=300)
    assert d["low"] > 0 and d["excludes_zero"] is True


def test_paired_differences_need_the_same_seeds_and_files():
    with pytest.raises(ValueError, match="same seeds and files"):
        paired_difference(np.ones((2, 4)), np.ones((1, 4)), [0, 1, 2, 3])
