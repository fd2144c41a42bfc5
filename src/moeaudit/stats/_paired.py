"""The paired comparison of one audit cell: t-test, Wilcoxon, document-clustered sign-flip tests, d_z with a BCa
(cluster) bootstrap interval, the Hodges-Lehmann estimate, TOST equivalence and JZS Bayes factors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as _sps

from moeaudit.stats._bayes import JZS_PRIOR_SCALE, bf0plus, jzs_bf10
from moeaudit.stats._checks import _check_ci, _finite_1d, _groups, _same_length
from moeaudit.stats._equivalence import SESOI_D, tost_d
from moeaudit.stats._intervals import bca_interval, bootstrap_d_z, d_z, hodges_lehmann, jackknife_d_z
from moeaudit.stats._signflip import N_PERM, clustered_tests


@dataclass(frozen=True)
class PairedTest:
    """Result of :func:`paired_test` on D = high - low (one row of an audit table).

    Attributes
    ----------
    n, n_clusters : int
        Pairs, and clusters (documents; n when no clusters are given).
    mean_diff, sd_diff : float
        Mean and sample standard deviation (ddof=1) of D.
    cohens_d : float
        d_z = mean(D) / sd(D); NaN when D is (near) constant (``note`` says so).
    ci_low, ci_high : float
        BCa bootstrap interval of d_z.
    ci_method : str
        ``"bca_bootstrap"`` (positions resampled) or ``"bca_cluster_bootstrap"`` (clusters resampled).
    t_stat, p_t : float
        Paired t statistic and two-sided p-value, positions treated as independent; NaN when D is constant.
    w_stat, p_wilcoxon : float
        Wilcoxon signed-rank statistic min(W+, W-) and two-sided p-value, positions treated as independent;
        NaN when every D is 0.
    p_cluster : float
        Document-level sign-flip p-value of the mean of D (H0: E[D] = 0).
    p_signrank_cluster : float
        Document-level sign-flip p-value of the signed-rank statistic W+ - W-.
    w_diff : float
        W+ - W-, the direction of the rank test.
    p_sign : float
        Document-level sign-flip p-value of #(D > 0) - #(D < 0) (the sign test of the median of D).
    n_perm : int
        Sign vectors behind those three p-values (all 2**G when ``n_perm`` covers them); a random-draw p-value is
        at least 1 / (n_perm + 1).
    pct_high_larger : float
        100 * mean(D > 0).
    hl_estimate, hl_low, hl_high : float
        Hodges-Lehmann estimate of the typical D (nats) and its interval (inverted clustered signed-rank test);
        an unbounded end is NaN, and ``note`` says why.
    tost_p : float
        TOST p-value of |d_z| < ``sesoi_d`` (document-clustered SE); decide at the family's corrected alpha.
    bf01 : float
        Two-sided JZS Bayes factor of no effect against an effect with a Cauchy(0, sqrt(2)/2) prior on d.
    bf0plus, bf0plus_r02, bf0plus_r05 : float
        One-sided BF0+: no effect against a positive effect, half-Cauchy prior of scale sqrt(2)/2, 0.2, 0.5.
    note : str
        Why a statistic is missing ("" when nothing is).
    """

    n: int
    n_clusters: int
    mean_diff: float
    sd_diff: float
    cohens_d: float
    ci_low: float
    ci_high: float
    ci_method: str
    t_stat: float
    p_t: float
    w_stat: float
    p_wilcoxon: float
    p_cluster: float
    p_signrank_cluster: float
    w_diff: float
    p_sign: float
    n_perm: int
    pct_high_larger: float
    hl_estimate: float
    hl_low: float
    hl_high: float
    tost_p: float
    bf01: float
    bf0plus: float
    bf0plus_r02: float
    bf0plus_r05: float
    note: str


def paired_test(
    high, low, *, clusters=None, n_boot: int = 2000, n_perm: int = N_PERM, ci: float = 0.95,
    sesoi_d: float = SESOI_D, seed=0,
) -> PairedTest:
    r"""Paired comparison of ``high`` and ``low`` (per-position loss changes) on D = high - low.

    .. math::

        \bar D = \frac{1}{n}\sum_t D_t, \qquad s_D = \sqrt{\tfrac{1}{n-1}\sum_t (D_t - \bar D)^2}, \qquad
        d_z = \bar D / s_D, \qquad t = \sqrt{n}\, d_z \sim t_{n-1} \text{ under } H_0.

    Two estimands are reported, because with heavy-tailed D they differ: the **mean** of D (d_z, ``p_t``,
    ``p_cluster``, ``tost_p``, the Bayes factors) and the **typical token** (``pct_high_larger`` with ``p_sign``,
    the Hodges-Lehmann estimate with its interval, the signed-rank tests).

    * Effect size: Cohen's d_z (Cohen 1988, eq. 2.3.5) with a BCa bootstrap interval (:func:`bca_interval`):
      ``n_boot`` resamples of positions with replacement or, with ``clusters``, of whole clusters with all their
      positions, the acceleration from the leave-one-cluster-out jackknife. On heavy-tailed D the percentile
      interval under-covers; BCa covers better (docs: Statistics, Calibration). D whose spread is below 1e-12 of its
      magnitude is treated as constant: d_z, t and the Bayes factors are NaN, and ``note`` says so.
    * Paired t-test: ``scipy.stats.ttest_rel(high, low)``, two-sided; positions treated as independent.
    * Wilcoxon signed-rank test (Wilcoxon 1945): ``scipy.stats.wilcoxon(high, low)`` with scipy's defaults:
      zeros dropped; for n <= 50 without ties or zeros the exact null distribution; for n <= 13 with ties or
      zeros an exact sign-flip permutation test; otherwise the normal approximation with the tie correction of
      the variance and **without** a continuity correction (scipy's ``correction=False`` default; R's
      ``wilcox.test`` applies one, so its p-values are slightly larger there). Positions treated as independent.
    * Document-clustered tests (:func:`clustered_tests`): sign-flip randomisation p-values of the mean
      (``p_cluster``), of W+ - W- (``p_signrank_cluster``) and of the sign statistic (``p_sign``), flipping whole
      clusters, so correlated positions of one document are one unit of evidence. Without ``clusters`` every
      position is its own cluster.
    * Hodges-Lehmann estimate of the typical D with the interval from the clustered signed-rank test
      (:func:`hodges_lehmann`).
    * TOST of :math:`|d_z| < \delta_0` = ``sesoi_d`` with a document-clustered standard error (:func:`tost_d`).
    * JZS Bayes factors (Rouder et al. 2009) of the one-sample t-test on D: the two-sided ``bf01 = 1 / BF10``
      (Cauchy prior scale r = sqrt(2)/2, by ``pingouin.bayesfactor_ttest``) and the one-sided ``bf0plus`` =
      1 / BF+0 against a positive effect (:func:`jzs_bf_one_sided`) at r = sqrt(2)/2, 0.2 and 0.5. A large
      value is evidence against effects of the prior's size, not evidence of no effect at all; they treat
      positions as independent.

    Parameters
    ----------
    high, low : array_like, shape (n,)
        Loss change from ablating the highest- and the lowest-ranked expert at each position.
    clusters : array_like, shape (n,), optional
        Cluster label per position (the document id); the bootstrap, the sign-flip tests, the HL interval and
        TOST then treat documents as the unit of inference.
    n_boot : int
        Bootstrap resamples.
    n_perm : int
        Random sign vectors of the sign-flip tests (all 2**G are enumerated when that is fewer).
    ci : float
        Coverage of the intervals, in (0, 1).
    sesoi_d : float
        Smallest effect of interest of the equivalence test, in units of d_z.
    seed : int, None or numpy.random.SeedSequence
        Seed of the bootstrap and the sign vectors; the result is deterministic for an int.

    Returns
    -------
    PairedTest
        Degenerate input is returned, not raised: when D is (near) constant ``cohens_d``, ``t_stat``, ``p_t``,
        the Bayes factors, ``tost_p`` and the interval are NaN; when every D is zero the rank and sign tests
        are NaN as well.

    Raises
    ------
    ValueError
        Arrays of different lengths or not 1-D, fewer than 3 pairs, non-finite values (count and indices
        named), ``clusters`` of the wrong length or with fewer than 2 clusters, bad ``ci`` / ``n_boot`` /
        ``n_perm`` / ``sesoi_d``.

    References
    ----------
    Cohen, J. (1988). Statistical Power Analysis for the Behavioral Sciences (2nd ed.). Erlbaum.
    Wilcoxon, F. (1945). Individual comparisons by ranking methods. Biometrics Bulletin, 1(6), 80-83.
    Rouder, J. N., Speckman, P. L., Sun, D., Morey, R. D., & Iverson, G. (2009). Bayesian t tests for
    accepting and rejecting the null hypothesis. Psychonomic Bulletin & Review, 16, 225-237.
    Efron, B., & Tibshirani, R. J. (1993). An Introduction to the Bootstrap. Chapman & Hall.
    """
    high = _finite_1d("high", high)
    low = _finite_1d("low", low)
    _same_length("high", high, "low", low)
    _check_ci(ci, n_boot)
    n = high.size
    diff = high - low
    groups, n_groups = _groups(clusters, n, min_clusters=2)
    ci_method = "bca_bootstrap" if clusters is None else "bca_cluster_bootstrap"
    boot_seed, perm_seed = np.random.SeedSequence(seed).spawn(2) if not isinstance(seed, np.random.SeedSequence) \
        else seed.spawn(2)
    nan = float("nan")
    notes = []

    effect = d_z(diff)
    bfs = {"bf01": nan, "bf0plus": nan, "bf0plus_r02": nan, "bf0plus_r05": nan}
    if np.isnan(effect):
        t_stat = p_t = ci_low = ci_high = nan
        if np.any(diff != 0):
            notes.append("D is constant up to 1e-12 of its magnitude: d_z, t, TOST and the Bayes factors are "
                         "undefined")
    else:
        t_res = _sps.ttest_rel(high, low)
        t_stat, p_t = float(t_res.statistic), float(t_res.pvalue)
        bf10 = jzs_bf10(t_stat, n, JZS_PRIOR_SCALE)
        bfs["bf01"] = 1.0 / bf10 if bf10 != 0 else float("inf")
        for key, r in (("bf0plus", JZS_PRIOR_SCALE), ("bf0plus_r02", 0.2), ("bf0plus_r05", 0.5)):
            bfs[key] = bf0plus(t_stat, n, r)
        boot = bootstrap_d_z(diff, groups, n_boot, boot_seed)
        ci_low, ci_high = bca_interval(effect, boot, jackknife_d_z(diff, groups), ci)

    if np.all(diff == 0):
        w_stat = p_w = nan
        notes.append("every D is 0")
    else:
        w_res = _sps.wilcoxon(high, low)
        w_stat, p_w = float(w_res.statistic), float(w_res.pvalue)
    flips = clustered_tests(diff, groups, n_perm=n_perm, seed=perm_seed)
    hl = hodges_lehmann(diff, groups, ci=ci)
    hl_low, hl_high = (v if np.isfinite(v) else nan for v in (hl.ci_low, hl.ci_high))
    if np.isnan(hl_low) != np.isnan(hl.ci_low) or np.isnan(hl_high) != np.isnan(hl.ci_high):
        notes.append(f"the HL interval is unbounded: {n_groups} clusters are too few for the signed-rank test to "
                     "reject any shift at this level")
    tost = tost_d(diff, groups, sesoi_d=sesoi_d)

    return PairedTest(
        n=n, n_clusters=n_groups, mean_diff=float(np.mean(diff)), sd_diff=float(np.std(diff, ddof=1)),
        cohens_d=effect, ci_low=ci_low, ci_high=ci_high, ci_method=ci_method, t_stat=t_stat, p_t=p_t,
        w_stat=w_stat, p_wilcoxon=p_w, p_cluster=flips.p_mean, p_signrank_cluster=flips.p_signrank,
        w_diff=flips.w_diff, p_sign=flips.p_sign, n_perm=flips.n_perm, pct_high_larger=float(100.0 * np.mean(diff > 0)),
        hl_estimate=hl.estimate, hl_low=hl_low, hl_high=hl_high, tost_p=tost.p, **bfs,
        note="; ".join(notes),
    )
