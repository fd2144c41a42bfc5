"""Document-clustered statistics: sign-flip tests against brute-force enumeration and scipy, the Hodges-Lehmann
interval against its definition, BCa against scipy, the design effect against statsmodels, and calibration by
simulation under a known null and a planted effect (small: a few hundred draws each)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats as sps

from moeaudit.stats import (
    bca_interval,
    clustered_tests,
    design_effect,
    hodges_lehmann,
    sign_flip_test,
)
from moeaudit.stats._intervals import average_ranks, bootstrap_d_z, d_z, jackknife_d_z


def _clustered_draw(rng, n_docs=40, per_doc=5, icc=0.33, shift=0.0, df=None):
    """n_docs documents of per_doc positions with a shared document effect (intra-class correlation icc)."""
    docs = np.repeat(np.arange(n_docs), per_doc)
    noise = rng.standard_t(df, docs.size) / np.sqrt(df / (df - 2)) if df else rng.normal(size=docs.size)
    values = shift + np.sqrt(icc) * rng.normal(size=n_docs)[docs] + np.sqrt(1 - icc) * noise
    return values, docs


def _brute_force_sign_flip(statistic_per_position: np.ndarray, docs: np.ndarray) -> float:
    """Two-sided p over all 2^G sign vectors, by an explicit loop over documents."""
    labels = np.unique(docs)
    sums = [statistic_per_position[docs == g].sum() for g in labels]
    observed = abs(sum(sums))
    hits = 0
    for signs in itertools.product((1.0, -1.0), repeat=len(labels)):
        hits += abs(sum(s * v for s, v in zip(signs, sums))) >= observed - 1e-9
    return hits / 2 ** len(labels)


def test_exact_enumeration_equals_brute_force_for_all_three_statistics():
    rng = np.random.default_rng(0)
    docs = rng.integers(0, 9, 30)
    diff = rng.normal(0.3, 1.0, 30)
    diff[3] = 0.0  # a zero: dropped from ranks and signs
    diff[5] = -diff[6]  # a tie in |D|
    res = clustered_tests(diff, docs, n_perm=9999)
    assert res.exact and res.n_perm == 2 ** 9 and res.n_clusters == 9
    ranks = np.zeros(30)
    nz = diff != 0
    ranks[nz] = sps.rankdata(np.abs(diff[nz]))
    assert res.w_diff == pytest.approx(np.sum(np.sign(diff) * ranks), abs=1e-9)
    assert res.p_mean == pytest.approx(_brute_force_sign_flip(diff, docs), abs=1e-12)
    assert res.p_signrank == pytest.approx(_brute_force_sign_flip(np.sign(diff) * ranks, docs), abs=1e-12)
    assert res.p_sign == pytest.approx(_brute_force_sign_flip(np.sign(diff), docs), abs=1e-12)
    assert sign_flip_test(diff, docs) == res.p_mean


def test_one_position_per_cluster_gives_the_classical_exact_tests():
    rng = np.random.default_rng(1)
    diff = rng.normal(0.5, 1.0, 12)  # no ties, no zeros: scipy's Wilcoxon is exact at this n
    res = clustered_tests(diff, None, n_perm=9999)
    assert res.exact
    assert res.p_signrank == pytest.approx(sps.wilcoxon(diff).pvalue, rel=1e-12)
    n_pos = int((diff > 0).sum())
    assert res.p_sign == pytest.approx(sps.binomtest(n_pos, 12).pvalue, rel=1e-12)
    perm = sps.permutation_test((diff,), np.sum, permutation_type="samples", n_resamples=np.inf)
    assert res.p_mean == pytest.approx(perm.pvalue, rel=1e-12)


def test_monte_carlo_sign_flips_approach_the_large_sample_tests():
    rng = np.random.default_rng(2)
    diff = rng.normal(0.12, 1.0, 200)
    res = clustered_tests(diff, None, n_perm=19999, seed=3)
    assert not res.exact and res.n_perm == 19999
    # Monte Carlo SE of a p near 0.1 with 20000 draws is ~0.002; the large-sample approximations differ slightly
    assert res.p_mean == pytest.approx(sps.ttest_1samp(diff, 0).pvalue, abs=0.012)
    assert res.p_signrank == pytest.approx(sps.wilcoxon(diff).pvalue, abs=0.012)
    assert res.p_sign == pytest.approx(sps.binomtest(int((diff > 0).sum()), 200).pvalue, abs=0.012)
    again = clustered_tests(diff, None, n_perm=19999, seed=3)
    assert again == res and clustered_tests(diff, None, n_perm=19999, seed=4) != res


def test_sign_flip_bad_input():
    with pytest.raises(ValueError, match="n_perm must be a positive integer"):
        clustered_tests([1.0, 2.0], None, n_perm=0)
    with pytest.raises(ValueError, match="non-finite"):
        sign_flip_test([1.0, np.inf])
    assert np.isnan(sign_flip_test([0.0, 0.0, 0.0]))
    assert np.isnan(clustered_tests([0.0, 0.0], [1, 2]).p_mean)


def test_clustered_tests_hold_their_level_where_the_plain_tests_do_not():
    """ICC 0.33, 40 documents of 5 positions: the plain t-test and Wilcoxon over-reject a true null (design
    effect ~2.3); the document-level sign-flip tests hold 5%. A planted shift is still found."""
    rng = np.random.default_rng(10)
    draws = 300
    plain_t = plain_w = flip_mean = flip_rank = flip_sign = 0
    for _ in range(draws):
        values, docs = _clustered_draw(rng)
        res = clustered_tests(values, docs, n_perm=999, seed=int(rng.integers(1 << 31)))
        plain_t += sps.ttest_1samp(values, 0).pvalue < 0.05
        plain_w += sps.wilcoxon(values).pvalue < 0.05
        flip_mean += res.p_mean < 0.05
        flip_rank += res.p_signrank < 0.05
        flip_sign += res.p_sign < 0.05
    # binomial 99% band of a 5% rate over 300 draws: about [0.02, 0.09]
    for rate in (flip_mean, flip_rank, flip_sign):
        assert 0.015 <= rate / draws <= 0.09
    assert plain_t / draws > 0.13 and plain_w / draws > 0.13
    found = np.zeros(3)
    for _ in range(100):
        values, docs = _clustered_draw(rng, shift=0.5)
        res = clustered_tests(values, docs, n_perm=999, seed=int(rng.integers(1 << 31)))
        found += [res.p_mean < 0.05, res.p_signrank < 0.05, res.p_sign < 0.05]
    assert (found / 100 > [0.8, 0.8, 0.6]).all()


def _token_rhos(rng, signal: float, n_docs: int = 30, tokens: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Per-token Spearman rho of 4 active experts (of 16) between a metric and their loss changes, which share a
    document-level per-expert effect; ``signal`` ties the metric to that effect (0: the null holds)."""
    effect = rng.normal(size=(n_docs, 1, 16))
    metric = signal * effect + rng.normal(size=(n_docs, 1, 16))
    active = np.argsort(rng.random((n_docs, tokens, 16)), axis=2)[:, :, :4]
    delta = np.take_along_axis(np.broadcast_to(effect, active.shape[:2] + (16,)), active, 2)
    delta = delta + 0.3 * rng.normal(size=delta.shape)
    values = np.take_along_axis(np.broadcast_to(metric, active.shape[:2] + (16,)), active, 2)
    rank_m = np.argsort(np.argsort(values, axis=2), axis=2)
    rank_d = np.argsort(np.argsort(delta, axis=2), axis=2)
    rho = 1 - 6 * ((rank_m - rank_d) ** 2).sum(axis=2) / (4 * 15)  # no ties: Spearman's formula
    return rho.ravel(), np.repeat(np.arange(n_docs), tokens)


def test_token_rhos_helper_is_spearman():
    rho, _ = _token_rhos(np.random.default_rng(0), 0.5, n_docs=1, tokens=1)
    rng = np.random.default_rng(0)  # replay the same draws
    effect = rng.normal(size=(1, 1, 16))
    metric = 0.5 * effect + rng.normal(size=(1, 1, 16))
    active = np.argsort(rng.random((1, 1, 16)), axis=2)[0, 0, :4]
    delta = effect[0, 0, active] + 0.3 * rng.normal(size=(1, 1, 4))[0, 0]
    assert rho[0] == pytest.approx(sps.spearmanr(metric[0, 0, active], delta).statistic, abs=1e-12)


def test_rank_validity_rho_null_is_calibrated_under_clustering():
    """A metric unrelated to the experts' loss changes (null by construction) while those changes share a document
    effect: the document sign-flip test of mean rho holds its level, the plain t-test on rho over-rejects. A metric
    correlated with the effects is detected."""
    rng = np.random.default_rng(11)
    draws = 300
    flip = plain = 0
    for _ in range(draws):
        rhos, docs = _token_rhos(rng, 0.0)
        flip += sign_flip_test(rhos, docs, n_perm=999, seed=int(rng.integers(1 << 31))) < 0.05
        plain += sps.ttest_1samp(rhos, 0).pvalue < 0.05
    assert 0.015 <= flip / draws <= 0.09 and plain / draws > 0.15
    found = sum(sign_flip_test(*_token_rhos(rng, 0.5), n_perm=999) < 0.05 for _ in range(50))
    assert found / 50 > 0.8


# --- Hodges-Lehmann ---------------------------------------------------------------------------------------


def _walsh(d):
    return np.sort([(d[i] + d[j]) / 2 for i in range(len(d)) for j in range(i, len(d))])


def _brute_force_hl_interval(d, docs, ci=0.95):
    """Evaluate the clustered signed-rank Z at every gap between Walsh averages (scipy ranks, explicit loop)."""
    walsh = _walsh(d)
    crit = sps.norm.ppf((1 + ci) / 2)
    z = []
    for k in range(walsh.size - 1):
        shifted = d - (walsh[k] + walsh[k + 1]) / 2
        nz = shifted != 0
        ranks = np.zeros_like(shifted)
        ranks[nz] = sps.rankdata(np.abs(shifted[nz]))
        sums = np.array([np.sum((np.sign(shifted) * ranks)[docs == g]) for g in np.unique(docs)])
        z.append(sums.sum() / np.sqrt(np.sum(sums**2)))
    z = np.array(z)
    low = walsh[np.flatnonzero(z > crit).max() + 1]
    high = walsh[np.flatnonzero(z < -crit).min()]
    return low, high


@pytest.mark.parametrize("clustered", [False, True])
def test_hodges_lehmann_against_brute_force(clustered):
    rng = np.random.default_rng(4)
    d = rng.standard_t(3, 40) + 0.3
    docs = np.repeat(np.arange(10), 4) if clustered else np.arange(40)
    res = hodges_lehmann(d, docs if clustered else None)
    assert res.estimate == pytest.approx(np.median(_walsh(d)), abs=1e-12)
    low, high = _brute_force_hl_interval(d, docs)
    assert (res.ci_low, res.ci_high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    assert res.ci_low <= res.estimate <= res.ci_high


def test_hodges_lehmann_classical_interval_for_independent_positions():
    # Hollander & Wolfe: [W_(C), W_(P + 1 - C)] with C from the normal approximation of the signed-rank statistic
    rng = np.random.default_rng(5)
    n = 60
    d = rng.normal(0.2, 1.0, n)
    res = hodges_lehmann(d)
    walsh = _walsh(d)
    p = n * (n + 1) // 2
    s = np.sqrt(n * (n + 1) * (2 * n + 1) / 6)
    # the gap j (0-based) between walsh[j] and walsh[j+1] is rejected as too small when P - 2j - 2 > z s
    c = int(np.floor((p - 2 - 1.959963984540054 * s) / 2))  # largest rejected gap
    assert res.ci_low == walsh[c + 1] and res.ci_high == walsh[p - 1 - (c + 1)]


def test_hodges_lehmann_unbounded_with_too_few_clusters_and_coverage():
    few = hodges_lehmann([1.0, 2.0, 3.0, 4.0], [0, 0, 1, 1])
    assert few.ci_low == -np.inf and few.ci_high == np.inf  # |Z| <= sqrt(2) < 1.96: nothing can be rejected
    rng = np.random.default_rng(6)
    hits = 0
    for _ in range(200):
        values, docs = _clustered_draw(rng, n_docs=30, per_doc=4, shift=0.4, df=3)  # symmetric: centre 0.4
        res = hodges_lehmann(values, docs)
        hits += res.ci_low <= 0.4 <= res.ci_high
    assert 0.89 <= hits / 200 <= 0.99


def test_average_ranks_equal_scipy():
    x = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 0.5, 2.0])
    np.testing.assert_array_equal(average_ranks(x), sps.rankdata(x))


# --- BCa bootstrap of d_z -----------------------------------------------------------------------------------


def test_bca_matches_scipy_bootstrap():
    rng = np.random.default_rng(7)
    d = rng.gamma(2.0, 1.0, 80) - 1.4  # skewed: BCa differs from the percentile interval
    groups = np.arange(80)
    ours = bca_interval(d_z(d), bootstrap_d_z(d, groups, 40000, 1), jackknife_d_z(d, groups), 0.95)
    ref = sps.bootstrap((d,), lambda x, axis: x.mean(axis) / x.std(axis=axis, ddof=1), method="BCa",
                        n_resamples=40000, rng=np.random.default_rng(2)).confidence_interval
    assert ours == (pytest.approx(ref.low, abs=0.01), pytest.approx(ref.high, abs=0.01))


def test_jackknife_d_z_equals_leave_one_out():
    rng = np.random.default_rng(8)
    d = rng.normal(0.3, 1, 30)
    groups = rng.integers(0, 7, 30)
    expected = [d[groups != g].mean() / d[groups != g].std(ddof=1) for g in range(7)]
    np.testing.assert_allclose(jackknife_d_z(d, groups), expected, rtol=1e-10)


def test_bca_covers_heavy_tailed_skewed_d_better_than_percentile():
    """Skewed heavy-tailed D (centred lognormal, sigma 1.2: skewness ~ 9) with n = 200: the percentile interval of d_z
    under-covers; BCa covers more often on the same resamples (the docs give the large simulation)."""
    rng = np.random.default_rng(9)
    sigma = 1.2
    mean, sd = np.exp(sigma**2 / 2), np.sqrt((np.exp(sigma**2) - 1) * np.exp(sigma**2))
    true_d, n = 0.3, 200
    groups = np.arange(n)
    pct = bca = 0
    reps = 200
    for rep in range(reps):
        d = true_d + (rng.lognormal(0, sigma, n) - mean) / sd
        boot = bootstrap_d_z(d, groups, 500, rep)
        low, high = np.quantile(boot, [0.025, 0.975])
        pct += low <= true_d <= high
        low, high = bca_interval(d_z(d), boot, jackknife_d_z(d, groups), 0.95)
        bca += low <= true_d <= high
    assert pct / reps < 0.88 and bca > pct


# --- design effect ------------------------------------------------------------------------------------------


def test_design_effect_is_the_ratio_of_statsmodels_cluster_and_hc0_variances():
    import statsmodels.api as sm

    rng = np.random.default_rng(12)
    values, docs = _clustered_draw(rng, n_docs=25, per_doc=6, icc=0.4)
    x = np.ones((values.size, 1))
    clustered = sm.OLS(values, x).fit(cov_type="cluster", cov_kwds={"groups": docs, "use_correction": False})
    hc0 = sm.OLS(values, x).fit(cov_type="HC0")
    assert design_effect(values, docs) == pytest.approx(clustered.bse[0] ** 2 / hc0.bse[0] ** 2, rel=1e-10)
    assert design_effect(values, None) == pytest.approx(1.0, rel=1e-12)
    assert design_effect(values, docs) > 1.5  # 1 + (6 - 1) * 0.4 = 3 in expectation
