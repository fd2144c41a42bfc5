"""Means and paired differences whose observations (tokens, positions) are clustered in documents, and the
prediction test of one value against a sample of exchangeable alternatives (random seeds).

Estimand of :func:`clustered_mean` / :func:`clustered_difference`: the observation-weighted mean (a token-weighted
mean loss difference, as the mean losses of the pruning tables are token-weighted). Unit of inference: the cluster
(document): the standard error is the cluster-robust (CR1) sandwich, the t reference has G - 1 degrees of freedom,
the sign-flip test flips whole documents and the bootstrap resamples whole documents.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as _sps

from moeaudit.stats._checks import _check_ci, _finite_1d, _same_length
from moeaudit.stats._signflip import _sign_flip_pvalues


@dataclass(frozen=True)
class ClusteredMean:
    """Result of :func:`clustered_mean`.

    Attributes
    ----------
    estimate : float
        Mean over all observations.
    se : float
        Cluster-robust (CR1) standard error; NaN with fewer than two clusters.
    ci_low, ci_high : float
        ``estimate -/+ t_{G-1} se``.
    n, n_clusters : int
        Observations and clusters.
    """

    estimate: float
    se: float
    ci_low: float
    ci_high: float
    n: int
    n_clusters: int


@dataclass(frozen=True)
class ClusteredDifference:
    """Result of :func:`clustered_difference` on d = a - b.

    Attributes
    ----------
    estimate : float
        Observation-weighted mean of d.
    se, t, df, p_t : float
        CR1 standard error, t = estimate / se, G - 1 degrees of freedom, two-sided p.
    p_signflip : float
        Two-sided document-level sign-flip permutation p (exact enumeration when 2^G <= n_perm + 1).
    ci_low, ci_high : float
        Percentile interval over documents resampled with replacement (of the same ratio estimator).
    n, n_clusters : int
        Observations and clusters.
    """

    estimate: float
    se: float
    t: float
    df: int
    p_t: float
    p_signflip: float
    ci_low: float
    ci_high: float
    n: int
    n_clusters: int


@dataclass(frozen=True)
class PredictionTest:
    """Result of :func:`prediction_test`: ``value`` against the mean of ``reference``.

    Attributes
    ----------
    estimate : float
        value - mean(reference).
    reference_sd : float
        Sample standard deviation (ddof=1) of the reference values.
    t, df, p : float
        t = estimate / (sd sqrt(1 + 1/S)), S - 1 degrees of freedom, two-sided p.
    """

    estimate: float
    reference_sd: float
    t: float
    df: int
    p: float


def _cluster_index(clusters, n: int) -> tuple[np.ndarray, int]:
    labels = np.asarray(clusters)
    if labels.shape != (n,):
        raise ValueError(f"clusters must label every observation: expected {n} labels, got shape {labels.shape}.")
    _, index = np.unique(labels, return_inverse=True)
    return index.reshape(-1), int(index.max()) + 1


def _cr1(values: np.ndarray, index: np.ndarray, n_clusters: int) -> tuple[float, float]:
    """Mean and cluster-robust (CR1) standard error of the mean."""
    mean = float(values.mean())
    if n_clusters < 2:
        return mean, float("nan")
    scores = np.bincount(index, weights=values - mean, minlength=n_clusters)
    var = n_clusters / (n_clusters - 1) * float(np.sum(scores ** 2)) / values.size ** 2
    return mean, float(np.sqrt(var))


def clustered_mean(values, clusters, *, ci: float = 0.95) -> ClusteredMean:
    r"""Mean of clustered observations with a cluster-robust t interval.

    .. math::

        \hat\mu = \frac{1}{N}\sum_i y_i, \qquad
        \widehat{\mathrm{se}}^2 = \frac{G}{G-1}\,\frac{1}{N^2}\sum_{g=1}^{G}\Big(\sum_{i \in g}(y_i - \hat\mu)\Big)^2,
        \qquad \hat\mu \pm t_{G-1,(1+c)/2}\,\widehat{\mathrm{se}}

    (the CR1 sandwich of a regression on a constant, as ``statsmodels`` ``cov_type="cluster"`` computes it;
    Cameron & Miller 2015). Estimand: the mean per observation. Unit of inference: the cluster.
    """
    y = _finite_1d("values", values, min_n=1)
    _check_ci(ci, 1)
    index, n_clusters = _cluster_index(clusters, y.size)
    mean, se = _cr1(y, index, n_clusters)
    half = float(_sps.t.ppf((1 + ci) / 2, n_clusters - 1)) * se if n_clusters >= 2 else float("nan")
    return ClusteredMean(mean, se, mean - half, mean + half, int(y.size), n_clusters)


def _signflip_p(totals: np.ndarray, n_perm: int, rng: np.random.Generator) -> float:
    """Two-sided sign-flip p of |sum of cluster totals| (exact when 2^G <= n_perm + 1, else Monte Carlo with +1):
    the audit's document-level sign-flip procedure (:func:`moeaudit.stats.sign_flip_test`)."""
    p, _, _ = _sign_flip_pvalues(totals[None, :], n_perm, rng)
    return float(p[0])


def clustered_difference(a, b, clusters, *, n_perm: int = 10000, n_boot: int = 2000, ci: float = 0.95,
                         seed: int | None = 0) -> ClusteredDifference:
    r"""Paired comparison of two arms measured on the same clustered observations, on d = a - b.

    Estimand: :math:`\delta = \frac{1}{N}\sum_i (a_i - b_i)`, the difference of the observation-weighted means
    (for per-token losses: of the token-weighted mean losses). Unit of inference: the cluster (document).

    * Cluster-robust t: :math:`t = \hat\delta / \widehat{\mathrm{se}}_{CR1}` against :math:`t_{G-1}` (see
      :func:`clustered_mean`). With equal cluster sizes this is the one-sample t-test on the per-cluster means.
    * Sign-flip permutation test (cluster-level; e.g. Good 2005): under the null that each document's total
      difference :math:`S_g = \sum_{i\in g} d_i` is symmetric about 0, flipping the sign of whole documents leaves
      the distribution of :math:`|\sum_g \pm S_g|` unchanged; p is the share of flips at least as extreme
      (exact enumeration of all :math:`2^G` flips when that is at most ``n_perm + 1``, else ``n_perm`` random flips
      with the +1 correction).
    * Percentile bootstrap interval of :math:`\hat\delta` over ``n_boot`` resamples of whole documents.

    Parameters
    ----------
    a, b : array_like, shape (N,)
        Paired observations (e.g. per-token losses of two pruned models on the same tokens).
    clusters : array_like, shape (N,)
        Cluster (document) label of each observation.
    """
    a = _finite_1d("a", a, min_n=2)
    b = _finite_1d("b", b, min_n=2)
    _same_length("a", a, "b", b)
    _check_ci(ci, n_boot)
    if isinstance(n_perm, bool) or not isinstance(n_perm, (int, np.integer)) or n_perm < 1:
        raise ValueError(f"n_perm must be a positive integer, got {n_perm!r}.")
    d = a - b
    index, n_clusters = _cluster_index(clusters, d.size)
    if n_clusters < 2:
        raise ValueError("a clustered comparison needs at least 2 clusters (documents); got 1. Evaluate on more "
                         "documents.")
    estimate, se = _cr1(d, index, n_clusters)
    df = n_clusters - 1
    if se > 0:
        t = estimate / se
        p_t = float(2 * _sps.t.sf(abs(t), df))
    else:  # every document's mean difference is the same (e.g. identical arms: all zero)
        t = float("nan") if estimate == 0 else float(np.sign(estimate) * np.inf)
        p_t = 1.0 if estimate == 0 else 0.0
    rng = np.random.default_rng(seed)
    totals = np.bincount(index, weights=d, minlength=n_clusters)
    sizes = np.bincount(index, minlength=n_clusters).astype(float)
    p_flip = _signflip_p(totals, n_perm, rng)
    draws = rng.integers(0, n_clusters, size=(n_boot, n_clusters))
    boot = totals[draws].sum(axis=1) / sizes[draws].sum(axis=1)
    low, high = np.quantile(boot, [(1 - ci) / 2, (1 + ci) / 2])
    return ClusteredDifference(float(estimate), float(se), float(t), df, p_t, float(p_flip), float(low),
                               float(high), int(d.size), n_clusters)


def prediction_test(value: float, reference) -> PredictionTest:
    r"""Is ``value`` another draw from the distribution the ``reference`` values come from?

    .. math::

        t = \frac{x - \bar r}{s_r\sqrt{1 + 1/S}} \sim t_{S-1}

    under the null that x and the S reference values are i.i.d. normal (the prediction interval of a new
    observation; equal to Student's pooled two-sample t-test of ``[x]`` against ``reference``). Used with the
    held-out mean losses of S random prunings: the null is "this criterion prunes like a random draw of experts".
    Estimand: x minus the mean of the reference distribution. Unit of inference: the random seed (one pruned
    model). NaN when the reference values have no spread.
    """
    ref = _finite_1d("reference", reference, min_n=2)
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"value must be finite, got {value!r}.")
    estimate = value - float(ref.mean())
    sd = float(ref.std(ddof=1))
    df = ref.size - 1
    if sd == 0:
        return PredictionTest(estimate, sd, float("nan"), df, float("nan"))
    t = estimate / (sd * np.sqrt(1 + 1 / ref.size))
    return PredictionTest(estimate, sd, float(t), df, float(2 * _sps.t.sf(abs(t), df)))
