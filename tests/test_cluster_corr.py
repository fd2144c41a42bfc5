"""Spearman with a cluster-bootstrap interval: every resample equals scipy on the expanded sample; clusters move
together; the interval widens when rows within a cluster are correlated."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from moeaudit.stats import spearman_cluster_ci
from moeaudit.stats._cluster_corr import cluster_weighted_spearman


def test_cluster_weighted_spearman_equals_scipy_on_the_expanded_sample():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, size=25).astype(float)  # many ties
    y = x + rng.normal(size=25).round(1)
    groups = rng.integers(0, 6, size=25)
    counts = rng.integers(0, 3, size=(30, 6))
    got = cluster_weighted_spearman(x, y, groups, counts)
    for b in range(30):
        rows = np.repeat(np.arange(25), counts[b, groups])
        assert got[b] == pytest.approx(sps.spearmanr(x[rows], y[rows]).statistic, abs=1e-12)
    x_const = np.where(groups == 0, 1.0, x)  # a sample holding only cluster 0 has a constant x
    only_zero = np.eye(6)[None, 0] * 2
    assert np.isnan(cluster_weighted_spearman(x_const, y, groups, only_zero))[0]


def test_cluster_bootstrap_interval_resamples_whole_clusters():
    rng = np.random.default_rng(1)
    clusters = np.repeat(np.arange(8), 5)
    x, y = rng.normal(size=40), rng.normal(size=40)
    res = spearman_cluster_ci(x, y, clusters, n_boot=400, seed=3)
    assert res.rho == pytest.approx(sps.spearmanr(x, y).statistic)
    assert res.n_clusters == 8 and res.ci_low < res.rho < res.ci_high
    # the same interval by brute force: draw clusters, expand, scipy
    draws = np.random.default_rng(3).integers(0, 8, size=(400, 8))
    boot = []
    for d in draws:
        rows = np.concatenate([np.flatnonzero(clusters == c) for c in d])
        boot.append(sps.spearmanr(x[rows], y[rows]).statistic)
    assert res.ci_low == pytest.approx(np.quantile(boot, 0.025), abs=1e-12)
    assert res.ci_high == pytest.approx(np.quantile(boot, 0.975), abs=1e-12)


def test_clustered_interval_covers_the_truth_where_the_row_bootstrap_does_not():
    """x and y share a cluster effect with opposite-sign per-cluster slopes: the row-level interval is too narrow."""
    rng = np.random.default_rng(2)
    covered_cluster = covered_rows = 0
    for rep in range(40):
        shared = rng.normal(size=(20, 1))
        x = (shared + 0.3 * rng.normal(size=(20, 10))).ravel()
        y = (rng.choice([-1, 1], size=(20, 1)) * shared + 0.3 * rng.normal(size=(20, 10))).ravel()
        clusters = np.repeat(np.arange(20), 10)
        c = spearman_cluster_ci(x, y, clusters, n_boot=300, seed=rep)
        r = spearman_cluster_ci(x, y, np.arange(200), n_boot=300, seed=rep)
        covered_cluster += c.ci_low <= 0 <= c.ci_high  # true rho = 0 by the random slope signs
        covered_rows += r.ci_low <= 0 <= r.ci_high
    assert covered_cluster >= 32 and covered_rows <= 25


def test_spearman_cluster_ci_input_errors():
    with pytest.raises(ValueError, match="one label per row"):
        spearman_cluster_ci([1, 2, 3], [1, 2, 3], [0, 1])
    nan = spearman_cluster_ci([1, 1, 1], [1, 2, 3], [0, 1, 2])
    assert np.isnan(nan.rho) and np.isnan(nan.ci_low)
