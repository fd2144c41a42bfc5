"""Calibration and power machinery of `moeaudit validate`: the vectorised tests against scipy / statsmodels, the
null draws (calibrated by construction), the planted strengths, the minimum detectable d against theory."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from test_expert_null import synthetic_pool

from moeaudit import stats
from moeaudit.experiments._calibration import (
    SHIFTS,
    calibrate,
    decide,
    minimum_detectable_d,
    planted_diffs,
    random_pair_diffs,
    rate,
    rejections,
    token_tests,
)


def test_token_tests_equal_scipy_and_the_run_s_clustered_tests_row_by_row():
    rng = np.random.default_rng(0)
    diff = rng.standard_t(4, size=(6, 60)) + 0.3  # n > 50: scipy's Wilcoxon uses its normal approximation
    diff[2, :4] = 0.0  # zeros leave the signed ranks
    groups = np.repeat(np.arange(12), 5)  # 2**12 sign vectors: enumerated, so exactly the run's p-values
    p = token_tests(diff, groups)
    for i in range(6):
        assert p["t"][i] == pytest.approx(sps.ttest_1samp(diff[i], 0.0).pvalue, rel=1e-9)
        assert p["wilcoxon"][i] == pytest.approx(sps.wilcoxon(diff[i]).pvalue, rel=1e-9)
        flips = stats.clustered_tests(diff[i], groups)
        assert p["clustered_mean"][i] == flips.p_mean and p["clustered_rank"][i] == flips.p_signrank
        assert p["dir_mean"][i] == np.sign(diff[i].mean()) and p["dir_rank"][i] == np.sign(flips.w_diff)


def test_stop_above_settles_rows_without_changing_decisions_at_that_level():
    rng = np.random.default_rng(1)
    diff = rng.standard_t(3, size=(300, 60)) + rng.choice([0.0, 0.6], size=(300, 1))
    groups = np.repeat(np.arange(30), 2)
    full = stats.clustered_tests_rows(diff, groups, n_perm=4999, seed=0)
    fast = stats.clustered_tests_rows(diff, groups, n_perm=4999, seed=0, stop_above=0.01)
    assert (fast.n_perm < 4999).sum() > 100  # most rows settle after the first 999 sign vectors
    agree = (full.p_mean <= 0.01) == (fast.p_mean <= 0.01)
    assert agree.mean() > 0.98  # different sign vectors after the first stage: Monte Carlo noise near 0.01 only


def test_decision_is_the_run_s_rule():
    rng = np.random.default_rng(2)
    p = {"clustered_mean": rng.uniform(0, 0.1, 200), "clustered_rank": rng.uniform(0, 0.1, 200),
         "dir_mean": rng.choice([-1.0, 1.0], 200), "dir_rank": rng.choice([-1.0, 0.0, 1.0], 200),
         "t": rng.uniform(0, 0.1, 200), "wilcoxon": rng.uniform(0, 0.1, 200)}
    got = decide(p, 0.05)
    for i in range(200):
        criteria = [stats.Criterion("mean", p["clustered_mean"][i:i + 1], p["dir_mean"][i:i + 1]),
                    stats.Criterion("rank", p["clustered_rank"][i:i + 1], p["dir_rank"][i:i + 1])]
        expected = stats.decide(criteria, alpha=0.05)
        assert got[i] == (expected.direction[0] if expected.significant[0] else 0)
    assert set(rejections(p, 0.05)) == {"t", "wilcoxon", "clustered_mean", "clustered_rank", "decision"}
    r = rate(np.array([True] * 5 + [False] * 95))
    ci = sps.binomtest(5, 100).proportion_ci(0.95, method="exact")
    assert r["rate"] == 0.05 and r["ci_low"] == pytest.approx(ci.low) and r["n_draws"] == 100


def test_random_pairs_are_a_true_null_even_with_important_experts():
    importance = np.linspace(0, 2, 16)  # some experts always cost more: a random *pair* still has mean D = 0
    pool = synthetic_pool(n_positions=150, n_experts=16, importance=importance, n_docs=30, seed=1)
    diff, groups = random_pair_diffs(pool, 1500, np.random.default_rng(0))
    assert diff.shape == (1500, 150) and groups.shape == (150,)
    hits = rejections(token_tests(diff, groups, n_perm=999, stop_above=0.05), 0.05)
    for test in ("t", "wilcoxon", "clustered_mean", "clustered_rank"):
        low, high = sps.binomtest(int(hits[test].sum()), 1500).proportion_ci(0.999)
        assert low <= 0.05 <= high, test


def test_planted_metrics_reach_their_strength_and_are_detected_when_strong():
    importance = np.linspace(0, 3, 32)
    pool = synthetic_pool(n_positions=300, n_experts=32, top_k=6, importance=importance, n_docs=60, seed=2)
    rng = np.random.default_rng(0)
    means = {}
    for strength in (0.0, 0.5, 1.0):
        diff, rho = planted_diffs(pool, 32, strength, 60, rng)
        means[strength] = diff.mean(axis=1).mean()
        assert np.mean(rho) == pytest.approx(strength, abs=0.06)
    assert abs(means[0.0]) < 0.1 < means[0.5] < means[1.0]
    diff, _ = planted_diffs(pool, 32, 1.0, 30, rng)
    assert np.mean(decide(token_tests(diff, pool.seq_id, n_perm=1999), 0.05 / 20) > 0) > 0.9


def test_minimum_detectable_d_is_near_the_t_test_theory_for_gaussian_d():
    """Gaussian D, one position per document: the decision rule (the sign-flip tests of the mean and of the signed
    rank both rejecting) needs at least the t-test's own minimum detectable d (noncentral t), and not much more."""
    rng = np.random.default_rng(3)
    n, alpha = 100, 0.05 / 10
    null = [(rng.standard_normal((200, n)), np.arange(n))]
    got = minimum_detectable_d(null, alpha_corrected=alpha, n_perm=3999)
    crit = sps.t.ppf(1 - alpha / 2, n - 1)
    power = [sps.nct.sf(crit, n - 1, d * np.sqrt(n)) for d in SHIFTS]
    theory = np.interp(0.8, power, SHIFTS)
    assert theory - 0.02 <= got["mde_d"] <= theory + 0.08
    assert [c["d"] for c in got["curve"]] == list(SHIFTS[: len(got["curve"])])
    assert got["curve"][-1]["rate"] >= 0.8 > got["curve"][-2]["rate"]  # stops at the first shift past 80%


def test_calibrate_reports_every_key_on_a_synthetic_run():
    pools = {layer: (synthetic_pool(n_positions=60, n_experts=8, n_docs=15, seed=10 + layer), 8) for layer in (0, 1)}
    out = calibrate(pools, ("audit", {0: 2, 1: 2}), n_families=30, n_power_draws=5, n_mde_draws=20)
    assert set(out["null_rate"]) == {"t", "wilcoxon", "clustered_mean", "clustered_rank", "decision"}
    assert out["null_rate"]["t"]["n_draws"] == 2 * 30 * 2
    assert out["fwer"]["n_draws"] == 30 and out["fwer"]["family_size"] == 4
    assert {(r["strength"], r["n"]) for r in out["power"]} >= {(0.0, 60), (1.0, 15)}
    assert out["alpha_corrected"] == pytest.approx(0.05 / 4)
    with pytest.raises(ValueError, match="no single-expert pool"):
        calibrate(pools, ("audit", {0: 2, 5: 1}))
