"""Rank correlations: Spearman, the sign test, Kendall tau-b with a bootstrap interval."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as _sps

from moeaudit.stats._checks import _check_ci, _finite_1d, _same_length


@dataclass(frozen=True)
class KendallTauCI:
    """Result of :func:`kendall_tau_ci`: tau-b, its two-sided p-value and a percentile bootstrap interval."""

    n: int
    tau: float
    p: float
    ci_low: float
    ci_high: float


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
