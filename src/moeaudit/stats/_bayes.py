"""JZS Bayes factors of the one-sample t-test on D: two-sided (pingouin) and one-sided (numerical integration)."""

from __future__ import annotations

import math

import numpy as np
from scipy import integrate as _integrate
from scipy import special as _special

JZS_PRIOR_SCALE = float(np.sqrt(2.0) / 2.0)
"""Prior scale of the JZS Bayes factor ("medium", the BayesFactor / JASP default)."""
PRIOR_SCALES: tuple[float, ...] = (0.2, 0.5, JZS_PRIOR_SCALE)
"""Prior scales of the sensitivity analysis of the one-sided Bayes factor (``bf0plus_r02``, ``bf0plus_r05``,
``bf0plus`` at r = sqrt(2)/2)."""


def jzs_bf10(t: float, n: int, r: float = JZS_PRIOR_SCALE) -> float:
    """Two-sided JZS BF10 of a one-sample (paired) t statistic, by ``pingouin.bayesfactor_ttest``; ``inf`` where
    pingouin's null density underflows (astronomical evidence for an effect)."""
    from pingouin import bayesfactor_ttest  # heavy import (pulls in matplotlib), keep it lazy

    try:
        return float(bayesfactor_ttest(t, nx=n, paired=True, r=r))
    except ZeroDivisionError:
        return float("inf")


def _log_t_tail(x: np.ndarray, df: float) -> np.ndarray:
    """log P(T_df <= x) for x < -1 as log(I_z(df/2, 1/2) / 2), z = df / (df + x^2), by the continued fraction of
    the incomplete beta function (Numerical Recipes, 3rd ed., section 6.4; it converges fast for x < -1)."""
    a, b = df / 2.0, 0.5
    z = df / (df + np.asarray(x, dtype=float) ** 2)
    tiny = 1e-300
    c = np.ones_like(z)
    d = 1.0 - (a + b) * z / (a + 1.0)
    d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
    h = d.copy()
    for m in range(1, 500):
        for num in (m * (b - m) * z / ((a - 1.0 + 2 * m) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * z / ((a + 2 * m) * (a + 1.0 + 2 * m))):
            d = 1.0 + num * d
            d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
            c = 1.0 + num / c
            c = np.where(np.abs(c) < tiny, tiny, c)
            step = d * c
            h = h * step
        if np.all(np.abs(step - 1.0) < 1e-15):
            break
    log_front = a * np.log(z) + b * np.log1p(-z) - _special.betaln(a, b) - math.log(a)
    return log_front + np.log(h) - math.log(2.0)


def _log_t_cdf(x: np.ndarray, df: float) -> np.ndarray:
    """log P(T_df <= x), accurate far into the lower tail where the log of ``scipy.special.stdtr`` (as
    ``scipy.stats.t.logcdf``) underflows to -inf: there :func:`_log_t_tail`."""
    x = np.asarray(x, dtype=float)
    with np.errstate(divide="ignore"):
        out = np.log(_special.stdtr(df, x))
    far = (x < -1.0) & (out < -600.0)
    if far.any():
        out[far] = _log_t_tail(x[far], df)
    return out


def _log_integrand(log_g: np.ndarray, t: float, n: int, r: float, direction: int) -> np.ndarray:
    """log of the one-sided BF integrand in u = log g (the Jacobian g included)."""
    nu = n - 1.0
    g = np.exp(log_g)
    a = 1.0 + n * g * r * r
    log_prior = -0.5 * math.log(2 * math.pi) - 1.5 * log_g - 0.5 / g  # g ~ inverse-gamma(1/2, 1/2)
    log_ratio = -0.5 * np.log(a) - 0.5 * (nu + 1.0) * (np.log1p(t * t / (a * nu)) - math.log1p(t * t / nu))
    x = direction * t * np.sqrt((1.0 - 1.0 / a) / nu) * np.sqrt((nu + 1.0) / (1.0 + t * t / (a * nu)))
    return log_prior + log_ratio + math.log(2.0) + _log_t_cdf(x, nu + 1.0) + log_g


def jzs_bf_one_sided(t: float, n: int, r: float = JZS_PRIOR_SCALE, *, direction: int = 1) -> float:
    r"""One-sided JZS Bayes factor BF+0 (``direction=1``: effect > 0 against none) or BF-0 (``direction=-1``).

    The alternative puts a half-Cauchy prior of scale r on the standardised effect :math:`\delta = \mu/\sigma`
    (the Cauchy of the two-sided test folded onto the tested side, density doubled); the Jeffreys prior on
    :math:`\sigma`. Writing the Cauchy as a scale mixture, :math:`\delta \mid g \sim N(0, g r^2)` with
    :math:`g \sim \text{Inv-Gamma}(1/2, 1/2)`, the integral over :math:`\delta > 0` and :math:`\sigma` is closed
    form given g, and

    .. math::

        BF_{+0} = \int_0^\infty 2\, T_{\nu+1}\bigl(x(g)\bigr)\, (1 + n g r^2)^{-1/2}
        \left(\frac{1 + t^2 / (\nu (1 + n g r^2))}{1 + t^2/\nu}\right)^{-(\nu+1)/2}
        \frac{g^{-3/2} e^{-1/(2g)}}{\sqrt{2\pi}}\,dg, \qquad
        x(g) = t \sqrt{\frac{n g r^2}{\nu (1 + n g r^2)}} \sqrt{\frac{\nu + 1}{1 + t^2/(\nu (1 + n g r^2))}},

    with :math:`\nu = n - 1` and :math:`T_{\nu+1}` the Student t distribution function: Rouder et al.'s (2009)
    two-sided integrand times twice the posterior probability that :math:`\delta > 0` given g. Hence
    :math:`(BF_{+0} + BF_{-0}) / 2 = BF_{10}`. Integrated over :math:`\log g` by adaptive quadrature in log space
    (``scipy.integrate.quad``), so huge |t| neither overflows nor underflows before the final exponent.
    Equivalent to :math:`2\int_0^\infty f_{\nu,\sqrt n \delta}(t)\,\mathrm{Cauchy}(\delta; r)\,d\delta / f_\nu(t)`
    with the noncentral t density (Morey & Wagenmakers 2014), which the tests integrate by brute force.

    Returns
    -------
    float
        BF+0 (or BF-0); ``inf`` when it overflows, 0 when it underflows.

    References
    ----------
    Rouder, J. N., Speckman, P. L., Sun, D., Morey, R. D., & Iverson, G. (2009). Bayesian t tests for
    accepting and rejecting the null hypothesis. Psychon. Bull. Rev., 16, 225-237.
    Morey, R. D., & Wagenmakers, E.-J. (2014). Simple relation between Bayesian order-restricted and
    point-null hypothesis tests. Stat. Probab. Lett., 92, 121-124.
    """
    if direction not in (1, -1):
        raise ValueError(f"direction must be 1 (effect > 0) or -1 (effect < 0), got {direction!r}.")
    if not (math.isfinite(t) and n >= 2 and r > 0):
        raise ValueError(f"need a finite t, n >= 2 and r > 0; got t={t!r}, n={n!r}, r={r!r}.")
    coarse = np.linspace(-30.0, 30.0, 301)
    values = _log_integrand(coarse, t, n, r, direction)
    shift = float(np.max(values))
    # the integrand is smooth and unimodal in log g: integrate where it is within e^-60 of its peak, finely
    inside = np.flatnonzero(values > shift - 60.0)
    lo, hi = coarse[max(inside[0] - 1, 0)], coarse[min(inside[-1] + 1, coarse.size - 1)]
    fine = np.linspace(lo, hi, 1501)
    total = float(_integrate.simpson(np.exp(_log_integrand(fine, t, n, r, direction) - shift), x=fine))
    if total <= 0:
        return 0.0
    log_bf = shift + math.log(total)
    return math.exp(log_bf) if log_bf < 709.0 else float("inf")


def bf0plus(t: float, n: int, r: float = JZS_PRIOR_SCALE) -> float:
    """1 / BF+0: the evidence for no effect over a positive effect of the prior's size (scale r)."""
    bf = jzs_bf_one_sided(t, n, r, direction=1)
    return float("inf") if bf == 0 else 1.0 / bf
