"""Equivalence and power: TOST of |d_z| < SESOI with a document-clustered standard error, and the minimum
detectable d_z of the audit's decision rule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize as _optimize
from scipy import special as _special
from scipy import stats as _sps

from moeaudit.stats._checks import _finite_1d, _groups
from moeaudit.stats._clustered import clustered_mean
from moeaudit.stats._intervals import near_constant

SESOI_D = 0.2
"""Default smallest effect size of interest, in units of d_z (Cohen's "small")."""
#: Asymptotic relative efficiency of the signed-rank test to the t-test for normal data (Hodges & Lehmann 1956).
ARE_NORMAL = 3.0 / math.pi


@dataclass(frozen=True)
class Tost:
    """Result of :func:`tost_d`: both one-sided p-values, their maximum (the TOST p-value) and the clustered SE."""

    p: float
    p_lower: float
    p_upper: float
    se: float
    df: int


def d_z_se(diff: np.ndarray, groups: np.ndarray, n_groups: int) -> float:
    r"""Cluster-robust (sandwich) standard error of d_z = mean(D)/sd(D) from its influence function.

    .. math::

        \psi_i = z_i - \tfrac{d}{2}(z_i^2 - 1), \quad z_i = (D_i - \bar D)/s_D, \qquad
        \widehat{\mathrm{se}}(d)^2 = \frac{G}{G-1} \frac{1}{n^2} \sum_g \Bigl(\sum_{i \in g} \psi_i\Bigr)^2.

    With one position per cluster this is :math:`(1 + d^2(\kappa - 1)/4 - d\gamma)/n` up to the G/(G-1)
    factor (skewness :math:`\gamma`, kurtosis :math:`\kappa`); :math:`(1 + d^2/2)/n` for normal D.
    """
    n = diff.size
    mean, sd = diff.mean(), diff.std(ddof=1)
    z = (diff - mean) / sd
    d = mean / sd
    psi = z - 0.5 * d * (z * z - 1.0)
    sums = np.bincount(groups, weights=psi, minlength=n_groups)
    return float(math.sqrt(n_groups / (n_groups - 1) * np.sum(sums**2)) / n)


def tost_d(diff, clusters=None, *, sesoi_d: float = SESOI_D) -> Tost:
    r"""Two one-sided tests (TOST) of equivalence: H0 :math:`|d_z| \ge \delta_0` against :math:`|d_z| < \delta_0`.

    .. math::

        p_{lower} = 1 - F_{G-1}\Bigl(\frac{d + \delta_0}{\mathrm{se}}\Bigr), \qquad
        p_{upper} = F_{G-1}\Bigl(\frac{d - \delta_0}{\mathrm{se}}\Bigr), \qquad p = \max(p_{lower}, p_{upper}),

    with se the document-clustered standard error of :func:`d_z_se` and :math:`F_{G-1}` the t distribution
    with G - 1 degrees of freedom (G clusters). Reject (claim |d| < :math:`\delta_0`) when p is at most the
    family's corrected alpha (Schuirmann 1987; Lakens 2017). Estimand: the standardised mean d_z = E[D]/sd(D);
    unit of inference: the document. The influence-function SE includes the skewness and kurtosis of D, so heavy
    tails widen it as they widen the sampling distribution of d.

    Parameters
    ----------
    diff : array_like, shape (n,)
        Paired differences D.
    clusters : array_like, shape (n,), optional
        Document per position; ``None``: positions independent.
    sesoi_d : float
        Smallest effect size of interest :math:`\delta_0 > 0` in units of d_z.

    Returns
    -------
    Tost
        p-values NaN when D is (near) constant or there are fewer than 2 clusters.

    References
    ----------
    Schuirmann, D. J. (1987). A comparison of the two one-sided tests procedure and the power approach for
    assessing the equivalence of average bioavailability. J. Pharmacokinet. Biopharm., 15, 657-680.
    Lakens, D. (2017). Equivalence tests: a practical primer for t tests, correlations, and meta-analyses.
    Soc. Psychol. Personal. Sci., 8, 355-362.
    """
    if not (isinstance(sesoi_d, (int, float)) and sesoi_d > 0 and math.isfinite(sesoi_d)):
        raise ValueError(f"sesoi_d must be a positive number (a d_z such as 0.2), got {sesoi_d!r}.")
    d = _finite_1d("diff", diff)
    groups, n_groups = _groups(clusters, d.size, min_clusters=1)
    nan = float("nan")
    if near_constant(d) or n_groups < 2:
        return Tost(nan, nan, nan, nan, max(n_groups - 1, 0))
    est = float(d.mean() / d.std(ddof=1))
    se = d_z_se(d, groups, n_groups)
    df = n_groups - 1
    if se == 0:
        return Tost(nan, nan, nan, se, df)
    p_lower = float(_special.stdtr(df, -(est + sesoi_d) / se))
    p_upper = float(_special.stdtr(df, (est - sesoi_d) / se))
    return Tost(max(p_lower, p_upper), p_lower, p_upper, se, df)


def tost_mean(diff, clusters=None, *, sesoi: float) -> Tost:
    r"""Two one-sided tests (TOST) of equivalence on the raw mean: H0 :math:`|E[D]| \ge \Delta` against
    :math:`|E[D]| < \Delta`, with :math:`\Delta` = ``sesoi`` in the unit of D (e.g. nats of ΔL).

    .. math::

        p_{lower} = 1 - F_{G-1}\Bigl(\frac{\bar D + \Delta}{\mathrm{se}}\Bigr), \qquad
        p_{upper} = F_{G-1}\Bigl(\frac{\bar D - \Delta}{\mathrm{se}}\Bigr), \qquad p = \max(p_{lower}, p_{upper}),

    with se the CR1 cluster-robust standard error of the mean (:func:`~moeaudit.stats.clustered_mean`) and
    :math:`F_{G-1}` the t distribution with G - 1 degrees of freedom. :func:`tost_d`'s test for a bound in the
    data's own unit, where a bound in nats is the claim wanted ("the two arms' mean ΔL differ by less than 0.05
    nats"). Estimand: E[D], the mean over positions; unit of inference: the document.

    Returns
    -------
    Tost
        p-values NaN when D is (near) constant or there are fewer than 2 clusters.
    """
    if isinstance(sesoi, bool) or not (isinstance(sesoi, (int, float)) and sesoi > 0 and math.isfinite(sesoi)):
        raise ValueError(f"sesoi must be a positive number in the unit of diff (e.g. 0.05 nats), got {sesoi!r}.")
    d = _finite_1d("diff", diff)
    groups, n_groups = _groups(clusters, d.size, min_clusters=1)
    nan = float("nan")
    if near_constant(d) or n_groups < 2:
        return Tost(nan, nan, nan, nan, max(n_groups - 1, 0))
    cm = clustered_mean(d, groups)
    df = n_groups - 1
    if not cm.se > 0:
        return Tost(nan, nan, nan, cm.se, df)
    p_lower = float(_special.stdtr(df, -(cm.estimate + sesoi) / cm.se))
    p_upper = float(_special.stdtr(df, (cm.estimate - sesoi) / cm.se))
    return Tost(max(p_lower, p_upper), p_lower, p_upper, cm.se, df)


def design_effect(values, clusters) -> float:
    r"""Design effect of clustering on the mean: the cluster-robust variance estimate of the mean over the one
    that treats positions as independent,

    .. math::

        \text{deff} = \frac{\sum_g \bigl(\sum_{i \in g} (x_i - \bar x)\bigr)^2}{\sum_i (x_i - \bar x)^2}
        \approx 1 + (\bar m_g - 1)\,\mathrm{ICC}

    (Kish 1965), with :math:`\bar m_g` the size-weighted mean cluster size. 1 with one position per cluster;
    below 1 when positions of one document are negatively correlated. NaN for constant values.

    References
    ----------
    Kish, L. (1965). Survey Sampling. Wiley.
    """
    x = _finite_1d("values", values, min_n=2)
    groups, n_groups = _groups(clusters, x.size, min_clusters=1)
    dev = x - x.mean()
    total = float(np.sum(dev**2))
    if total == 0:
        return float("nan")
    return float(np.sum(np.bincount(groups, weights=dev, minlength=n_groups) ** 2) / total)


def _power(d: float, n_eff: float, alpha_test: float, rule: str, are: float) -> float:
    df = max(n_eff - 1.0, 1.0)
    crit_t = _sps.t.ppf(1 - alpha_test / 2, df)
    ncp = math.sqrt(n_eff) * d
    upper = float(_sps.nct.sf(crit_t, df, ncp))
    if rule == "mean":
        lower = float(_sps.nct.cdf(-crit_t, df, ncp))  # NaN where scipy's far tail underflows: it is ~0 there
        return upper + (lower if math.isfinite(lower) else 0.0)
    crit_z = _sps.norm.ppf(1 - alpha_test / 2)
    rank = float(_sps.norm.sf(crit_z - math.sqrt(n_eff * are) * d))
    if rule == "rank":
        return rank
    # both tests reject in the effect's direction: a Gaussian copula with the tests' asymptotic correlation sqrt(ARE)
    u = np.clip([upper, rank], 1e-300, 1 - 1e-16)
    z = _sps.norm.ppf(u)
    rho = math.sqrt(are)
    return float(_sps.multivariate_normal([0.0, 0.0], [[1.0, rho], [rho, 1.0]]).cdf(z))


def minimum_detectable_d(n: float, m_cells: int, *, alpha: float = 0.05, power: float = 0.8,
                         rule: str = "mean_and_rank", design_effect: float = 1.0, are: float = ARE_NORMAL) -> float:
    r"""The smallest d_z the audit's decision rule detects with probability ``power`` in one cell of a family.

    A cell is tested at :math:`\alpha/m` two-sided: the Bonferroni level, and also the level a lone true effect
    among m - 1 nulls must pass under Holm or Benjamini-Hochberg. With :math:`n_{eff} = n / \text{design effect}`:

    * ``rule="mean"``: power of the t-test on the mean, from the noncentral t distribution with
      :math:`n_{eff} - 1` df and noncentrality :math:`\sqrt{n_{eff}}\,d` (both tails; as
      ``statsmodels.stats.power.TTestPower``);
    * ``rule="rank"``: the signed-rank test by its normal approximation with the Pitman efficiency ``are``
      (:math:`\Phi(\sqrt{n_{eff}\,\mathrm{ARE}}\,d - z_{1-\alpha/2m})`; ARE = 3/pi for normal D);
    * ``rule="mean_and_rank"`` (the audit's rule): both reject in the effect's direction; the two marginal powers
      joined by a Gaussian copula with the tests' asymptotic correlation :math:`\sqrt{\mathrm{ARE}}`.

    Solved for d by Brent's method. At n = 200 and m = 32 cells it is about 0.29 (0.283 for the mean test
    alone). The design effect :math:`1 + (\bar m_g - 1)\,\mathrm{ICC}` (positions per document :math:`\bar m_g`)
    scales it by :math:`\sqrt{\text{design effect}}` approximately. Assumes normal D; heavy tails lower the
    power of the mean test and raise that of the rank test, which ``validate``'s simulation on the run's own D
    measures.

    Parameters
    ----------
    n : float
        Positions per cell.
    m_cells : int
        Cells in the family (the correction's m).
    alpha, power : float
        Family-wise alpha and target power, in (0, 1).
    rule : {"mean_and_rank", "mean", "rank"}
    design_effect : float
        Variance inflation from clustering (>= 1 for positive ICC); 1 for independent positions.
    are : float
        Efficiency of the rank test relative to the t-test.

    Returns
    -------
    float
    """
    rules = ("mean_and_rank", "mean", "rank")
    if rule not in rules:
        raise ValueError(f"rule {rule!r} is not one of {', '.join(rules)}.")
    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"alpha and power must lie in (0, 1), got alpha={alpha!r}, power={power!r}.")
    if m_cells < 1 or design_effect <= 0 or are <= 0:
        raise ValueError(f"need m_cells >= 1, design_effect > 0 and are > 0; got {m_cells!r}, {design_effect!r}, "
                         f"{are!r}.")
    n_eff = n / design_effect
    if n_eff < 2:
        raise ValueError(f"n / design_effect = {n_eff:.3g}: at least 2 effective positions are needed.")
    alpha_test = alpha / m_cells

    def gap(d: float) -> float:
        return _power(d, n_eff, alpha_test, rule, are) - power

    high = 1.0
    while gap(high) < 0:
        high *= 2.0
        if high > 1e6:
            raise ValueError("no effect size reaches that power at this n.")
    return float(_optimize.brentq(gap, 1e-9, high, xtol=1e-10))
