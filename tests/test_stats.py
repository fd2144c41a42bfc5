"""Tests for moeaudit.stats: published R values, brute-force checks, hand-computed corrections, bootstrap behaviour."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from scipy import stats as sps

from moeaudit.stats import (
    JZS_PRIOR_SCALE,
    bca_interval,
    correct,
    kendall_tau_ci,
    paired_test,
    sign_test,
    significant_both,
    spearman,
)

# R's `sleep` data set (Cushny & Peebles 1905): extra hours of sleep, drug 1 vs drug 2, same 10 patients.
SLEEP_1 = np.array([0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0])
SLEEP_2 = np.array([1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4])


@pytest.fixture(scope="module")
def sleep():
    return paired_test(SLEEP_1, SLEEP_2)


# --- paired_test: published values -----------------------------------------------------------------------


def test_sleep_t_test_matches_r(sleep):
    # R: t.test(sleep$extra[1:10], sleep$extra[11:20], paired=TRUE) -> t = -4.0621, df = 9, p-value = 0.002833
    assert sleep.n == 10
    assert sleep.t_stat == pytest.approx(-4.0621, abs=5e-5)
    assert sleep.p_t == pytest.approx(0.002833, abs=5e-7)
    assert sleep.mean_diff == pytest.approx(-1.58, abs=1e-12)  # R: "mean difference -1.58"


def test_sleep_bayes_factor_matches_r_bayesfactor(sleep):
    # R: BayesFactor::ttestBF(x=group1, y=group2, paired=TRUE) -> BF10 = 17.259 (rscale "medium" = sqrt(2)/2)
    assert abs(JZS_PRIOR_SCALE - np.sqrt(2) / 2) < 1e-15
    assert 1.0 / sleep.bf01 == pytest.approx(17.259, rel=1e-4)


def test_published_bayes_factor_pins_the_prior_scale(sleep):
    # the 4-digit R value identifies r = sqrt(2)/2: r = 0.707 gives 17.2581 and r = 1 ("wide" in old JASP) 18.415
    from pingouin import bayesfactor_ttest

    assert 1.0 / sleep.bf01 == pytest.approx(17.25888, rel=1e-6)
    assert bayesfactor_ttest(sleep.t_stat, nx=10, paired=True, r=0.707) == pytest.approx(17.25810, rel=1e-6)
    assert bayesfactor_ttest(sleep.t_stat, nx=10, paired=True, r=1.0) == pytest.approx(18.415, rel=1e-4)


def test_sleep_cohens_d_z(sleep):
    diff = SLEEP_1 - SLEEP_2
    expected = diff.mean() / diff.std(ddof=1)
    assert sleep.cohens_d == pytest.approx(expected, rel=1e-12)
    assert sleep.cohens_d == pytest.approx(-1.2845575625910546, rel=1e-10)
    # d_z and t are tied: t = sqrt(n) d_z
    assert sleep.t_stat == pytest.approx(np.sqrt(10) * sleep.cohens_d, rel=1e-12)
    assert sleep.pct_high_larger == 0.0


def test_sleep_wilcoxon_is_scipys_value(sleep):
    # The sleep differences have a zero and a tie (-1.3, -1.3); scipy's default (n <= 13 with ties/zeros) is an
    # exact sign-flip permutation test: W+ = 0, p = 4 / 1024. This is scipy's value; R's wilcox.test falls back to
    # the normal approximation with continuity correction here and reports p = 0.009091.
    assert sleep.w_stat == 0.0
    assert sleep.p_wilcoxon == pytest.approx(0.00390625, rel=1e-12)
    assert _brute_force_wilcoxon_p(SLEEP_1 - SLEEP_2) == pytest.approx(sleep.p_wilcoxon, rel=1e-12)


def _brute_force_wilcoxon_p(diff: np.ndarray) -> float:
    """Two-sided signed-rank p-value by enumerating every assignment of signs to the nonzero |diff| ranks."""
    d = diff[diff != 0]
    ranks = sps.rankdata(np.abs(d))
    w_obs = ranks[d > 0].sum()
    w_all = np.array([np.dot(signs, ranks) for signs in itertools.product((0, 1), repeat=d.size)])
    lower = np.mean(w_all <= w_obs + 1e-9)
    upper = np.mean(w_all >= w_obs - 1e-9)
    return min(1.0, 2 * min(lower, upper))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wilcoxon_matches_brute_force_exact_distribution(seed):
    rng = np.random.default_rng(seed)
    high = rng.normal(0.4, 1.0, 11)
    low = rng.normal(0.0, 1.0, 11)
    diff = high - low
    assert np.unique(np.abs(diff)).size == diff.size and np.all(diff != 0)  # no ties, no zeros
    res = paired_test(high, low, n_boot=50)
    ranks = sps.rankdata(np.abs(diff))
    w_plus = ranks[diff > 0].sum()
    assert res.w_stat == pytest.approx(min(w_plus, ranks.sum() - w_plus), abs=1e-12)
    assert res.p_wilcoxon == pytest.approx(_brute_force_wilcoxon_p(diff), rel=1e-12)


def _jzs_bf10_log_grid(t: float, n: int, r: float) -> float:
    """Rouder et al. (2009) eq. 1 by a trapezoid rule on a log-g grid (independent of pingouin's quad)."""
    nu = n - 1
    log_g = np.linspace(-25.0, 25.0, 200_001)
    g = np.exp(log_g)
    a = 1 + n * g * r**2
    log_f = -0.5 * np.log(a) - (nu + 1) / 2 * np.log1p(t**2 / (a * nu)) - 0.5 * np.log(2 * np.pi) - 1.5 * log_g
    log_f += -1 / (2 * g) + log_g  # dg = g dlog_g
    num = np.trapezoid(np.exp(log_f), log_g)
    return float(num / (1 + t**2 / nu) ** (-(nu + 1) / 2))


@pytest.mark.parametrize(("n", "shift"), [(10, 0.9), (200, 0.2), (500, 0.05)])
def test_bayes_factor_matches_independent_integration(n, shift):
    rng = np.random.default_rng(n)
    high = rng.normal(shift, 1.0, n)
    res = paired_test(high, np.zeros(n), n_boot=10)
    assert 1.0 / res.bf01 == pytest.approx(_jzs_bf10_log_grid(res.t_stat, n, JZS_PRIOR_SCALE), rel=1e-6)


# --- paired_test: degenerate input and errors ------------------------------------------------------------


def test_all_zero_differences_give_nan_not_crash():
    res = paired_test(np.ones(6), np.ones(6))
    assert res.mean_diff == 0.0 and res.sd_diff == 0.0 and res.pct_high_larger == 0.0
    for field in ("cohens_d", "t_stat", "p_t", "w_stat", "p_wilcoxon", "bf01", "bf0plus", "ci_low", "ci_high",
                  "p_cluster", "p_signrank_cluster", "p_sign", "tost_p"):
        assert np.isnan(getattr(res, field)), field
    assert res.note == "every D is 0"


def test_constant_nonzero_differences():
    res = paired_test(np.full(6, 2.0), np.ones(6))
    assert np.isnan(res.cohens_d) and np.isnan(res.t_stat) and np.isnan(res.p_t) and np.isnan(res.tost_p)
    assert res.p_wilcoxon == pytest.approx(2 / 2**6, rel=1e-12)  # every sign positive: exact two-sided p
    assert res.p_cluster == pytest.approx(2 / 2**6, rel=1e-12)  # all 2^6 sign vectors enumerated
    assert res.pct_high_larger == 100.0 and "constant" in res.note


def test_near_constant_differences_give_nan_d_with_a_note():
    # D = 1 + rounding-level noise: mean / sd would be ~1e14 (the symptom); relative spread < 1e-12 -> NaN
    high = 1.0 + np.array([0.0, 1e-15, -1e-15, 2e-15, 0.0, -2e-15, 1e-15])
    res = paired_test(high, np.zeros(7))
    assert np.isnan(res.cohens_d) and np.isnan(res.t_stat) and np.isnan(res.bf0plus) and np.isnan(res.ci_low)
    assert "constant up to 1e-12" in res.note
    assert res.p_signrank_cluster == pytest.approx(2 / 2**7, rel=1e-12)  # the rank tests still see all-positive D
    ok = paired_test(1.0 + np.linspace(-1e-6, 1e-6, 7), np.zeros(7))  # spread 2e-6 relative: a real (huge) d
    assert ok.cohens_d > 1e5 and ok.note == ""


def test_huge_t_gives_zero_bf01():
    rng = np.random.default_rng(0)
    # t ~ 220 with 1999 df: pingouin's null density (1 + t^2/df)^(-n/2) underflows to 0 (ZeroDivisionError inside)
    res = paired_test(rng.normal(5.0, 1.0, 2000), np.zeros(2000), n_boot=10)
    assert res.t_stat > 200
    assert res.bf01 == 0.0


def test_result_is_frozen(sleep):
    with pytest.raises(dataclasses.FrozenInstanceError):
        sleep.n = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"high": [1.0, 2, 3, 4], "low": [1.0, 2, 3]}, r"same length, got 4 and 3"),
        ({"high": [1.0, 2], "low": [1.0, 2]}, r"at least 3 values, got 2"),
        ({"high": [1.0, np.nan, 3, np.inf], "low": [1.0, 2, 3, 4]}, r"high has 2 non-finite value\(s\).*index 1, 3"),
        ({"high": [1.0, 2, 3], "low": [1.0, 2, 3], "clusters": [0, 1]}, r"expected length 3"),
        ({"high": [1.0, 2, 3], "low": [0.0, 2, 3], "clusters": [7, 7, 7]}, r"single cluster"),
        ({"high": [1.0, 2, 3], "low": [0.0, 2, 3], "ci": 95}, r"ci must be in \(0, 1\)"),
        ({"high": [1.0, 2, 3], "low": [0.0, 2, 3], "n_boot": 0}, r"n_boot must be a positive integer"),
        ({"high": [[1.0, 2, 3]], "low": [[0.0, 2, 3]]}, r"must be 1-D"),
    ],
)
def test_paired_test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        paired_test(**kwargs)


# --- bootstrap interval -------------------------------------------------------------------------------------


def test_ci_contains_estimate_and_is_deterministic():
    rng = np.random.default_rng(3)
    high, low = rng.normal(0.3, 1, 150), rng.normal(0, 1, 150)
    a = paired_test(high, low, seed=11)
    b = paired_test(high, low, seed=11)
    c = paired_test(high, low, seed=12)
    assert a.ci_method == "bca_bootstrap"
    assert a.ci_low < a.cohens_d < a.ci_high
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    assert (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)
    # roughly the normal-theory width 2 * 1.96 * sqrt(1/n + d^2 / (2n))
    se = np.sqrt(1 / 150 + a.cohens_d**2 / 300)
    assert a.ci_high - a.ci_low == pytest.approx(2 * 1.96 * se, rel=0.2)


def test_cluster_bootstrap_widens_for_correlated_positions():
    rng = np.random.default_rng(5)
    n_clusters, size = 20, 10
    cluster_effect = rng.normal(0.3, 1.0, n_clusters)
    clusters = np.repeat(np.arange(n_clusters), size)
    high = cluster_effect[clusters] + rng.normal(0, 0.1, clusters.size)  # positions nearly copies of their cluster
    low = np.zeros_like(high)
    plain = paired_test(high, low, seed=0)
    clustered = paired_test(high, low, clusters=clusters, seed=0)
    assert clustered.ci_method == "bca_cluster_bootstrap" and clustered.n_clusters == n_clusters
    assert clustered.cohens_d == plain.cohens_d  # the point estimate does not depend on the clusters
    assert clustered.ci_low < clustered.cohens_d < clustered.ci_high
    # effective sample size ~ 20 rather than 200: interval about sqrt(10) times wider
    assert (clustered.ci_high - clustered.ci_low) > 2.0 * (plain.ci_high - plain.ci_low)


def test_cluster_bootstrap_with_singleton_clusters_equals_plain_bootstrap():
    rng = np.random.default_rng(8)
    high, low = rng.normal(0.2, 1, 40), rng.normal(0, 1, 40)
    plain = paired_test(high, low, seed=4)
    singletons = paired_test(high, low, clusters=100 + 3 * np.arange(40), seed=4)
    assert (plain.ci_low, plain.ci_high) == pytest.approx((singletons.ci_low, singletons.ci_high), rel=1e-12)


def test_bootstrap_coverage_on_normal_data():
    from moeaudit.stats._intervals import bootstrap_d_z, d_z, jackknife_d_z

    true_d, n, reps = 0.5, 60, 150
    rng = np.random.default_rng(2024)
    hits = 0
    groups = np.arange(n)
    for rep in range(reps):
        diff = rng.normal(true_d, 1.0, n)
        low, high = bca_interval(d_z(diff), bootstrap_d_z(diff, groups, 400, rep), jackknife_d_z(diff, groups), 0.95)
        hits += low <= true_d <= high
    coverage = hits / reps
    # nominal 0.95 (BCa). Binomial SE ~ 0.018.
    assert 0.88 <= coverage <= 0.995


# --- corrections --------------------------------------------------------------------------------------------

P4 = [0.01, 0.04, 0.03, 0.005]


@pytest.mark.parametrize(
    ("method", "expected_p", "expected_reject"),
    [
        # m * p
        ("bonferroni", [0.04, 0.16, 0.12, 0.02], [True, False, False, True]),
        # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
        ("holm", [0.03, 0.06, 0.06, 0.02], [True, False, False, True]),
        # sorted p * 4 / rank = 0.02, 0.02, 0.04, 0.04 -> running min from the top: unchanged
        ("fdr_bh", [0.02, 0.04, 0.04, 0.02], [True, True, True, True]),
    ],
)
def test_corrections_hand_computed(method, expected_p, expected_reject):
    res = correct(P4, method=method, alpha=0.05)
    np.testing.assert_allclose(res.p_corrected, expected_p, rtol=1e-12)
    np.testing.assert_array_equal(res.reject, expected_reject)
    assert res.alpha_corrected == pytest.approx(0.0125, rel=1e-15)
    assert res.m == 4 and res.method == method


def _bh_by_hand(p: np.ndarray) -> np.ndarray:
    m = p.size
    order = np.argsort(p)
    adjusted = np.empty(m)
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, p[i] * m / rank)
        adjusted[i] = running
    return adjusted


def test_fdr_bh_matches_hand_formula_on_random_pvalues():
    p = np.random.default_rng(0).uniform(0, 0.2, 25)
    np.testing.assert_allclose(correct(p, "fdr_bh").p_corrected, _bh_by_hand(p), rtol=1e-12)


def test_paper_threshold_20_cells():
    p = np.full(20, 0.5)
    p[3] = 0.0024
    p[7] = 0.0026
    res = correct(p, "bonferroni", alpha=0.05)
    assert res.alpha_corrected == pytest.approx(0.0025, rel=1e-15)
    assert np.flatnonzero(res.reject).tolist() == [3]


def test_nan_pvalues_count_in_m_and_are_never_rejected():
    res = correct([0.01, np.nan], "bonferroni")
    assert res.m == 2
    np.testing.assert_allclose(res.p_corrected, [0.02, np.nan], rtol=1e-12)
    np.testing.assert_array_equal(res.reject, [True, False])
    holm = correct([0.02, np.nan, 0.001], "holm")  # NaN ranked last, as p = 1: multipliers 2 and 3 for the others
    np.testing.assert_allclose(holm.p_corrected, [0.04, np.nan, 0.003], rtol=1e-12)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([0.1], "bonferoni"), r"valid options: bonferroni, holm, fdr_bh\. Did you mean 'bonferroni'\?"),
        (([0.1], "bh"), r"Unknown correction method 'bh'"),
        (([], "holm"), r"non-empty 1-D"),
        (([0.1, 1.5], "holm"), r"\[0, 1\].*index \[1\]"),
        (([0.1, -0.01], "holm"), r"\[0, 1\]"),
    ],
)
def test_correct_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        correct(*args)


def test_correct_bad_alpha():
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
        correct([0.1], alpha=5)


# --- significant_both ---------------------------------------------------------------------------------------


def test_significant_both_requires_both_tests():
    # 5 cells -> Bonferroni threshold 0.01
    p_t = [0.001, 0.001, 0.2, 0.009, np.nan]
    p_w = [0.002, 0.03, 0.001, 0.0099, 0.001]
    np.testing.assert_array_equal(significant_both(p_t, p_w), [True, False, False, True, False])


def test_significant_both_uses_m_cells_per_family():
    # with m = 2 the threshold is 0.025; 0.03 passes uncorrected but not corrected
    np.testing.assert_array_equal(significant_both([0.02, 0.03], [0.02, 0.001]), [True, False])
    with pytest.raises(ValueError, match="one p-value per cell"):
        significant_both([0.1, 0.2], [0.1])


# --- small helpers ------------------------------------------------------------------------------------------


def test_spearman_matches_scipy_and_handles_constant(recwarn):
    x = np.array([1.0, 2, 3, 4, 5, 6])
    y = np.array([2.0, 1, 4, 3, 6, 5])
    rho, p = spearman(x, y)
    assert isinstance(rho, float) and isinstance(p, float)
    # 1 - 6 * sum(d^2) / (n (n^2 - 1)) with sum(d^2) = 6
    assert rho == pytest.approx(1 - 36 / 210, rel=1e-12)
    assert p == pytest.approx(sps.spearmanr(x, y).pvalue, rel=1e-12)
    rho_c, p_c = spearman(np.ones(5), np.arange(5.0))
    assert np.isnan(rho_c) and np.isnan(p_c)
    assert len(recwarn) == 0
    with pytest.raises(ValueError, match="x and y must have the same length"):
        spearman([1, 2, 3], [1, 2, 3, 4])


def test_sign_test():
    # 8 positives, 1 negative, 2 zeros (dropped): two-sided binomial p = 2 * (1 + 9) / 2^9
    values = [1, 2, 3, 4, 5, 6, 7, 8, -1, 0, 0]
    assert sign_test(values) == pytest.approx(20 / 512, rel=1e-12)
    assert np.isnan(sign_test([0.0, 0.0]))
    with pytest.raises(ValueError, match="non-finite"):
        sign_test([1.0, np.nan])


def test_kendall_tau_ci():
    rng = np.random.default_rng(1)
    a = rng.normal(size=40)
    b = a + rng.normal(0, 0.5, 40)
    res = kendall_tau_ci(a, b, n_boot=300, seed=3)
    ref = sps.kendalltau(a, b)
    assert res.tau == pytest.approx(ref.statistic, rel=1e-12) and res.p == pytest.approx(ref.pvalue, rel=1e-12)
    assert res.ci_low < res.tau < res.ci_high <= 1.0
    assert res == kendall_tau_ci(a, b, n_boot=300, seed=3)
    perfect = kendall_tau_ci(np.arange(10.0), np.arange(10.0) ** 2, n_boot=50)
    assert perfect.tau == pytest.approx(1.0, abs=1e-12) and perfect.ci_low == pytest.approx(1.0, abs=1e-12)
    assert np.isnan(kendall_tau_ci(np.ones(5), np.arange(5.0), n_boot=10).tau)


def test_vectorised_tau_b_equals_scipy_row_by_row():
    from moeaudit.stats._correlation import _tau_b_rows

    rng = np.random.default_rng(7)
    a = rng.integers(0, 5, size=(200, 13)).astype(float)  # many ties, as bootstrap resamples have
    b = a + rng.integers(0, 3, size=a.shape)
    a[0] = 2.0  # constant row: tau undefined
    got = _tau_b_rows(a, b, chunk=64)
    ref = np.array([sps.kendalltau(x, y).statistic if np.ptp(x) > 0 and np.ptp(y) > 0 else np.nan
                    for x, y in zip(a, b)])
    assert np.isnan(got[0]) and np.array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got[1:], ref[1:], rtol=0, atol=1e-12)
