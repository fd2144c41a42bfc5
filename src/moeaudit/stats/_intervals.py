"""Interval estimates of one audit cell: d_z by a (cluster) BCa bootstrap, and the Hodges-Lehmann estimate of the
typical D with the interval that inverts the document-clustered signed-rank test."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as _sps

from moeaudit.stats._checks import _check_ci, _finite_1d, _groups

# Bootstrap replicates are evaluated in blocks so memory stays ~32 MB whatever n is.
_BLOCK_ELEMENTS = 1 << 22
# D whose spread is below this fraction of its magnitude is constant up to rounding: d_z is not defined.
NEAR_CONSTANT = 1e-12


@dataclass(frozen=True)
class HodgesLehmann:
    """Result of :func:`hodges_lehmann`: the estimate and its interval (same unit as the data, e.g. nats)."""

    estimate: float
    ci_low: float
    ci_high: float


def near_constant(values: np.ndarray) -> bool:
    """True when the spread of ``values`` is below :data:`NEAR_CONSTANT` times their largest magnitude (exactly
    constant included): a standardised effect of such data is rounding noise divided by rounding noise."""
    spread = float(np.ptp(values)) if values.size else 0.0
    return spread <= NEAR_CONSTANT * float(np.max(np.abs(values), initial=0.0))


def d_z(diff: np.ndarray) -> float:
    """mean / sd (ddof=1); NaN for near-constant input (see :func:`near_constant`)."""
    if near_constant(diff):
        return float("nan")
    return float(np.mean(diff) / np.std(diff, ddof=1))


def bootstrap_d_z(diff: np.ndarray, groups: np.ndarray, n_boot: int, seed) -> np.ndarray:
    """d_z of ``n_boot`` resamples of whole groups (a group per position gives the ordinary bootstrap); NaN for a
    resample whose D has (near) zero spread. Works on per-group sufficient statistics (count, sum and sum of
    squares about the overall mean, min, max), so a resample costs O(groups), not O(positions)."""
    n_groups = int(groups.max()) + 1
    rng = np.random.default_rng(seed)
    center = float(diff.mean())
    dev = diff - center
    count = np.bincount(groups, minlength=n_groups).astype(float)
    s1 = np.bincount(groups, weights=dev, minlength=n_groups)
    s2 = np.bincount(groups, weights=dev * dev, minlength=n_groups)
    g_max = np.full(n_groups, -np.inf)
    g_min = np.full(n_groups, np.inf)
    np.maximum.at(g_max, groups, diff)
    np.minimum.at(g_min, groups, diff)
    scale = float(np.max(np.abs(diff), initial=0.0))
    out = np.empty(n_boot)
    block = max(1, _BLOCK_ELEMENTS // n_groups)
    for start in range(0, n_boot, block):
        stop = min(n_boot, start + block)
        rows = stop - start
        # how many times each group is drawn in each resample
        draws = rng.integers(0, n_groups, size=(rows, n_groups)) + n_groups * np.arange(rows)[:, None]
        w = np.bincount(draws.ravel(), minlength=rows * n_groups).reshape(rows, n_groups).astype(float)
        total = w @ count
        mean_dev = (w @ s1) / total
        var = (w @ s2 - total * mean_dev**2) / (total - 1.0)
        picked = w > 0
        spread = np.where(picked, g_max, -np.inf).max(axis=1) - np.where(picked, g_min, np.inf).min(axis=1)
        ok = (spread > NEAR_CONSTANT * scale) & (total > 1) & (var > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[start:stop] = np.where(ok, (center + mean_dev) / np.sqrt(var), np.nan)
    return out


def bca_interval(estimate: float, boot: np.ndarray, jackknife: np.ndarray, ci: float) -> tuple[float, float]:
    r"""Bias-corrected and accelerated (BCa) bootstrap interval (Efron 1987; Efron & Tibshirani 1993, ch. 14).

    .. math::

        z_0 = \Phi^{-1}\bigl(\#\{\theta^* < \hat\theta\} / B\bigr), \qquad
        a = \frac{\sum_g (\bar\theta_{(\cdot)} - \theta_{(g)})^3}
                 {6 \bigl[\sum_g (\bar\theta_{(\cdot)} - \theta_{(g)})^2\bigr]^{3/2}}, \qquad
        \alpha_{1,2} = \Phi\Bigl(z_0 + \frac{z_0 + z_{\alpha/2,\,1-\alpha/2}}
                                      {1 - a (z_0 + z_{\alpha/2,\,1-\alpha/2})}\Bigr),

    the interval being the :math:`\alpha_1` and :math:`\alpha_2` quantiles of the replicates :math:`\theta^*`
    (ties with :math:`\hat\theta` count one half in :math:`z_0`). ``jackknife`` holds the leave-one-out estimates
    :math:`\theta_{(g)}`, leaving out one resampling unit (one document for the cluster bootstrap). Falls back to
    the percentile interval when :math:`z_0` is infinite (every replicate on one side) or the jackknife is
    degenerate. NaN replicates are dropped; NaN when none is left.
    """
    boot = boot[np.isfinite(boot)]
    if not boot.size or not np.isfinite(estimate):
        return float("nan"), float("nan")
    alphas = np.array([(1 - ci) / 2, (1 + ci) / 2])
    share = (np.sum(boot < estimate) + 0.5 * np.sum(boot == estimate)) / boot.size
    jackknife = jackknife[np.isfinite(jackknife)]
    dev = jackknife.mean() - jackknife if jackknife.size else jackknife
    denom = 6.0 * np.sum(dev**2) ** 1.5
    if 0.0 < share < 1.0 and denom > 0:
        z0 = _sps.norm.ppf(share)
        acc = np.sum(dev**3) / denom
        z = _sps.norm.ppf(alphas)
        alphas = _sps.norm.cdf(z0 + (z0 + z) / (1.0 - acc * (z0 + z)))
    low, high = np.quantile(boot, alphas)
    return float(low), float(high)


def jackknife_d_z(diff: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """d_z with each group left out in turn (vectorised through per-group sums)."""
    n_groups = int(groups.max()) + 1
    count = np.bincount(groups, minlength=n_groups).astype(float)
    s1 = np.bincount(groups, weights=diff, minlength=n_groups)
    center = diff.mean()  # centring keeps the sums of squares accurate
    s2 = np.bincount(groups, weights=(diff - center) ** 2, minlength=n_groups)
    sc = np.bincount(groups, weights=diff - center, minlength=n_groups)
    n = count.sum() - count
    mean_c = (sc.sum() - sc) / np.where(n > 0, n, 1)  # mean - center without group g
    ss = (s2.sum() - s2) - n * mean_c**2
    with np.errstate(divide="ignore", invalid="ignore"):
        out = ((s1.sum() - s1) / n) / np.sqrt(ss / (n - 1))
    return np.where((n > 1) & (ss > 0), out, np.nan)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as ``scipy.stats.rankdata``, without its overhead)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    first = np.r_[True, ordered[1:] != ordered[:-1]]
    tie_group = np.cumsum(first) - 1
    counts = np.bincount(tie_group)
    average = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = np.empty(values.size)
    ranks[order] = average[tie_group]
    return ranks


def _signed_rank_z(diff: np.ndarray, groups: np.ndarray, n_groups: int) -> float:
    """Sum of the per-cluster signed-rank sums over the root of their sum of squares (the normal approximation to
    the document-level sign-flip distribution of W+ - W-); 0 when every difference is zero."""
    nonzero = diff != 0
    if not nonzero.any():
        return 0.0
    ranks = np.zeros_like(diff)
    ranks[nonzero] = average_ranks(np.abs(diff[nonzero]))
    sums = np.bincount(groups, weights=np.sign(diff) * ranks, minlength=n_groups)
    return float(sums.sum() / np.sqrt(np.sum(sums**2)))


def hodges_lehmann(diff, clusters=None, *, ci: float = 0.95) -> HodgesLehmann:
    r"""Hodges-Lehmann estimate of the typical paired difference, with the interval from inverting the
    document-clustered signed-rank test.

    .. math::

        \hat\theta_{HL} = \operatorname{median}\{(D_i + D_j)/2 : i \le j\},

    the median of the Walsh averages, i.e. the shift :math:`\theta` at which the signed-rank statistic of
    :math:`D - \theta` is zero (Hodges & Lehmann 1963). Estimand: the pseudo-median of D (the centre of symmetry
    when D is symmetric): what happens to a typical token, as opposed to the mean, which a few extreme tokens can
    dominate. The interval is :math:`\{\theta : |Z(\theta)| \le z_{1-\alpha/2}\}` with
    :math:`Z(\theta) = \sum_g R_g(\theta) / \sqrt{\sum_g R_g(\theta)^2}` and :math:`R_g(\theta)` the sum of the
    signed ranks of :math:`D - \theta` in cluster g: the normal approximation to the document-level sign-flip
    distribution of the signed-rank statistic (Rosner, Glynn & Lee 2006). Its endpoints are Walsh averages, found
    by bisection. With every position its own cluster it is the large-sample distribution-free interval of
    Hollander & Wolfe (1999, section 3.3). Unit of inference: the document.

    Returns
    -------
    HodgesLehmann
        Endpoints are -inf / +inf when the test cannot reject any shift on that side (too few clusters:
        :math:`|Z| \le \sqrt{G}`); the interval is NaN for constant D or a single value.

    References
    ----------
    Hodges, J. L., & Lehmann, E. L. (1963). Estimates of location based on rank tests. Ann. Math. Statist., 34,
    598-611.
    Hollander, M., & Wolfe, D. A. (1999). Nonparametric Statistical Methods (2nd ed.). Wiley.
    Rosner, B., Glynn, R. J., & Lee, M.-L. T. (2006). The Wilcoxon signed rank test for paired comparisons of
    clustered data. Biometrics, 62, 185-192.
    """
    d = _finite_1d("diff", diff, min_n=1)
    groups, n_groups = _groups(clusters, d.size, min_clusters=1)
    _check_ci(ci, 1)
    i, j = np.triu_indices(d.size)
    walsh = np.sort((d[i] + d[j]) / 2.0)
    estimate = float(np.median(walsh))
    crit = float(_sps.norm.ppf((1 + ci) / 2))

    def rejects_low(k: int) -> bool:  # shifts inside (walsh[k], walsh[k + 1]) are rejected as too small
        return _signed_rank_z(d - 0.5 * (walsh[k] + walsh[k + 1]), groups, n_groups) > crit

    def rejects_high(k: int) -> bool:
        return _signed_rank_z(d - 0.5 * (walsh[k] + walsh[k + 1]), groups, n_groups) < -crit

    last = walsh.size - 2  # gaps between consecutive Walsh averages: 0 .. last
    if last < 0 or np.ptp(d) == 0:  # constant D: no rank information, the interval is not defined
        return HodgesLehmann(estimate, float("nan"), float("nan"))
    center = int(np.searchsorted(walsh, estimate))
    low = _boundary(rejects_low, 0, min(max(center - 1, 0), last), from_left=True)
    high = _boundary(rejects_high, max(min(center, last), 0), last, from_left=False)
    ci_low = -np.inf if low is None else float(walsh[low + 1])
    ci_high = np.inf if high is None else float(walsh[high])
    return HodgesLehmann(estimate, ci_low, ci_high)


def _boundary(rejects, lo: int, hi: int, *, from_left: bool) -> int | None:
    """The gap index where rejection ends: for ``from_left`` the last gap in [lo, hi] that still rejects (gaps
    left of it reject too), else the first gap that rejects (gaps right of it reject too). None when no gap does."""
    if from_left:
        if not rejects(lo):
            return None
        while lo < hi:  # invariant: rejects(lo)
            mid = (lo + hi + 1) // 2
            if rejects(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo
    if not rejects(hi):
        return None
    while lo < hi:  # invariant: rejects(hi)
        mid = (lo + hi) // 2
        if rejects(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi
