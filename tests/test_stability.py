"""Ranking stability from per-document statistics: exact aggregation against observe on the half, the row-wise
rank statistics against scipy / brute force, and Spearman–Brown against independent corpora (simulation)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import cached_tiny, random_ids
from scipy import stats as sps

from moeaudit import observe
from moeaudit.experiments._stability import (
    bottom_jaccard,
    kendall_tau_b_rows,
    spearman_rows,
    split_half_stability,
)
from moeaudit.observation._document_stats import DocumentStats


def test_per_document_statistics_aggregate_to_observe_on_the_half():
    model = cached_tiny("olmoe")
    seqs = [random_ids(8 + 5 * i, seed=40 + i) for i in range(6)]
    stats = observe(model, seqs, layers=[0, 2], per_document=True)
    half = [0, 3, 4]
    for docs, expected in ((half, observe(model, [seqs[i] for i in half], layers=[0, 2])),
                           (None, observe(model, seqs, layers=[0, 2]))):
        got = stats.table(docs)
        assert list(got.columns) == list(expected.columns)
        pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-9, atol=1e-12)


def _with_nans(rng, shape, share=0.1):
    x = rng.normal(size=shape).round(1)  # ties
    x[rng.random(shape) < share] = np.nan
    return x


def test_row_wise_tau_and_spearman_equal_scipy_on_the_finite_entries():
    rng = np.random.default_rng(0)
    a, b = _with_nans(rng, (40, 12)), _with_nans(rng, (40, 12))
    tau, rho = kendall_tau_b_rows(a, b), spearman_rows(a, b)
    for i in range(40):
        ok = np.isfinite(a[i]) & np.isfinite(b[i])
        assert tau[i] == pytest.approx(sps.kendalltau(a[i, ok], b[i, ok]).statistic, abs=1e-12)
        assert rho[i] == pytest.approx(sps.spearmanr(a[i, ok], b[i, ok]).statistic, abs=1e-12)


def test_bottom_jaccard_equals_sets_of_the_lowest_values():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(30, 16)), rng.normal(size=(30, 16))
    a[0, 2] = np.nan
    got = bottom_jaccard(a, b, 4, np.random.default_rng(0))
    for i in range(30):
        ok = np.isfinite(a[i]) & np.isfinite(b[i])
        idx = np.flatnonzero(ok)
        sa, sb = set(idx[np.argsort(a[i, ok])[:4]]), set(idx[np.argsort(b[i, ok])[:4]])
        assert got[i] == pytest.approx(len(sa & sb) / len(sa | sb))
    assert np.isnan(bottom_jaccard(a[:, :4], b[:, :4], 4, np.random.default_rng(0))).all()


def _synthetic_stats(truth, n_docs, rng, tokens=30, noise=3.0) -> DocumentStats:
    """A mean-type metric: per document, each expert sees Poisson(tokens) values truth[e] + noise * N(0, 1)."""
    n_experts = truth.size
    n = rng.poisson(tokens, size=(n_docs, 1, n_experts)).astype(float)
    values = [[truth[e] + noise * rng.normal(size=int(n[d, 0, e])) for e in range(n_experts)] for d in range(n_docs)]
    total = np.array([[[v.sum() for v in row]] for row in values])
    m2 = np.array([[[((v - v.mean()) ** 2).sum() if v.size else 0.0 for v in row]] for row in values])
    return DocumentStats((0,), n_experts, n.astype(np.int64), {"x": (n, total, m2)}, {"x": "mean"}, {}, ("x",))


def test_spearman_brown_predicts_the_rank_correlation_between_independent_corpora():
    rng = np.random.default_rng(2)
    truth = rng.normal(scale=0.4, size=24)
    predicted, observed = [], []
    for _ in range(12):
        table = split_half_stability(_synthetic_stats(truth, 20, rng), metrics=["x"], n_splits=100,
                                     seed=int(rng.integers(1 << 30)))
        predicted.append(table["reliability"].iloc[0])
        one, two = (_synthetic_stats(truth, 20, rng).table()["x"] for _ in range(2))
        observed.append(sps.spearmanr(one, two).statistic)
    assert 0.3 < np.mean(observed) < 0.95  # a regime where reliability is informative
    assert np.mean(predicted) == pytest.approx(np.mean(observed), abs=0.05)  # the raw split-half rho is ~0.11 lower


def test_split_half_stability_columns_and_a_perfectly_stable_metric():
    rng = np.random.default_rng(3)
    stats = _synthetic_stats(np.linspace(0, 10, 16), 10, rng, noise=0.01)
    row = split_half_stability(stats, metrics=["x"], n_splits=20).iloc[0]
    assert row["tau"] == pytest.approx(1.0) and row["reliability"] == pytest.approx(1.0)
    assert row["m_1_8"] == 2 and row["jaccard_1_8"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 4 documents"):
        split_half_stability(_synthetic_stats(np.zeros(4), 3, rng), metrics=["x"])
