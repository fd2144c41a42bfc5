"""Paired tests, effect sizes, bootstrap intervals, multiple-comparison corrections and Bayes factors (pure: arrays in, values out)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as _sps

from moeaudit.errors import did_you_mean

__all__ = [
    "CORRECTION_METHODS",
    "CorrectionResult",
    "KendallTauCI",
    "PairedTest",
    "correct",
    "fisher_z",
    "kendall_tau_ci",
    "paired_test",
    "sign_test",
    "significant_both",
    "spearman",
]

#: Prior scale of the JZS Bayes factor ("medium", the BayesFactor / JASP default).
JZS_PRIOR_SCALE = float(np.sqrt(2.0) / 2.0)

#: Multiple-comparison methods accepted by :func:`correct`.
CORRECTION_METHODS = ("bonferroni", "holm", "fdr_bh")

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


@dataclass(frozen=True)
class CorrectionResult:
    """Result of :func:`correct`.

    Attributes
    ----------
    reject : ndarray of bool, shape (m,)
        True where the null is rejected at family level ``alpha``; always False for a NaN p-value.
    p_corrected : ndarray of float, shape (m,)
        Adjusted p-values (NaN where the input was NaN).
    alpha_corrected : float
        alpha / m, the Bonferroni per-test threshold. For ``holm`` and ``fdr_bh`` it is only the threshold
        of their most stringent step; decide with ``reject``.
    method : str
    alpha : float
    m : int
        Family size, NaN p-values included.
    """

    reject: np.ndarray
    p_corrected: np.ndarray
    alpha_corrected: float
    method: str
    alpha: float
    m: int


@dataclass(frozen=True)
class KendallTauCI:
    """Result of :func:`kendall_tau_ci`: tau-b, its two-sided p-value and a percentile bootstrap interval."""

    n: int
    tau: float
    p: float
    ci_low: float
    ci_high: float


def _finite_1d(name: str, values, *, min_n: int = 3) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}; flatten it or pass one cell at a time.")
    if arr.size < min_n:
        raise ValueError(f"{name} needs at least {min_n} values, got {arr.size}.")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        shown = ", ".join(str(i) for i in bad[:10]) + (", ..." if bad.size > 10 else "")
        raise ValueError(
            f"{name} has {bad.size} non-finite value(s) (NaN or inf) at index {shown}; "
            "drop those positions (from both arrays) before testing."
        )
    return arr


def _same_length(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same length, got {a.size} and {b.size}.")


def _check_ci(ci: float, n_boot: int) -> None:
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci!r}; e.g. 0.95 for a 95% interval.")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}.")


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


def correct(pvalues, method: str = "bonferroni", alpha: float = 0.05) -> CorrectionResult:
    r"""Correct a family of m p-values for multiple comparisons.

    With p-values sorted ascending, p_(1) <= ... <= p_(m):

    * ``bonferroni``: :math:`\tilde p_i = \min(1, m p_i)`; reject when p_i <= alpha / m.
    * ``holm`` (Holm 1979, step-down, controls FWER):
      :math:`\tilde p_{(i)} = \max_{j \le i} \min(1, (m - j + 1) p_{(j)})`.
    * ``fdr_bh`` (Benjamini & Hochberg 1995, step-up, controls FDR for independent or PRDS tests):
      :math:`\tilde p_{(i)} = \min_{j \ge i} \min(1, m p_{(j)} / j)`.

    Computed by ``statsmodels.stats.multitest.multipletests``.

    NaN p-values (a degenerate cell) still count in m and are ranked as p = 1, which is the conservative
    choice for all three methods: the family size stays the one fixed in advance (0.05 / 20 for 20 cells
    even if one cell could not be tested). They come back as NaN in ``p_corrected`` and are never rejected.

    Parameters
    ----------
    pvalues : array_like, shape (m,)
        P-values in [0, 1], NaN allowed.
    method : {"bonferroni", "holm", "fdr_bh"}
    alpha : float
        Family-wise error rate (or false discovery rate for ``fdr_bh``), in (0, 1).

    Returns
    -------
    CorrectionResult

    Raises
    ------
    ValueError
        Unknown method (valid options and the closest match named), empty or non-1-D input, p-values
        outside [0, 1] or infinite, alpha outside (0, 1).

    References
    ----------
    Holm, S. (1979). A simple sequentially rejective multiple test procedure. Scand. J. Statist., 6, 65-70.
    Benjamini, Y., & Hochberg, Y. (1995). Controlling the false discovery rate: a practical and powerful
    approach to multiple testing. J. R. Statist. Soc. B, 57, 289-300.
    """
    if method not in CORRECTION_METHODS:
        raise ValueError(
            f"Unknown correction method {method!r}; valid options: {', '.join(CORRECTION_METHODS)}.{did_you_mean(method, CORRECTION_METHODS)}"
        )
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}.")
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"pvalues must be a non-empty 1-D array, got shape {p.shape}.")
    is_nan = np.isnan(p)
    bad = np.flatnonzero(~is_nan & ~((p >= 0) & (p <= 1)))
    if bad.size:
        raise ValueError(
            f"p-values must lie in [0, 1] (or be NaN); got {p[bad[:5]].tolist()} at index {bad[:5].tolist()}."
        )

    from statsmodels.stats.multitest import multipletests

    m = p.size
    reject, p_corr, _, _ = multipletests(np.where(is_nan, 1.0, p), alpha=alpha, method=method)
    reject = np.asarray(reject, dtype=bool) & ~is_nan
    p_corr = np.where(is_nan, np.nan, np.asarray(p_corr, dtype=float))
    return CorrectionResult(
        reject=reject, p_corrected=p_corr, alpha_corrected=alpha / m, method=method, alpha=alpha, m=m
    )


def significant_both(p_t, p_w, *, method: str = "bonferroni", alpha: float = 0.05) -> np.ndarray:
    """The paper's decision rule: a cell is significant only when its t-test and its Wilcoxon test both survive.

    Each family (t p-values, Wilcoxon p-values) is corrected separately by :func:`correct` with the same
    m = number of cells; the result is the element-wise AND of the two ``reject`` arrays. For Bonferroni
    this is ``(p_t <= alpha / m) & (p_w <= alpha / m)``; NaN in either p-value means not significant.

    Parameters
    ----------
    p_t, p_w : array_like, shape (m,)
        Paired t-test and Wilcoxon p-values, one per cell, in the same order.
    method, alpha
        As in :func:`correct`.

    Returns
    -------
    ndarray of bool, shape (m,)
    """
    p_t = np.asarray(p_t, dtype=float)
    p_w = np.asarray(p_w, dtype=float)
    if p_t.shape != p_w.shape:
        raise ValueError(f"p_t and p_w must have one p-value per cell each, got shapes {p_t.shape} and {p_w.shape}.")
    return correct(p_t, method, alpha).reject & correct(p_w, method, alpha).reject


def spearman(x, y) -> tuple[float, float]:
    r"""Spearman rank correlation and its two-sided p-value, as plain floats.

    :math:`\rho = \mathrm{corr}(\mathrm{rank}(x), \mathrm{rank}(y))` (average ranks for ties), via
    ``scipy.stats.spearmanr`` (p-value from the t distribution with n - 2 df).
    Returns ``(nan, nan)`` without a warning when either input is constant (rho undefined).

    References
    ----------
    Spearman, C. (1904). The proof and measurement of association between two things. Am. J. Psychol., 15, 72-101.
    """
    x = _finite_1d("x", x)
    y = _finite_1d("y", y)
    _same_length("x", x, "y", y)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    res = _sps.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


def fisher_z(r):
    r"""Fisher's variance-stabilising transform of a correlation, :math:`z = \operatorname{artanh}(r)`.

    |r| = 1 is clipped to the largest float below 1 (z ~ +-18.7) so that means of z stay finite;
    NaN passes through. Returns a float for scalar input, an array otherwise.

    Raises
    ------
    ValueError
        If any |r| > 1.

    References
    ----------
    Fisher, R. A. (1921). On the "probable error" of a coefficient of correlation deduced from a small
    sample. Metron, 1, 3-32.
    """
    arr = np.asarray(r, dtype=float)
    if np.any(np.abs(arr) > 1):
        raise ValueError(f"correlations must lie in [-1, 1]; got {arr[np.abs(arr) > 1].ravel()[:5].tolist()}.")
    edge = np.nextafter(1.0, 0.0)
    z = np.arctanh(np.clip(arr, -edge, edge))
    return float(z) if z.ndim == 0 else z


def sign_test(values) -> float:
    r"""Two-sided sign test of H0: P(value > 0) = P(value < 0).

    Zeros are dropped; with k positives out of n' nonzero values the p-value is that of the exact binomial
    test of k ~ Binomial(n', 1/2) (``scipy.stats.binomtest``). NaN when every value is zero.

    References
    ----------
    Conover, W. J. (1999). Practical Nonparametric Statistics (3rd ed.), section 3.4. Wiley.
    """
    arr = _finite_1d("values", values, min_n=1)
    n_pos = int(np.sum(arr > 0))
    n_nonzero = n_pos + int(np.sum(arr < 0))
    if n_nonzero == 0:
        return float("nan")
    return float(_sps.binomtest(n_pos, n_nonzero, 0.5, alternative="two-sided").pvalue)


def _tau_b_rows(a: np.ndarray, b: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Kendall tau-b of every row pair ``(a[i], b[i])``; NaN where a row is constant. Vectorised through pairwise
    sign matrices: sum sign(a_j - a_k) sign(b_j - b_k) over pairs, over the square root of the untied pair counts."""
    out = np.empty(a.shape[0])
    for start in range(0, a.shape[0], chunk):
        x, y = a[start:start + chunk], b[start:start + chunk]
        sx = np.sign(x[:, :, None] - x[:, None, :])
        sy = np.sign(y[:, :, None] - y[:, None, :])
        num = (sx * sy).sum(axis=(1, 2))
        den = np.sqrt(np.abs(sx).sum(axis=(1, 2)) * np.abs(sy).sum(axis=(1, 2)))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:start + chunk] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out


def kendall_tau_ci(a, b, *, n_boot: int = 2000, ci: float = 0.95, seed: int | None = 0) -> KendallTauCI:
    r"""Kendall's tau-b between two scorings of the same items, with a percentile bootstrap interval.

    .. math::

        \tau_b = \frac{n_c - n_d}{\sqrt{(n_0 - n_1)(n_0 - n_2)}}, \qquad n_0 = n(n-1)/2,

    with n_c / n_d the concordant / discordant pairs and n_1, n_2 the pairs tied in a / b
    (``scipy.stats.kendalltau``). The interval resamples items with replacement; resamples where a or b is
    constant are dropped. Use it for ranking stability (e.g. expert scores from two corpora or seeds).
    tau, p and the interval are NaN when a or b is constant.

    References
    ----------
    Kendall, M. G. (1945). The treatment of ties in ranking problems. Biometrika, 33, 239-251.
    """
    a = _finite_1d("a", a)
    b = _finite_1d("b", b)
    _same_length("a", a, "b", b)
    _check_ci(ci, n_boot)
    n = a.size
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        nan = float("nan")
        return KendallTauCI(n=n, tau=nan, p=nan, ci_low=nan, ci_high=nan)
    res = _sps.kendalltau(a, b)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    boot = _tau_b_rows(a[idx], b[idx])
    boot = boot[np.isfinite(boot)]
    lo, hi = (float(q) for q in np.quantile(boot, [(1 - ci) / 2, (1 + ci) / 2])) if boot.size else (np.nan, np.nan)
    return KendallTauCI(n=n, tau=float(res.statistic), p=float(res.pvalue), ci_low=lo, ci_high=hi)
