"""Document-level sign-flip (randomisation) tests: the clustered p-values of the mean, the signed-rank statistic and
the sign statistic of per-position values (D of an audit cell, per-token rho of rank validity)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeaudit.stats._checks import _finite_1d, _groups
from moeaudit.stats._intervals import average_ranks

N_PERM = 9999
"""Default number of random sign vectors; with the +1 correction the smallest attainable p-value is 1 / 10000."""

# Sign vectors are drawn in blocks of about this many elements (memory ~32 MB whatever the cluster count).
_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class ClusteredTests:
    """Result of :func:`clustered_tests`: three document-level sign-flip p-values of one set of paired differences.

    Attributes
    ----------
    p_mean : float
        Two-sided p-value of H0: E[D] = 0 (statistic: sum of D, i.e. n times the mean over positions).
    p_signrank : float
        Two-sided p-value of the signed-rank statistic W+ - W- (ranks of |D| over all nonzero positions).
    p_sign : float
        Two-sided p-value of the sign statistic #(D > 0) - #(D < 0).
    w_diff : float
        W+ - W-: positive when the larger |D| are mostly positive (the rank test's direction).
    n_clusters : int
        Number of clusters (documents) whose signs were flipped.
    n_perm : int
        Sign vectors used: 2**n_clusters when ``exact``, else the random draws (the identity is added on top).
    exact : bool
        True when every sign vector was enumerated (2**n_clusters <= n_perm + 1).
    """

    p_mean: float
    p_signrank: float
    p_sign: float
    w_diff: float
    n_clusters: int
    n_perm: int
    exact: bool


def _flipped_sums(sums: np.ndarray, n_perm: int, rng: np.random.Generator):
    """Blocks of sign-flipped totals, shape [rows, k]: sum_g eps_g sums[:, g] for every sign vector eps, all 2**G
    of them when that is at most n_perm + 1, else n_perm random ones.

    Random sign vectors are drawn as bytes, one per 8 clusters (a uniform byte is 8 fair coin flips), and the
    totals looked up in per-chunk tables of all 256 partial sums, so a draw costs G / 8 lookups, not G products.
    """
    k, n_clusters = sums.shape
    if 2 ** n_clusters <= n_perm + 1:
        codes = np.arange(2 ** n_clusters, dtype=np.int64)[:, None] >> np.arange(n_clusters)
        yield (1.0 - 2.0 * (codes & 1)) @ sums.T
        return
    n_chunks = -(-n_clusters // 8)
    padded = np.zeros((k, 8 * n_chunks))
    padded[:, :n_clusters] = sums
    byte_signs = 1.0 - 2.0 * ((np.arange(256)[:, None] >> np.arange(8)) & 1)  # [256, 8]
    tables = [byte_signs @ padded[:, 8 * c: 8 * c + 8].T for c in range(n_chunks)]  # each [256, k]
    block = max(1, _BLOCK_ELEMENTS // (n_chunks * k))
    for start in range(0, n_perm, block):
        rows = min(block, n_perm - start)
        draws = np.frombuffer(rng.bytes(rows * n_chunks), dtype=np.uint8).reshape(rows, n_chunks)
        total = tables[0][draws[:, 0]]
        for c in range(1, n_chunks):
            total = total + tables[c][draws[:, c]]
        yield total


def _sign_flip_pvalues(sums: np.ndarray, n_perm: int, seed) -> tuple[np.ndarray, int, bool]:
    """Two-sided sign-flip p-values of ``sums.sum(axis=1)`` for each row of ``sums`` (shape [k, G]: k statistics,
    G cluster sums), all rows flipped with the same sign vectors."""
    k, n_clusters = sums.shape
    exact = 2 ** n_clusters <= n_perm + 1
    observed = np.abs(sums.sum(axis=1))
    # |T*| >= |T| up to rounding: sums of the same numbers in another order differ by a few ulps
    tol = 1e-9 * np.maximum(np.abs(sums).sum(axis=1), np.finfo(float).tiny)
    hits = np.zeros(k)
    total = 0
    for flipped in _flipped_sums(sums, n_perm, np.random.default_rng(seed)):
        hits += (np.abs(flipped) >= observed - tol).sum(axis=0)
        total += flipped.shape[0]
    if exact:
        return hits / total, total, True
    return (hits + 1.0) / (total + 1.0), total, False


def _cluster_sums(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    return np.bincount(groups, weights=values, minlength=n_groups)


def sign_flip_test(values, clusters=None, *, n_perm: int = N_PERM, seed: int | None = 0) -> float:
    r"""Two-sided test of H0: E[value] = 0 by flipping the signs of whole clusters (documents).

    The statistic is :math:`T = \sum_g S_g` with :math:`S_g` the sum of the values in cluster g (n times the mean
    over positions); the p-value is the share of sign vectors :math:`\varepsilon \in \{-1, 1\}^G` with
    :math:`|\sum_g \varepsilon_g S_g| \ge |T|`: all :math:`2^G` of them when that is at most ``n_perm + 1``,
    else ``n_perm`` random ones with the +1 correction, :math:`p = (1 + \#\{|T^*| \ge |T|\}) / (n_{perm} + 1)`.

    Estimand: the mean of the values over positions. Unit of inference: the cluster (document); positions within
    a document may be correlated in any way. The test is exact when, under H0, each document's values are jointly
    symmetric about zero (a ranking with no information, oriented at random, makes D so); without symmetry it is
    asymptotically valid for the mean: the permutation variance :math:`\sum_g S_g^2` estimates
    :math:`\mathrm{Var}(T)` when E[S_g] = 0. Because :math:`\sum_g S_g^2` is the same for every sign vector, the
    test equals the one based on the cluster-robust t statistic (wild cluster bootstrap with Rademacher weights
    and the null imposed; Cameron, Gelbach & Miller 2008).

    Parameters
    ----------
    values : array_like, shape (n,)
        Finite per-position values (e.g. D = ΔL_high - ΔL_low, or the per-token Spearman rho).
    clusters : array_like, shape (n,), optional
        Cluster label per position (document id). ``None``: every position its own cluster (Fisher's one-sample
        randomisation test).
    n_perm : int
        Random sign vectors when enumeration is too large.
    seed : int or None
        Seed of the sign vectors.

    Returns
    -------
    float
        NaN when every value is zero.

    References
    ----------
    Fisher, R. A. (1935). The Design of Experiments, section 21. Oliver & Boyd.
    Cameron, A. C., Gelbach, J. B., & Miller, D. L. (2008). Bootstrap-based improvements for inference with
    clustered errors. Rev. Econ. Stat., 90, 414-427.
    Canay, I. A., Romano, J. P., & Shaikh, A. M. (2017). Randomization tests under an approximate symmetry
    assumption. Econometrica, 85, 1013-1030.
    """
    arr = _finite_1d("values", values, min_n=1)
    groups, n_groups = _groups(clusters, arr.size, min_clusters=1)
    _check_n_perm(n_perm)
    if not np.any(arr):
        return float("nan")
    sums = _cluster_sums(arr, groups, n_groups)[None, :]
    p, _, _ = _sign_flip_pvalues(sums, n_perm, seed)
    return float(p[0])


def _check_n_perm(n_perm) -> None:
    if isinstance(n_perm, bool) or not isinstance(n_perm, (int, np.integer)) or n_perm < 1:
        raise ValueError(f"n_perm must be a positive integer, got {n_perm!r}; e.g. 9999.")


def clustered_tests(diff, clusters=None, *, n_perm: int = N_PERM, seed: int | None = 0) -> ClusteredTests:
    r"""Mean, signed-rank and sign tests of paired differences D, each by flipping the signs of whole documents.

    With :math:`r_i` the rank of :math:`|D_i|` among the nonzero differences (average ranks for ties) and
    :math:`s_i = \operatorname{sign}(D_i)`, the three statistics are sums over clusters g of

    * mean: :math:`S_g = \sum_{i \in g} D_i` (estimand: the mean of D over positions);
    * signed rank: :math:`R_g = \sum_{i \in g} s_i r_i`, so :math:`\sum_g R_g = W_+ - W_-` (estimand: location of
      the typical D, the pseudo-median; this is the clustered signed-rank test of Rosner, Glynn & Lee 2006 in its
      randomisation form);
    * sign: :math:`C_g = \sum_{i \in g} s_i`, so :math:`\sum_g C_g = \#(D>0) - \#(D<0)` (estimand: P(D > 0) vs
      P(D < 0), i.e. the median of D);

    each tested two-sided by :func:`sign_flip_test`'s procedure with the same sign vectors. Zeros are dropped
    from the ranks and count for neither sign (Wilcoxon's convention, as ``scipy.stats.wilcoxon``). Unit of
    inference: the document. With every position its own cluster the three are Fisher's randomisation test, the
    exact Wilcoxon signed-rank test and the exact sign test (binomial), up to Monte Carlo error.

    Returns
    -------
    ClusteredTests
        p-values NaN when every D is zero.

    References
    ----------
    Rosner, B., Glynn, R. J., & Lee, M.-L. T. (2006). The Wilcoxon signed rank test for paired comparisons of
    clustered data. Biometrics, 62, 185-192.
    """
    d = _finite_1d("diff", diff, min_n=1)
    groups, n_groups = _groups(clusters, d.size, min_clusters=1)
    _check_n_perm(n_perm)
    nonzero = d != 0
    ranks = np.zeros_like(d)
    ranks[nonzero] = average_ranks(np.abs(d[nonzero]))
    signs = np.sign(d)
    w_diff = float(np.sum(signs * ranks))
    if not nonzero.any():
        nan = float("nan")
        return ClusteredTests(nan, nan, nan, 0.0, n_groups, 0, False)
    sums = np.stack([_cluster_sums(v, groups, n_groups) for v in (d, signs * ranks, signs)])
    p, total, exact = _sign_flip_pvalues(sums, n_perm, seed)
    return ClusteredTests(p_mean=float(p[0]), p_signrank=float(p[1]), p_sign=float(p[2]), w_diff=w_diff,
                          n_clusters=n_groups, n_perm=total, exact=exact)


@dataclass(frozen=True)
class ClusteredRows:
    """Result of :func:`clustered_tests_rows`: :func:`clustered_tests`' mean and signed-rank p-values and W+ - W-
    of every row, plus the sign vectors each row was tested with."""

    p_mean: np.ndarray
    p_signrank: np.ndarray
    w_diff: np.ndarray
    n_perm: np.ndarray


def clustered_tests_rows(diffs, clusters, *, n_perm: int = N_PERM, seed: int | None = 0,
                         stop_above: float | None = None) -> ClusteredRows:
    r""":func:`clustered_tests` (mean and signed rank) of many sets of paired differences on the same positions:
    each row of ``diffs`` [R, n] is one set, all rows share ``clusters`` and the sign vectors (one pass of
    table lookups for all of them; for simulation and calibration, where R is in the thousands).

    ``stop_above``: a level α at which only the decision p ≤ α matters. After the first ``min(n_perm, 999)`` sign
    vectors, a row whose count of as-extreme sums already keeps (1 + count) / (1 + n_perm) above α is settled: its
    p-value is (1 + count) / (1 + sign vectors used), above α, and it gets no more sign vectors. Rows that could
    still fall to α get all ``n_perm``. Without it every row gets ``n_perm``.

    Rows with every D zero get NaN p-values (as :func:`clustered_tests`).
    """
    d = np.atleast_2d(np.asarray(diffs, dtype=float))
    if not np.all(np.isfinite(d)):
        raise ValueError("diffs has NaN or inf values; drop those positions before testing.")
    groups, n_groups = _groups(clusters, d.shape[1], min_clusters=1)
    _check_n_perm(n_perm)
    rows = d.shape[0]
    nonzero = d != 0
    ranks = np.where(nonzero, np.apply_along_axis(average_ranks, 1, np.abs(d)) - (~nonzero).sum(axis=1,
                                                                                                keepdims=True), 0.0)
    signed = np.sign(d) * ranks
    w_diff = signed.sum(axis=1)
    onehot = np.zeros((d.shape[1], n_groups))
    onehot[np.arange(d.shape[1]), groups] = 1.0
    sums = np.concatenate([d @ onehot, signed @ onehot])  # [2R, G]: mean statistics, then signed-rank statistics
    observed = np.abs(sums.sum(axis=1))
    tol = 1e-9 * np.maximum(np.abs(sums).sum(axis=1), np.finfo(float).tiny)
    exact = 2 ** n_groups <= n_perm + 1
    rng = np.random.default_rng(seed)
    hits = np.zeros(2 * rows)
    used = np.zeros(2 * rows)
    live = np.arange(2 * rows)
    stages = [n_perm] if exact or stop_above is None else [min(n_perm, 999), n_perm - min(n_perm, 999)]
    for stage, count in enumerate(stages):
        if count <= 0 or live.size == 0:
            continue
        for flipped in _flipped_sums(sums[live], count, rng):
            hits[live] += (np.abs(flipped) >= observed[live] - tol[live]).sum(axis=0)
            used[live] += flipped.shape[0]
        if stage == 0 and stop_above is not None:
            live = live[(1.0 + hits[live]) <= stop_above * (1.0 + n_perm)]
    p = hits / used if exact else (hits + 1.0) / (used + 1.0)
    p = np.where(np.tile(nonzero.any(axis=1), 2), p, np.nan)
    return ClusteredRows(p_mean=p[:rows], p_signrank=p[rows:], w_diff=w_diff,
                         n_perm=used[:rows].astype(int))
