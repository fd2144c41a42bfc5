"""Clustered means and paired differences (CR1 t, document sign-flip, document bootstrap) and the seed-level
prediction test: against statsmodels / scipy / brute force, and calibrated by simulation under known nulls."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats as sps

from moeaudit.stats import clustered_difference, clustered_mean, prediction_test


def _clustered(seed: int, n_clusters: int = 10, icc_sd: float = 0.6, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(5, 40, n_clusters)
    clusters = np.repeat(np.arange(n_clusters) * 7 + 3, sizes)  # labels need not be 0..G-1
    values = shift + rng.normal(0, icc_sd, n_clusters)[np.searchsorted(np.unique(clusters), clusters)]
    return values + rng.normal(0, 1, clusters.size), clusters


def test_clustered_mean_matches_statsmodels_cluster_robust_se():
    import statsmodels.api as sm

    y, clusters = _clustered(0)
    fit = sm.OLS(y, np.ones_like(y)).fit(cov_type="cluster", cov_kwds={"groups": clusters})
    cm = clustered_mean(y, clusters)
    assert cm.estimate == pytest.approx(float(fit.params[0]), abs=1e-12)
    assert cm.se == pytest.approx(float(fit.bse[0]), rel=1e-10)
    half = sps.t.ppf(0.975, cm.n_clusters - 1) * cm.se
    assert (cm.ci_low, cm.ci_high) == pytest.approx((cm.estimate - half, cm.estimate + half), abs=1e-12)
    single = clustered_mean([1.0, 2.0, 3.0], [0, 0, 0])
    assert single.estimate == 2.0 and np.isnan(single.se) and np.isnan(single.ci_low)


def test_equal_cluster_sizes_give_the_t_test_on_cluster_means():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 8, 25))
    a += 0.3
    clusters = np.repeat(np.arange(8), 25)
    res = clustered_difference(a.ravel(), b.ravel(), clusters, n_boot=200)
    ref = sps.ttest_1samp((a - b).mean(axis=1), 0.0)
    assert res.t == pytest.approx(float(ref.statistic), rel=1e-10)
    assert res.p_t == pytest.approx(float(ref.pvalue), rel=1e-10)
    assert res.df == 7 and res.n_clusters == 8 and res.n == 200


def test_sign_flip_is_exact_against_brute_force_and_monte_carlo_close_to_it():
    y, clusters = _clustered(2, n_clusters=9, shift=0.4)
    totals = np.array([y[clusters == c].sum() for c in np.unique(clusters)])
    flips = [abs(np.dot(s, totals)) for s in itertools.product((1, -1), repeat=len(totals))]
    exact = np.mean(np.asarray(flips) >= abs(totals.sum()) * (1 - 1e-12))
    res = clustered_difference(y, np.zeros_like(y), clusters, n_perm=10_000, n_boot=100)
    assert res.p_signflip == pytest.approx(exact, abs=1e-12)
    mc = clustered_difference(y, np.zeros_like(y), clusters, n_perm=300, n_boot=100, seed=5)
    assert abs(mc.p_signflip - exact) < 0.08 and mc.p_signflip >= 1 / 301


def test_bootstrap_interval_resamples_documents_of_the_ratio_estimator():
    y, clusters = _clustered(3, shift=0.5)
    res = clustered_difference(y, np.zeros_like(y), clusters, n_boot=4000, seed=0)
    assert res.estimate == pytest.approx(float(y.mean()))
    assert res.ci_low < res.estimate < res.ci_high
    # the percentile interval and the CR1 t interval estimate the same spread
    assert (res.ci_high - res.ci_low) == pytest.approx(2 * 1.96 * res.se, rel=0.35)
    identical = clustered_difference(y, y, clusters, n_boot=10)
    assert (identical.estimate, identical.p_t, identical.p_signflip) == (0.0, 1.0, 1.0)


def test_document_level_tests_are_calibrated_where_a_token_level_test_is_not():
    """Under a null with correlated tokens within documents (ICC about 0.25), the CR1 t and the sign-flip reject
    near the nominal 5%; a t-test treating tokens as independent rejects far more often."""
    reps, alpha = 300, 0.05
    hits = np.zeros(3)
    for r in range(reps):
        d, clusters = _clustered(100 + r, n_clusters=12)
        res = clustered_difference(d, np.zeros_like(d), clusters, n_perm=4096, n_boot=1, seed=r)
        hits += [res.p_t < alpha, res.p_signflip < alpha, sps.ttest_1samp(d, 0.0).pvalue < alpha]
    rate_t, rate_flip, rate_naive = hits / reps
    # 300 replicates: a 5% rate has sd 1.3%; the bounds are about 3 sd
    assert 0.01 <= rate_t <= 0.09 and 0.01 <= rate_flip <= 0.09
    assert rate_naive > 0.2


def test_prediction_test_equals_a_pooled_two_sample_t_and_two_random_draws_reject_at_alpha():
    ref = np.array([2.1, 2.6, 1.9, 3.2, 2.4])
    res = prediction_test(1.2, ref)
    pooled = sps.ttest_ind([1.2], ref, equal_var=True)
    assert res.t == pytest.approx(float(pooled.statistic), rel=1e-10)
    assert res.p == pytest.approx(float(pooled.pvalue), rel=1e-10)
    assert res.estimate == pytest.approx(1.2 - ref.mean()) and res.df == 4
    # calibration: a "criterion" that is one more random seed (exchangeable with the five) rejects at about alpha
    rng = np.random.default_rng(7)
    draws = rng.lognormal(0.0, 0.2, size=(4000, 6))  # skewed like the losses of random prunings
    rate = np.mean([prediction_test(row[0], row[1:]).p < 0.05 for row in draws])
    assert 0.035 <= rate <= 0.075
    assert np.isnan(prediction_test(1.0, [2.0, 2.0, 2.0]).p)


@pytest.mark.parametrize(("call", "fragment"), [
    (lambda: clustered_difference([1.0, 2.0, 3.0], [1.0, 2.0], [0, 1, 1]), "same length"),
    (lambda: clustered_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [0, 0, 0]), "at least 2 clusters"),
    (lambda: clustered_difference([1.0, np.nan], [0.0, 0.0], [0, 1]), "non-finite"),
    (lambda: clustered_mean([1.0, 2.0], [0]), "label every observation"),
    (lambda: prediction_test(1.0, [2.0]), "at least 2"),
])
def test_bad_input_is_named(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call()
