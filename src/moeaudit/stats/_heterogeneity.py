"""Between-group tests on whole units: heterogeneity of a clustered mean across groups (domains, with documents as
units; Welch's F) and the difference of per-layer statistics between two models (layers as units; permutation)."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from math import comb

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats as sps

#: Most splits of the two-model test (exact enumeration below this, e.g. all 12,870 splits of 8 + 8 layers).
N_PERM_LAYERS = 20000


@dataclass(frozen=True)
class GroupMean:
    """One group's cluster-robust ratio mean (see :func:`cluster_heterogeneity`)."""

    group: str
    mean: float
    se: float
    low: float
    high: float
    n: int
    n_clusters: int


@dataclass(frozen=True)
class Heterogeneity:
    """Result of :func:`cluster_heterogeneity`.

    Attributes:
        groups: Per group, its mean, standard error, 95% interval, observations and clusters.
        q: Welch-type heterogeneity statistic (weighted sum of squares of the group means).
        f, df1, df2: Welch's F and its degrees of freedom.
        p: Welch's F-test p-value (the decision's).
        p_chi2: The asymptotic chi-square reference of ``q`` (groups - 1 df), anti-conservative with few clusters.
        note: Why groups were left out (fewer than 2 clusters), or an empty string.
    """

    groups: tuple[GroupMean, ...]
    q: float
    f: float
    df1: float
    df2: float
    p: float
    p_chi2: float
    note: str = ""


def _cluster_sums(values: np.ndarray, clusters: np.ndarray, groups: np.ndarray):
    ok = np.isfinite(values)
    values, clusters, groups = values[ok], clusters[ok], groups[ok]
    ids, index = np.unique(clusters, return_inverse=True)
    sums = np.bincount(index, weights=values, minlength=ids.size)
    counts = np.bincount(index, minlength=ids.size).astype(float)
    label = np.empty(ids.size, dtype=object)
    label[index] = groups
    if np.any(label[index] != groups):
        raise ValueError("a cluster (document) belongs to more than one group (domain); each document must carry "
                         "one domain label.")
    return sums, counts, label.astype(str)


def cluster_heterogeneity(values: ArrayLike, clusters: ArrayLike, groups: ArrayLike) -> Heterogeneity:
    r"""Test whether the mean of ``values`` differs across groups, with clusters (documents) as the units.

    Estimand: per group k, the ratio mean :math:`m_k = \sum_{g \in k} S_g / \sum_{g \in k} n_g` over its
    clusters' sums :math:`S_g` and counts :math:`n_g` (every observation of the group weighted equally). Each
    has the bias-reduced cluster-robust (CR2) variance
    :math:`v_k = \sum_{g \in k} \frac{(S_g - m_k n_g)^2}{1 - n_g / N_k} / N_k^2`, :math:`N_k = \sum_{g \in k} n_g`
    (a cluster's leverage is :math:`n_g / N_k`), with :math:`\nu_k = N_k^2 / \sum_{g \in k} n_g^2 - 1` degrees of
    freedom (the effective number of clusters less one; :math:`G_k - 1` for equal sizes), and the test is Welch's
    heteroscedastic one-way ANOVA on these means (H0: every group has the same mean):

    .. math::

        Q = \sum_k w_k (m_k - \bar m_w)^2, \quad w_k = 1 / v_k, \quad
        h = \sum_k \frac{(1 - w_k / \sum_j w_j)^2}{\nu_k}, \quad
        F = \frac{Q / (K - 1)}{1 + \frac{2 (K - 2)}{K^2 - 1} h} \sim F\left(K - 1, \frac{K^2 - 1}{3 h}\right)

    Chosen by simulation over the alternatives (scripts/calibrate_domains.py, docs/explanation/low-redundancy.md):
    with skewed, clustered data whose groups differ 7-fold in spread and in size, permuting the groups' labels
    over clusters rejected 8-13% at alpha = .05 (labels are not exchangeable under unequal spreads) and the
    chi-square reference of Q 10.8%, while Welch's F rejected 5.0% (0.9% at .01; 1,000 draws). It is
    approximate: on nulls resampled from the demo's own skewed D it rejected 2-10% at .05 (the report says so). Groups with fewer
    than 2 clusters are left out (named in ``note``). The 95% interval of each group mean is
    :math:`m_k \pm t_{\nu_k, .975} \sqrt{v_k}`.

    Args:
        values: [N] observations (e.g. D at every (layer, position) of a metric).
        clusters: [N] cluster (document) of each observation.
        groups: [N] group (domain) of each observation; constant within a cluster.

    References:
        Welch, B. L. (1951). On the comparison of several mean values: an alternative approach. Biometrika, 38,
        330-336. Bell, R. M., & McCaffrey, D. F. (2002). Bias reduction in standard errors for linear regression
        with multi-stage samples. Survey Methodology, 28(2), 169-181. Cameron, A. C., & Miller, D. L. (2015). A practitioner's guide to cluster-robust inference.
        Journal of Human Resources, 50(2), 317-372.
    """
    values = np.asarray(values, dtype=float)
    sums, counts, label = _cluster_sums(values, np.asarray(clusters), np.asarray(groups).astype(str))
    names = sorted(set(label.tolist()))
    sizes = {k: int((label == k).sum()) for k in names}
    dropped = [k for k in names if sizes[k] < 2]
    kept = [k for k in names if sizes[k] >= 2]
    note = (f"left out of the heterogeneity test (fewer than 2 documents): {', '.join(dropped)}" if dropped else "")
    per_group, means, variances, dof = [], [], [], []
    for k in kept:
        s, n, g = sums[label == k], counts[label == k], sizes[k]
        total = n.sum()
        mean = float(s.sum() / total)
        # CR2: each cluster's residual sum scaled by 1 / (1 - its leverage n_g / N_k)
        var = float(((s - mean * n) ** 2 / (1 - n / total)).sum() / total**2)
        df = max(1.0, float(total**2 / (n**2).sum()) - 1)  # effective clusters - 1 (g - 1 for equal sizes)
        half = float(sps.t.ppf(0.975, df)) * np.sqrt(var)
        per_group.append(GroupMean(k, mean, float(np.sqrt(var)), mean - half, mean + half, int(total), g))
        means.append(mean)
        variances.append(var)
        dof.append(df)
    nan = float("nan")
    variances = np.asarray(variances)
    if len(kept) < 2 or not np.all(variances > 0):
        return Heterogeneity(tuple(per_group), nan, nan, nan, nan, nan, nan, note)
    w, m, k = 1.0 / variances, np.asarray(means), len(kept)
    pooled = float((w * m).sum() / w.sum())
    q = float((w * (m - pooled) ** 2).sum())
    h = float(((1 - w / w.sum()) ** 2 / np.asarray(dof)).sum())
    f = q / (k - 1) / (1 + 2 * (k - 2) / (k**2 - 1) * h)
    df2 = (k**2 - 1) / (3 * h)
    return Heterogeneity(tuple(per_group), q, f, float(k - 1), df2, float(sps.f.sf(f, k - 1, df2)),
                         float(sps.chi2.sf(q, k - 1)), note)


@dataclass(frozen=True)
class TwoGroupComparison:
    """Result of :func:`layer_permutation_test`: per column, and jointly over the columns.

    Attributes:
        mean_a, mean_b: [C] column means of each group.
        diff: [C] ``mean_a - mean_b``.
        t: [C] Welch's t of the difference.
        p: [C] two-sided permutation p-values of ``|t|``.
        p_joint: Permutation p-value of the sum of squared t over columns (do the groups differ on any column?).
        n_perm: Permutations used; ``exact`` when every split was enumerated.
    """

    mean_a: np.ndarray
    mean_b: np.ndarray
    diff: np.ndarray
    t: np.ndarray
    p: np.ndarray
    p_joint: float
    n_perm: int
    exact: bool


def _welch_t(x: np.ndarray, in_a: np.ndarray) -> np.ndarray:
    """[R, C] Welch's t for each split ``in_a`` [R, N] of the rows of ``x`` [N, C]."""
    a = in_a.astype(float)
    b = 1.0 - a
    na, nb = a.sum(1, keepdims=True), b.sum(1, keepdims=True)
    ma, mb = a @ x / na, b @ x / nb
    va = (a @ x**2 - na * ma**2) / (na - 1)
    vb = (b @ x**2 - nb * mb**2) / (nb - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ma - mb) / np.sqrt(np.maximum(va, 0) / na + np.maximum(vb, 0) / nb)


def layer_permutation_test(a: ArrayLike, b: ArrayLike, *, n_perm: int = N_PERM_LAYERS, seed: int = 0) -> TwoGroupComparison:
    r"""Do two groups of units (the layers of two models) differ in the mean of one or more statistics?

    Estimand: per column c (e.g. a metric), :math:`\mu_{A,c} - \mu_{B,c}`, the difference between the mean over
    group A's units and over group B's. Unit of inference: the row (a layer); H0: the rows of A and B are
    exchangeable (the group label carries no information). Statistic: Welch's t per column, and
    :math:`\sum_c t_c^2` for the joint question; p-values from the permutation distribution of the group labels
    over the rows, all columns of a row moved together (so correlated columns are handled), enumerated exactly
    when :math:`\binom{n_A + n_B}{n_A} \le` ``n_perm``, else ``n_perm`` random splits (the observed split counted,
    Phipson & Smyth 2010). Two-sided. A studentised statistic keeps the permutation test robust to unequal
    spreads of the groups (Chung & Romano 2013).

    Args:
        a: [n_A, C] (or [n_A]) rows of group A; rows with a NaN are dropped.
        b: [n_B, C] (or [n_B]) rows of group B.

    Raises:
        ValueError: Fewer than 2 complete rows in a group.
    """
    a = np.atleast_2d(np.asarray(a, dtype=float).T).T if np.ndim(a) == 1 else np.asarray(a, dtype=float)
    b = np.atleast_2d(np.asarray(b, dtype=float).T).T if np.ndim(b) == 1 else np.asarray(b, dtype=float)
    a, b = a[np.isfinite(a).all(1)], b[np.isfinite(b).all(1)]
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"the two-model comparison needs at least 2 complete rows (layers) per model; got "
                         f"{len(a)} and {len(b)}.")
    x = np.vstack([a, b])
    n, na = len(x), len(a)
    observed = np.zeros((1, n), dtype=bool)
    observed[0, :na] = True
    t_obs = _welch_t(x, observed)[0]
    exact = comb(n, na) <= n_perm
    if exact:
        splits = np.zeros((comb(n, na), n), dtype=bool)
        for i, idx in enumerate(combinations(range(n), na)):
            splits[i, list(idx)] = True
    else:
        rng = np.random.default_rng(seed)
        keys = rng.random((n_perm, n))
        splits = np.zeros((n_perm, n), dtype=bool)
        np.put_along_axis(splits, np.argsort(keys, axis=1)[:, :na], True, axis=1)
    t_null = _welch_t(x, splits)
    tol = 1 - 1e-12
    extreme = np.abs(t_null) >= np.abs(t_obs)[None] * tol
    joint_obs = np.nansum(t_obs**2)
    joint_extreme = np.nansum(t_null**2, axis=1) >= joint_obs * tol
    if exact:  # the observed split is one of the enumerated ones
        p = extreme.mean(0)
        p_joint = float(joint_extreme.mean())
    else:
        p = (1 + extreme.sum(0)) / (1 + n_perm)
        p_joint = float((1 + joint_extreme.sum()) / (1 + n_perm))
    ma, mb = a.mean(0), b.mean(0)
    return TwoGroupComparison(ma, mb, ma - mb, t_obs, p, p_joint, len(splits), exact)
