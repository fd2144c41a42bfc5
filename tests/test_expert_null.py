"""Expert-level inference from the single-expert pool: the pool arrays, the high/low rule, the random-ranking and
within-token nulls, and the causal ceiling, against brute force and simulations with a known truth."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from moeaudit.experiments._expert_null import (
    _halvings,
    _null_result,
    causal_ceiling,
    cross_fitted_d,
    random_ranking_null,
    within_token_null,
)
from moeaudit.experiments._pool import Pool, d_z_rows, high_low_d, pools


def synthetic_pool(n_positions=60, n_experts=8, top_k=4, n_docs=12, importance=None, noise=1.0, seed=0,
                   ragged=False) -> Pool:
    """Positions with top_k random active experts; ΔL = importance[expert] + noise (heavy-ish tails)."""
    rng = np.random.default_rng(seed)
    importance = np.zeros(n_experts) if importance is None else np.asarray(importance, float)
    experts = np.full((n_positions, top_k), -1)
    delta = np.full((n_positions, top_k), np.nan)
    weights = np.full((n_positions, top_k), np.nan)
    for p in range(n_positions):
        k = int(rng.integers(2, top_k + 1)) if ragged else top_k
        chosen = rng.choice(n_experts, size=k, replace=False)
        experts[p, :k] = chosen
        delta[p, :k] = importance[chosen] + noise * rng.standard_t(5, size=k)
        w = rng.dirichlet(np.ones(k))
        weights[p, :k] = w
    seq = np.sort(rng.integers(0, n_docs, size=n_positions))
    return Pool("m", 0, seq, np.arange(n_positions), experts, delta, weights)


def brute_force_d(pool: Pool, score_of) -> float:
    """Explicit loop: per position, argmax / argmin of score_of(p, expert) among active finite-scored experts."""
    diffs = []
    for p in range(pool.n_positions):
        cand = [(score_of(p, j), j) for j in range(pool.experts.shape[1])
                if pool.experts[p, j] >= 0 and np.isfinite(score_of(p, j)) and np.isfinite(pool.delta[p, j])]
        if len(cand) < 2:
            continue
        hi = max(cand, key=lambda c: (c[0], -c[1]))[1]  # first in router order among equal scores
        lo = min(cand, key=lambda c: (c[0], c[1]))[1]
        diffs.append(pool.delta[p, hi] - pool.delta[p, lo])
    diffs = np.asarray(diffs)
    return float(diffs.mean() / diffs.std(ddof=1))


def test_high_low_d_equals_a_loop_for_static_and_per_token_scores():
    pool = synthetic_pool(n_positions=40, ragged=True, seed=1)
    rng = np.random.default_rng(2)
    static = rng.normal(size=(5, 8))
    static[0, 3] = np.nan  # an expert without a metric value is left out
    got = high_low_d(pool, static)
    for r in range(5):
        assert got[r] == pytest.approx(brute_force_d(pool, lambda p, j, r=r: static[r, pool.experts[p, j]]), abs=1e-12)
    per_token = rng.normal(size=(3, *pool.experts.shape))
    got = high_low_d(pool, per_token)
    for r in range(3):
        assert got[r] == pytest.approx(brute_force_d(pool, lambda p, j, r=r: per_token[r, p, j]), abs=1e-12)


def test_d_z_rows_matches_numpy_and_refuses_degenerate_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 30))
    x[1, :5] = np.nan
    x[2] = 1.0 + 1e-15 * rng.normal(size=30)  # near-constant: noise only
    x[3, 2:] = np.nan  # two values
    got = d_z_rows(x)
    assert got[0] == pytest.approx(x[0].mean() / x[0].std(ddof=1), abs=1e-12)
    assert got[1] == pytest.approx(np.nanmean(x[1]) / np.nanstd(x[1], ddof=1), abs=1e-12)
    assert np.isnan(got[2]) and np.isnan(got[3])


def test_pools_rebuild_the_arrays_from_records_in_any_order():
    pool = synthetic_pool(n_positions=10, ragged=True, seed=3)
    rows = []
    for p in range(pool.n_positions):
        active = [int(e) for e in pool.experts[p] if e >= 0]
        weights = [float(w) for w in pool.weights[p, : len(active)]]
        for j, e in enumerate(active):
            rows.append({"experiment": "pool", "model": "m", "layer": 0, "seq_id": int(pool.seq_id[p]),
                         "position": int(pool.position[p]), "active_experts": active, "active_weights": weights,
                         "ablated_experts": [e], "delta": float(pool.delta[p, j])})
    records = pd.DataFrame(rows).sample(frac=1.0, random_state=0)
    rebuilt = pools(records)[("m", 0)]
    np.testing.assert_array_equal(rebuilt.experts, pool.experts)
    np.testing.assert_array_equal(rebuilt.delta, pool.delta)
    np.testing.assert_array_equal(rebuilt.seq_id, pool.seq_id)


def test_p_perm_is_the_plus_one_share_of_as_extreme_draws():
    res = _null_result(0.3, np.array([0.1, -0.35, 0.3, np.nan, -0.2, 0.5]), 10)
    assert res.n_perm == 5
    assert res.p_perm == pytest.approx((1 + 3) / (1 + 5))  # |-0.35|, 0.3 (ties count), 0.5
    assert res.d_perm_low == pytest.approx(np.quantile([0.1, -0.35, 0.3, -0.2, 0.5], 0.025))


def test_random_ranking_null_matches_the_exact_permutation_distribution():
    """Five experts: all 120 relabelings enumerated give the exact p; 3000 random ones agree within MC error."""
    pool = synthetic_pool(n_positions=30, n_experts=5, top_k=3, importance=[0, 0.2, 0.4, 0.6, 0.8], seed=4)
    metric = np.array([0.1, 0.5, 0.2, 0.9, 0.7])
    observed = brute_force_d(pool, lambda p, j: metric[pool.experts[p, j]])
    exact = [brute_force_d(pool, lambda p, j, perm=perm: metric[list(perm)][pool.experts[p, j]])
             for perm in itertools.permutations(range(5))]
    p_exact = np.mean(np.abs(exact) >= abs(observed) - 1e-12)
    res = random_ranking_null(pool, metric, n_perm=3000, seed=0)
    assert res.d_obs == pytest.approx(observed, abs=1e-12)
    assert abs(res.p_perm - p_exact) < 4 * np.sqrt(p_exact * (1 - p_exact) / 3000) + 1e-3


def test_random_ranking_null_finds_a_planted_metric():
    importance = np.linspace(0.0, 1.5, 16)
    pool = synthetic_pool(n_positions=200, n_experts=16, importance=importance, noise=1.0, n_docs=40, seed=5)
    res = random_ranking_null(pool, importance, n_perm=1000, seed=1)
    assert res.p_perm < 0.01
    assert res.d_obs > res.d_perm_high


def test_random_ranking_null_is_calibrated_for_a_metric_unrelated_to_delta():
    """Heterogeneous experts (where token-level tests of an arbitrary ranking over-reject), metrics drawn at random:
    p_perm is uniform (KS) and rejects at about 5 %."""
    importance = np.random.default_rng(6).normal(scale=0.6, size=16)
    pool = synthetic_pool(n_positions=120, n_experts=16, importance=importance, n_docs=30, seed=7)
    rng = np.random.default_rng(8)
    results = [random_ranking_null(pool, rng.normal(size=16), n_perm=199, seed=i) for i in range(300)]
    p = np.array([r.p_perm for r in results])
    assert sps.kstest(p, "uniform").pvalue > 1e-3
    low, high = sps.binomtest(int((p <= 0.05).sum()), len(p)).proportion_ci(0.999)
    assert low <= 0.05 <= high
    # the token-level t-test of the same arbitrary rankings rejects far more often: it answers another question
    p_t = np.array([2 * sps.t.sf(abs(r.d_obs) * np.sqrt(120), 119) for r in results])
    assert (p_t < 0.05).mean() > 0.2


def test_within_token_null_recovers_the_weight_ranking_and_is_calibrated():
    pool = synthetic_pool(n_positions=80, seed=9)
    res = within_token_null(pool, n_perm=500, seed=0)
    assert res.d_obs == pytest.approx(brute_force_d(pool, lambda p, j: pool.weights[p, j]), abs=1e-9)
    # ΔL independent of the weights: p uniform over fresh data sets
    p = np.array([within_token_null(synthetic_pool(n_positions=60, seed=100 + i), n_perm=199, seed=i).p_perm
                  for i in range(150)])
    assert sps.kstest(p, "uniform").pvalue > 1e-3
    # ΔL growing with the weight: detected
    planted = synthetic_pool(n_positions=120, seed=10)
    planted = Pool("m", 0, planted.seq_id, planted.position, planted.experts,
                   planted.delta + 3.0 * np.nan_to_num(planted.weights), planted.weights)
    assert within_token_null(planted, n_perm=500, seed=0).p_perm < 0.01


def test_cross_fitted_d_equals_a_loop_over_the_halves():
    pool = synthetic_pool(n_positions=50, importance=np.linspace(0, 1, 8), n_docs=8, seed=11)
    docs = np.unique(pool.seq_id)
    in_a = _halvings(docs.size, 4, np.random.default_rng(0))
    got = cross_fitted_d(pool, 8, in_a)
    for s in range(4):
        a_docs = set(docs[in_a[s]])
        ds = []
        for fit, score in ((True, False), (False, True)):
            fit_rows = [p for p in range(pool.n_positions) if (pool.seq_id[p] in a_docs) == fit]
            means = np.full(8, np.nan)
            for e in range(8):
                vals = [pool.delta[p, j] for p in fit_rows for j in range(4) if pool.experts[p, j] == e]
                means[e] = np.mean(vals) if vals else np.nan
            sub = pool.subset(np.array([(pool.seq_id[p] in a_docs) == score for p in range(pool.n_positions)]))
            ds.append(brute_force_d(sub, lambda p, j, sub=sub, means=means: means[sub.experts[p, j]]))
        assert got[s] == pytest.approx(np.mean(ds), abs=1e-12)


def test_causal_ceiling_with_and_without_expert_heterogeneity():
    strong = synthetic_pool(n_positions=300, n_experts=16, importance=np.linspace(0, 2, 16), n_docs=60, seed=12)
    truth = brute_force_d(strong, lambda p, j: np.linspace(0, 2, 16)[strong.experts[p, j]])
    ceiling = causal_ceiling(strong, 16, n_splits=100, seed=0)
    assert ceiling.d_ceiling_low <= ceiling.d_ceiling <= ceiling.d_ceiling_high
    assert 0.5 * truth < ceiling.d_ceiling <= truth + 0.1  # conservative: estimated on half the documents
    flat = synthetic_pool(n_positions=300, n_experts=16, n_docs=60, seed=13)
    assert abs(causal_ceiling(flat, 16, n_splits=100, seed=0).d_ceiling) < 0.1
    few = synthetic_pool(n_positions=20, n_docs=3, seed=14)
    assert np.isnan(causal_ceiling(few, 8).d_ceiling)


def test_sequential_relabelings_reach_a_corrected_level_only_where_needed():
    importance = np.linspace(0.0, 1.5, 16)
    pool = synthetic_pool(n_positions=200, n_experts=16, importance=importance, n_docs=40, seed=5)
    strong = random_ranking_null(pool, importance, n_perm=500, max_perm=3000, seed=0)
    # extended: fewer than 10 of the first 500 were as extreme
    assert strong.n_perm == 3000 and strong.p_perm < 0.05 / 15
    weak = random_ranking_null(pool, np.random.default_rng(0).normal(size=16), n_perm=500, max_perm=3000, seed=0)
    assert weak.n_perm == 500  # 10 as extreme among the first 500: settled
