"""The paired comparison of one audit cell: t-test, Wilcoxon, d_z with a (cluster) bootstrap interval, JZS Bayes
factor."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as _sps

from moeaudit.stats._checks import _check_ci, _finite_1d, _same_length

#: Prior scale of the JZS Bayes factor ("medium", the BayesFactor / JASP default).
JZS_PRIOR_SCALE = float(np.sqrt(2.0) / 2.0)

# Bootstrap replicates are evaluated in blocks so memory stays ~32 MB whatever n is.
_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class PairedTest:
    """Result of :func:`paired_test` on D = high - low (one row of an audit table).

    Attributes
    ----------
    n : int
        Number of pairs.
    mean_diff, sd_diff : float
        Mean and sample standard deviation (ddof=1) of D.
    cohens_d : float
        d_z = mean(D) / sd(D); NaN when sd(D) = 0.
    ci_low, ci_high : float
        Percentile bootstrap interval of d_z.
    ci_method : str
        ``"bootstrap"`` (positions resampled) or ``"cluster_bootstrap"`` (clusters resampled).
    t_stat, p_t : float
        Paired t statistic and two-sided p-value; NaN when sd(D) = 0.
    w_stat, p_wilcoxon : float
        Wilcoxon signed-rank statistic min(W+, W-) and two-sided p-value; NaN when every D is 0.
    bf01 : float
        1 / BF10, the JZS Bayes factor in favour of the null (> 1 favours "no difference").
    pct_high_larger : float
        100 * mean(D > 0).
    """

    n: int
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
    bf01: float
    pct_high_larger: float


def _d_z(diff: np.ndarray) -> float:
    # Exact zero spread is tested directly: sd computed in floating point can be 1e-17 instead of 0.
    if np.ptp(diff) == 0:
        return float("nan")
    return float(np.mean(diff) / np.std(diff, ddof=1))


def _bootstrap_d_z(diff: np.ndarray, groups: np.ndarray, n_boot: int, seed) -> np.ndarray:
    """d_z of ``n_boot`` resamples of whole groups (a group per position gives the ordinary bootstrap)."""
    n_groups = int(groups.max()) + 1
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    block = max(1, _BLOCK_ELEMENTS // diff.size)
    for start in range(0, n_boot, block):
        stop = min(n_boot, start + block)
        # how many times each group is drawn in each resample; a position inherits its group's weight
        rows = stop - start
        draws = rng.integers(0, n_groups, size=(rows, n_groups)) + n_groups * np.arange(rows)[:, None]
        w_group = np.bincount(draws.ravel(), minlength=rows * n_groups).reshape(rows, n_groups)
        w = w_group[:, groups].astype(float)
        total = w.sum(axis=1)
        mean = (w @ diff) / total
        var = (w * (diff[None, :] - mean[:, None]) ** 2).sum(axis=1) / (total - 1.0)
        picked = w > 0
        spread = np.where(picked, diff, -np.inf).max(axis=1) - np.where(picked, diff, np.inf).min(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[start:stop] = np.where((spread > 0) & (total > 1), mean / np.sqrt(var), np.nan)
    return out


def paired_test(
    high, low, *, clusters=None, n_boot: int = 2000, ci: float = 0.95, seed: int | None = 0
) -> PairedTest:
    r"""Paired comparison of ``high`` and ``low`` (per-position loss changes) on D = high - low.

    .. math::

        \bar D = \frac{1}{n}\sum_t D_t, \qquad s_D = \sqrt{\tfrac{1}{n-1}\sum_t (D_t - \bar D)^2}, \qquad
        d_z = \bar D / s_D, \qquad t = \sqrt{n}\, d_z \sim t_{n-1} \text{ under } H_0.

    * Effect size: Cohen's d_z (Cohen 1988, eq. 2.3.5) with a percentile bootstrap interval: ``n_boot``
      resamples of positions with replacement (or, with ``clusters``, of whole clusters with all their
      positions, so that correlated positions within a sequence are not counted as independent evidence);
      the interval is the (1 - ci)/2 and (1 + ci)/2 quantiles of the resampled d_z. Resamples whose D has
      zero spread have no d_z and are dropped from the quantiles.
    * Paired t-test: ``scipy.stats.ttest_rel(high, low)``, two-sided.
    * Wilcoxon signed-rank test (Wilcoxon 1945): ``scipy.stats.wilcoxon(high, low)`` with scipy's defaults
      (zeros dropped; exact null for n <= 50 without ties or zeros, exact sign-flip permutation for n <= 13
      with ties or zeros, otherwise the normal approximation with tie and continuity corrections, which is
      also what R's ``wilcox.test`` does at these sizes).
    * JZS Bayes factor (Rouder et al. 2009) for the one-sample t-test on D, Cauchy prior scale
      r = sqrt(2)/2 on the standardised effect:

      .. math::

          BF_{10} = \frac{\int_0^\infty (1 + n g r^2)^{-1/2}
          \left(1 + \frac{t^2}{(1 + n g r^2)\nu}\right)^{-(\nu+1)/2} (2\pi)^{-1/2} g^{-3/2} e^{-1/(2g)}\,dg}
          {(1 + t^2/\nu)^{-(\nu+1)/2}}, \qquad \nu = n - 1,

      computed by ``pingouin.bayesfactor_ttest`` and reported as ``bf01 = 1 / BF10``.

    Parameters
    ----------
    high, low : array_like, shape (n,)
        Loss change from ablating the highest- and the lowest-ranked expert at each position.
    clusters : array_like, shape (n,), optional
        Cluster label per position (e.g. sequence id); switches the interval to the cluster bootstrap.
    n_boot : int
        Bootstrap resamples.
    ci : float
        Coverage of the interval, in (0, 1).
    seed : int or None
        Seed of the ``numpy.random.Generator`` used for resampling; the result is deterministic for an int.

    Returns
    -------
    PairedTest
        Degenerate input is returned, not raised: when D has zero spread (all equal, e.g. all zero)
        ``cohens_d``, ``t_stat``, ``p_t``, ``bf01`` and the interval are NaN; when every D is zero the
        Wilcoxon statistic and p-value are NaN as well.

    Raises
    ------
    ValueError
        Arrays of different lengths or not 1-D, fewer than 3 pairs, non-finite values (count and indices
        named), ``clusters`` of the wrong length or with fewer than 2 clusters, bad ``ci`` / ``n_boot``.

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

    if clusters is None:
        groups, ci_method = np.arange(n), "bootstrap"
    else:
        labels = np.asarray(clusters)
        if labels.ndim != 1 or labels.size != n:
            raise ValueError(
                f"clusters must give one label per position: expected length {n}, got shape {labels.shape}."
            )
        if labels.dtype.kind == "f" and not np.all(np.isfinite(labels)):
            raise ValueError("clusters contains NaN or inf labels; give every position a cluster id.")
        _, groups = np.unique(labels, return_inverse=True)
        groups = groups.ravel()
        if groups.max() < 1:
            raise ValueError(
                "clusters has a single cluster; the cluster bootstrap needs at least 2 (or pass clusters=None)."
            )
        ci_method = "cluster_bootstrap"

    d_z = _d_z(diff)
    if np.isnan(d_z):
        t_stat = p_t = bf01 = float("nan")
        ci_low = ci_high = float("nan")
    else:
        t_res = _sps.ttest_rel(high, low)
        t_stat, p_t = float(t_res.statistic), float(t_res.pvalue)
        from pingouin import bayesfactor_ttest  # heavy import (pulls in matplotlib), keep it lazy

        try:
            bf10 = float(bayesfactor_ttest(t_stat, nx=n, paired=True, r=JZS_PRIOR_SCALE))
        except ZeroDivisionError:
            # pingouin divides by the null density, which underflows to 0 for huge |t|: BF10 is astronomical
            bf10 = float("inf")
        bf01 = 1.0 / bf10 if bf10 != 0 else float("inf")
        boot = _bootstrap_d_z(diff, groups, n_boot, seed)
        boot = boot[np.isfinite(boot)]
        if boot.size:
            ci_low, ci_high = (float(q) for q in np.quantile(boot, [(1 - ci) / 2, (1 + ci) / 2]))
        else:
            ci_low = ci_high = float("nan")

    if np.all(diff == 0):
        w_stat = p_w = float("nan")
    else:
        w_res = _sps.wilcoxon(high, low)
        w_stat, p_w = float(w_res.statistic), float(w_res.pvalue)

    return PairedTest(
        n=n,
        mean_diff=float(np.mean(diff)),
        sd_diff=float(np.std(diff, ddof=1)),
        cohens_d=d_z,
        ci_low=ci_low,
        ci_high=ci_high,
        ci_method=ci_method,
        t_stat=t_stat,
        p_t=p_t,
        w_stat=w_stat,
        p_wilcoxon=p_w,
        bf01=bf01,
        pct_high_larger=float(100.0 * np.mean(diff > 0)),
    )
