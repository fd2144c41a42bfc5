"""Evidence for and against an effect: TOST against a hand computation and calibrated at its boundary, the minimum
detectable d against statsmodels and a simulation of the decision rule, one-sided JZS Bayes factors against
pingouin and a brute-force integral, and the decision rule itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from moeaudit.stats import (
    JZS_PRIOR_SCALE,
    Criterion,
    bf0plus,
    decide,
    jzs_bf10,
    jzs_bf_one_sided,
    minimum_detectable_d,
    significant_both,
    tost_d,
)
from moeaudit.stats._bayes import _log_t_cdf, _log_t_tail
from moeaudit.stats._equivalence import d_z_se

# --- TOST ---------------------------------------------------------------------------------------------------


def test_tost_by_hand_for_independent_positions():
    rng = np.random.default_rng(0)
    d = rng.gamma(2.0, 1.0, 150) - 2.0 + 0.05  # skewed
    n = d.size
    est = d.mean() / d.std(ddof=1)
    m = d - d.mean()
    skew, kurt = np.mean(m**3) / np.mean(m**2) ** 1.5, np.mean(m**4) / np.mean(m**2) ** 2
    # the delta-method variance of d_z for non-normal data (skewness, kurtosis), up to O(1/n) terms
    se = math.sqrt((1 + est**2 * (kurt - 1) / 4 - est * skew) / n)
    assert d_z_se(d, np.arange(n), n) == pytest.approx(se, rel=2e-2)
    res = tost_d(d, sesoi_d=0.3)
    p_lower = sps.t.sf((est + 0.3) / res.se, n - 1)
    p_upper = sps.t.cdf((est - 0.3) / res.se, n - 1)
    assert (res.p_lower, res.p_upper, res.p) == pytest.approx((p_lower, p_upper, max(p_lower, p_upper)), rel=1e-9)
    assert res.df == n - 1


def test_tost_se_normal_data_is_the_textbook_variance_of_d():
    rng = np.random.default_rng(1)
    d = rng.normal(0.3, 1.0, 4000)
    est = d.mean() / d.std(ddof=1)
    assert d_z_se(d, np.arange(d.size), d.size) == pytest.approx(math.sqrt((1 + est**2 / 2) / d.size), rel=0.05)


def test_tost_is_calibrated_at_the_equivalence_bound_with_clustering():
    """True d exactly at the bound (0.2), ICC 0.3 in documents of 4, heavy tails: TOST must not claim
    equivalence more than alpha of the time. At d = 0 with enough documents it does claim it."""
    rng = np.random.default_rng(2)

    def draw(shift, n_docs):
        docs = np.repeat(np.arange(n_docs), 4)
        noise = rng.standard_t(5, docs.size) / math.sqrt(5 / 3)
        x = math.sqrt(0.3) * rng.normal(size=n_docs)[docs] + math.sqrt(0.7) * noise
        return shift + x, docs  # sd(x) = 1: d_z = shift

    draws = 400
    at_bound = sum(tost_d(*draw(0.2, 60), sesoi_d=0.2).p < 0.05 for _ in range(draws))
    assert at_bound / draws <= 0.075  # binomial 99% upper band of 5% over 400 draws is ~0.078
    at_zero = sum(tost_d(*draw(0.0, 300), sesoi_d=0.2).p < 0.05 for _ in range(100))
    assert at_zero / 100 > 0.8


def test_tost_degenerate_and_bad_input():
    assert np.isnan(tost_d(np.ones(5)).p)
    with pytest.raises(ValueError, match="sesoi_d must be a positive number"):
        tost_d([1.0, 2.0, 3.0], sesoi_d=0)


# --- minimum detectable effect ------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "m"), [(200, 32), (100, 20), (500, 8)])
def test_mde_of_the_mean_test_equals_statsmodels_noncentral_t(n, m):
    from statsmodels.stats.power import TTestPower

    expected = TTestPower().solve_power(nobs=n, alpha=0.05 / m, power=0.8, alternative="two-sided")
    assert minimum_detectable_d(n, m, rule="mean") == pytest.approx(expected, rel=1e-5)


def test_mde_of_the_decision_rule_by_simulation():
    """At n = 200 and 32 cells the rule needs d ~ 0.29 (the issue's figure); simulating the rule (t-test and
    Wilcoxon both below alpha / 32, same direction) on normal D at that d detects it 80% of the time."""
    mde = minimum_detectable_d(200, 32)
    assert 0.285 < mde < 0.30 and mde > minimum_detectable_d(200, 32, rule="mean")
    rng = np.random.default_rng(3)
    draws = 400
    hits = 0
    for _ in range(draws):
        d = rng.normal(mde, 1.0, 200)
        t = sps.ttest_1samp(d, 0)
        w = sps.wilcoxon(d)
        hits += (t.pvalue < 0.05 / 32) and (w.pvalue < 0.05 / 32) and t.statistic > 0
    assert abs(hits / draws - 0.8) < 0.065  # binomial 99% band over 400 draws: +-0.052, plus approximation
    assert minimum_detectable_d(200, 32, design_effect=2.0) == pytest.approx(math.sqrt(2) * mde, rel=0.03)


def test_mde_bad_input():
    with pytest.raises(ValueError, match="rule 'both' is not one of"):
        minimum_detectable_d(200, 32, rule="both")
    with pytest.raises(ValueError, match="at least 2 effective positions"):
        minimum_detectable_d(3, 4, design_effect=2.0)


# --- one-sided JZS Bayes factor ------------------------------------------------------------------------------


def _brute_force_bf_plus0(t: float, n: int, rs) -> list[float]:
    """2 * integral over delta > 0 of the noncentral t likelihood times the Cauchy prior, over the central t
    density (Morey & Wagenmakers 2014's definition), by Simpson's rule on a fine grid of delta."""
    from scipy.integrate import simpson

    delta = np.linspace(0.0, 5.0, 10_001)
    likelihood = sps.nct.pdf(t, n - 1, np.sqrt(n) * delta) / sps.t.pdf(t, n - 1)
    return [float(simpson(likelihood * 2 * sps.cauchy.pdf(delta, scale=r), x=delta)) for r in rs]


@pytest.mark.parametrize(("t", "n"), [(2.0, 200), (0.3, 50), (4.1, 10), (-2.5, 30), (12.0, 200)])
def test_one_sided_bf_against_pingouin_and_brute_force(t, n):
    rs = (0.2, 0.5, JZS_PRIOR_SCALE)
    for r, brute in zip(rs, _brute_force_bf_plus0(t, n, rs)):
        plus = jzs_bf_one_sided(t, n, r, direction=1)
        minus = jzs_bf_one_sided(t, n, r, direction=-1)
        assert (plus + minus) / 2 == pytest.approx(jzs_bf10(t, n, r), rel=1e-8)  # pingouin's two-sided BF10
        assert plus == pytest.approx(brute, rel=1e-6)
        assert bf0plus(t, n, r) == pytest.approx(1 / plus, rel=1e-12)


def test_one_sided_bf_far_tail_and_symmetry():
    # t = -60 with n = 2000: scipy's log t CDF underflows; the continued fraction keeps it (mpmath: 0.0019839970990)
    assert jzs_bf_one_sided(-60.0, 2000, 0.2) == pytest.approx(0.001983997099083155, rel=1e-9)
    assert jzs_bf_one_sided(60.0, 2000, 0.2, direction=-1) == jzs_bf_one_sided(-60.0, 2000, 0.2)
    assert bf0plus(0.0, 100) == pytest.approx(1 / jzs_bf10(0.0, 100), rel=1e-8)  # t = 0: both sides equal BF10
    assert bf0plus(60.0, 2000) == 0.0  # BF+0 overflows: no evidence for the null at all
    x = np.array([-1.5, -10.0, -40.0])
    np.testing.assert_allclose(_log_t_tail(x, 30.0), sps.t.logcdf(x, 30.0), rtol=1e-12)
    assert _log_t_cdf(np.array([-60.0]), 2000.0)[0] == pytest.approx(-1034.1182928762435, rel=1e-12)  # mpmath
    with pytest.raises(ValueError, match="direction must be 1"):
        jzs_bf_one_sided(1.0, 10, direction=0)


def test_one_sided_bf_under_a_known_null_and_a_planted_effect():
    """No effect: BF0+ favours the null (median well above 3 at n = 200, r = 0.707). A planted d = 0.3: BF0+
    far below 1/3. A planted negative effect: BF0+ larger still (evidence against a positive effect)."""
    rng = np.random.default_rng(4)

    def median_bf(shift):
        return np.median([bf0plus(sps.ttest_1samp(rng.normal(shift, 1.0, 200), 0).statistic, 200)
                          for _ in range(60)])

    null, planted, negative = median_bf(0.0), median_bf(0.3), median_bf(-0.3)
    assert null > 3 and planted < 1 / 30 and negative > null


# --- the decision rule --------------------------------------------------------------------------------------


def test_decide_requires_every_test_and_one_direction():
    # 4 cells -> Bonferroni level 0.0125
    mean = Criterion("mean", np.array([0.001, 0.001, 0.001, 0.2]), np.array([1.0, 1.0, -1.0, 1.0]))
    rank = Criterion("rank", np.array([0.002, 0.05, 0.001, 0.001]), np.array([1.0, 1.0, 1.0, 1.0]))
    res = decide([mean, rank])
    np.testing.assert_array_equal(res.significant, [True, False, False, False])
    np.testing.assert_array_equal(res.direction, [1, 0, 0, 0])
    assert res.reason[1] == "rank: p = 0.05 does not survive bonferroni correction (m = 4)"
    assert res.reason[2] == "directions disagree (mean -, rank +)"
    assert res.reason[3].startswith("mean: p = 0.2")
    assert res.alpha_corrected == 0.0125
    nan = decide([Criterion("mean", np.array([np.nan, 0.001]), np.array([1.0, -1.0]))])
    assert nan.reason[0] == "mean: p undefined" and nan.direction[1] == -1


def test_significant_both_with_directions():
    # the case: d > 0 with p_t = 3e-4 but Wilcoxon p = 3e-14 the other way -> not significant
    assert significant_both([3e-4], [3e-14]).tolist() == [True]
    assert significant_both([3e-4], [3e-14], sign_t=[1.0], sign_w=[-1.0]).tolist() == [False]
    with pytest.raises(ValueError, match="give both sign_t and sign_w"):
        significant_both([0.1], [0.1], sign_t=[1.0])
