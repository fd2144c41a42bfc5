"""The metric-level test (pooled one-sided relabeling test over layers), its shared per-layer null, the audit's tie
keys, NaN experts, Holm, the share of the ceiling and the metric decision: against brute-force enumeration and
simulations with a known truth."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from moeaudit.experiments._audit_expert import metric_decision
from moeaudit.experiments._ceiling_share import _replicate, ratio_interval
from moeaudit.experiments._expert_null import causal_ceiling
from moeaudit.experiments._metric_test import (
    LayerNull,
    layer_nulls,
    null_key,
    observed_d,
    pooled_metric_test,
    relabeled_d,
    tie_keys,
)
from moeaudit.experiments._pool import Pool
from tests.test_expert_null import synthetic_pool


def loop_d(pool: Pool, values: np.ndarray, keys: np.ndarray) -> float:
    """Per position, high / low = max / min of (value, tie key) among active experts with a finite value."""
    diffs = []
    for p in range(pool.n_positions):
        cand = [(values[pool.experts[p, j]], keys[p, j], j) for j in range(pool.experts.shape[1])
                if pool.experts[p, j] >= 0 and np.isfinite(values[pool.experts[p, j]])]
        if len(cand) < 2:
            continue
        hi, lo = max(cand)[2], min(cand)[2]
        diffs.append(pool.delta[p, hi] - pool.delta[p, lo])
    diffs = np.asarray(diffs)
    return float(diffs.mean() / diffs.std(ddof=1))


def exact_null(pool: Pool, values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """d of every relabeling of the finite values across the finite slots (NaN experts stay), by loop."""
    slots = np.flatnonzero(np.isfinite(values))
    out = []
    for perm in itertools.permutations(values[slots]):
        v = values.copy()
        v[slots] = perm
        out.append(loop_d(pool, v, keys))
    return np.asarray(out)


def test_tie_keys_are_the_audit_keys():
    from moeaudit.experiments._run import _tie_keys

    pool = synthetic_pool(n_positions=12, n_experts=6, top_k=3, ragged=True, seed=3)
    keys = tie_keys(pool, seed=5)
    for p in range(pool.n_positions):
        k = int(pool.active[p].sum())
        expected = _tie_keys(5, pool.layer, int(pool.seq_id[p]), int(pool.position[p]), k)
        np.testing.assert_array_equal(keys[p, :k], expected)
        assert np.isnan(keys[p, k:]).all()


def test_observed_d_breaks_ties_by_the_audit_keys_and_leaves_nan_experts_out():
    pool = synthetic_pool(n_positions=50, n_experts=6, top_k=4, importance=np.linspace(0, 1, 6), seed=2)
    keys = tie_keys(pool, seed=0)
    values = np.array([1.0, 1.0, np.nan, 2.0, 2.0, 0.5])
    assert observed_d(pool, values, keys) == pytest.approx(loop_d(pool, values, keys), abs=1e-12)


@pytest.mark.parametrize("values", [np.array([0.3, 0.1, 0.9, 0.5]), np.array([0.3, np.nan, 0.9, 0.5, 0.2]),
                                    np.array([0.3, 0.3, 0.9, 0.5])])
def test_the_layer_null_is_the_exact_relabeling_distribution(values):
    """All relabelings enumerated (a NaN expert held out, ties broken by the audit's keys): 20,000 random draws
    match the exact distribution (KS) and its mean."""
    pool = synthetic_pool(n_positions=40, n_experts=values.size, top_k=3, importance=np.linspace(0, 0.8, values.size),
                          seed=6)
    keys = tie_keys(pool, seed=1)
    exact = exact_null(pool, values, keys)
    draws = relabeled_d(pool, values, keys, 20_000, np.random.default_rng(0))
    assert sps.ks_2samp(draws, np.repeat(exact, 200)).statistic < 0.02
    assert draws.mean() == pytest.approx(exact.mean(), abs=4 * exact.std() / np.sqrt(20_000) + 1e-9)


def test_pooled_p_matches_brute_force_over_two_layers():
    """Two layers of four experts: the 24 × 24 joint relabelings give the exact p of T = z_0 + z_1; the Monte Carlo
    p from 20,000 draws per layer agrees within its binomial error."""
    values = np.array([0.2, 0.8, 0.5, 0.9])
    pools = [synthetic_pool(n_positions=40, n_experts=4, top_k=3, importance=[0, .3, .2, .5], seed=s) for s in (1, 2)]
    pools = [Pool(p.model, layer, p.seq_id, p.position, p.experts, p.delta, p.weights) for layer, p in enumerate(pools)]
    keys = [tie_keys(p, seed=0) for p in pools]
    exact = [exact_null(p, values, k) for p, k in zip(pools, keys)]
    obs = [loop_d(p, values, k) for p, k in zip(pools, keys)]
    z = [(e - e.mean()) / e.std() for e in exact]
    t_obs = sum((o - e.mean()) / e.std() for o, e in zip(obs, exact))
    p_exact = np.mean((z[0][:, None] + z[1][None, :]).ravel() >= t_obs - 1e-12)
    nulls = {layer: LayerNull.of(relabeled_d(p, values, k, 20_000, np.random.default_rng(layer)))
             for layer, (p, k) in enumerate(zip(pools, keys))}
    res = pooled_metric_test({layer: observed_d(p, values, k) for layer, (p, k) in enumerate(zip(pools, keys))}, nulls)
    assert res.pooled_z == pytest.approx(t_obs, abs=0.05)
    assert abs(res.p_metric - p_exact) < 4 * np.sqrt(p_exact * (1 - p_exact) / 20_000) + 2e-3


def test_tie_free_metrics_share_one_null_per_layer():
    pool = synthetic_pool(n_positions=30, n_experts=8, top_k=3, seed=3)
    keys = tie_keys(pool, seed=0)
    rng = np.random.default_rng(0)
    metrics = {"a": rng.normal(size=8), "b": rng.normal(size=8), "tied": np.repeat([1.0, 2.0], 4)}
    nulls = layer_nulls(pool, metrics, keys, n_draws=200, seed=[0, 0])
    assert nulls["a"] is nulls["b"] and nulls["tied"] is not nulls["a"]
    assert null_key(metrics["a"]) == null_key(metrics["b"])
    again = layer_nulls(pool, {"a": metrics["a"]}, keys, n_draws=200, seed=[0, 0])  # not dependent on the others
    np.testing.assert_array_equal(again["a"].draws, nulls["a"].draws)


def test_pooled_test_is_calibrated_and_has_power():
    """Unrelated metrics: p_metric uniform, rejecting about 5 %; the causal ranking over three layers: p tiny."""
    importance = [np.random.default_rng(s).normal(scale=0.4, size=8) for s in range(3)]
    pools = [synthetic_pool(n_positions=60, n_experts=8, top_k=3, importance=imp, n_docs=15, seed=10 + s)
             for s, imp in enumerate(importance)]
    keys = [tie_keys(p, 0) for p in pools]
    null_draws = {s: LayerNull.of(relabeled_d(p, np.arange(8.0), k, 2000, np.random.default_rng(s)))
                  for s, (p, k) in enumerate(zip(pools, keys))}
    rng = np.random.default_rng(1)
    ps = []
    for _ in range(300):
        values = rng.normal(size=8)
        ps.append(pooled_metric_test({s: observed_d(p, values, k) for s, (p, k) in enumerate(zip(pools, keys))},
                                     null_draws).p_metric)
    ps = np.asarray(ps)
    low, high = sps.binomtest(int((ps <= 0.05).sum()), ps.size).proportion_ci(0.999)
    assert low <= 0.05 <= high
    assert sps.kstest(ps, "uniform").pvalue > 1e-3
    causal = pooled_metric_test({s: observed_d(p, importance[s], k) for s, (p, k) in enumerate(zip(pools, keys))},
                                null_draws)
    assert causal.p_metric < 0.01 and causal.pooled_z > 3


def test_bootstrap_replicate_repeats_documents_as_new_units():
    pool = synthetic_pool(n_positions=30, n_experts=6, top_k=3, n_docs=6, seed=1)
    keys = tie_keys(pool, 0)
    docs = np.unique(pool.seq_id)
    draw = np.array([0, 0, 2, 3, 3, 3])[: docs.size]
    rep, rep_keys = _replicate(pool, keys, draw, docs)
    counts = np.bincount(draw, minlength=docs.size)
    assert rep.n_positions == sum(counts[np.searchsorted(docs, s)] for s in pool.seq_id)
    assert np.unique(rep.seq_id).size == counts.sum()  # every drawn copy is its own document
    np.testing.assert_array_equal(np.isnan(rep_keys), ~rep.active)
    identity, _ = _replicate(pool, keys, np.arange(docs.size), docs)
    assert causal_ceiling(identity, 6, seed=0).d_ceiling == pytest.approx(causal_ceiling(pool, 6, seed=0).d_ceiling)


def test_ratio_interval_and_decision():
    rng = np.random.default_rng(0)
    num, den = rng.normal(1, 0.1, 1000), rng.normal(4, 0.1, 1000)
    low, high = ratio_interval(num, den)
    assert low < 0.25 < high < 0.5
    row = pd.Series({"n_informative": 2, "p_metric_holm": 0.3, "ceiling_share_high": high})
    assert metric_decision(row) == "below_half_ceiling"
    assert metric_decision(pd.Series({"n_informative": 0, "p_metric_holm": 0.3, "ceiling_share_high": np.nan})) \
        == "cannot_tell"
    assert metric_decision(pd.Series({"n_informative": 1, "p_metric_holm": 0.01, "ceiling_share_high": 0.2})) \
        == "supported"
    assert metric_decision(pd.Series({"n_informative": 1, "p_metric_holm": 0.2, "ceiling_share_high": 0.9})) \
        == "not_distinguishable"


def test_decision_checks_hold_the_level_and_find_a_strong_ranking():
    """validate's checks of the rule that decides on synthetic pools: the planted s = 0 metric is rejected at about
    α, the causal ranking of strongly differing experts is found, the document-flip null holds the mean test's
    level, and n_needed falls where the effect is strong."""
    from moeaudit.experiments._rule_power import decision_checks

    importance = np.linspace(0, 1.2, 8)
    layer_pools = {}
    for layer in range(3):
        p = synthetic_pool(n_positions=120, n_experts=8, top_k=3, importance=importance, n_docs=30, seed=20 + layer)
        layer_pools[layer] = (Pool(p.model, layer, p.seq_id, p.position, p.experts, p.delta, p.weights), 8)
    out = decision_checks(layer_pools, {0: 2, 1: 2, 2: 2}, seed=0, n_skewed=300, n_power_draws=40)
    assert set(out["null_rate_skewed"]) == {"clustered_mean", "mean_test"}
    flip = out["null_rate_docflip"]["mean_test"]
    assert flip["ci_low"] <= 0.05 <= flip["ci_high"] + 0.02
    rows = pd.DataFrame(out["power_rule"])
    assert set(rows["scope"]) == {"layer 0", "layer 1", "layer 2", "pooled"}
    null_rate = rows[(rows["strength"] == 0.0) & (rows["scope"] == "pooled")]["rate"].iloc[0]
    assert null_rate <= 0.15
    assert out["p_detect_ceiling"]["pooled"] > 0.8
    assert np.isfinite(out["n_needed_ceiling"]) and out["n_needed_ceiling"] < 120


def test_answer_has_at_most_five_sentences_each_from_a_test():
    from moeaudit.report._answer import answer_sentences, scorecard_figure

    metrics = pd.DataFrame({"metric": ["a", "b", "c", "d"], "p_metric_holm": [0.01, 0.3, 0.4, np.nan],
                            "ceiling_share": [0.9, 0.6, 0.1, np.nan], "ceiling_share_low": [0.7, 0.1, -0.2, np.nan],
                            "ceiling_share_high": [1.1, 1.0, 0.4, np.nan],
                            "decision": ["supported", "not_distinguishable", "below_half_ceiling", "cannot_tell"]})
    audit = pd.DataFrame({"layer": [0, 0, 1, 1], "metric": ["a", "b", "a", "b"], "n": 200,
                          "layer_informative": [True, True, False, False], "d_perm_pct": [99.0, 60.0, 50.0, 40.0],
                          "ceiling_share": [0.9, 0.6, 2.0, -1.0]})
    validation = {"p_detect_ceiling": {"pooled": 0.11}, "n_needed": float("nan"), "n_needed_ceiling": 900.0}
    sentences = answer_sentences(metrics, audit, validation)
    assert len(sentences) <= 5
    text = " ".join(sentences)
    assert "better than random rankings (pooled one-sided relabeling test" in text and "a (p = 0.01" in text
    assert "Not distinguishable from random rankings" in text and "less than half of the causal ceiling" in text
    assert "no better than random" not in text.lower()
    assert len(sentences) == 5 and "1 of 2 layers is informative" in text and "probability 0.11" in text and "n = 900" in text
    assert scorecard_figure(audit, "m") is not None


def test_rank_validity_relabeling_null_against_a_loop_and_exact_enumeration():
    """Mean within-token Spearman ρ of the pool equals scipy's per token; the relabeling p equals the exact
    enumeration over all 120 labelings of five experts within Monte Carlo error."""
    from moeaudit.experiments._rank_null import mean_rho, rank_relabel_p

    pool = synthetic_pool(n_positions=40, n_experts=5, top_k=4, importance=[0, .2, .4, .6, .8], seed=8)
    values = np.array([0.3, 0.1, 0.9, 0.5, 0.7])

    def loop(v):
        rhos = []
        for p in range(pool.n_positions):
            e = pool.experts[p][pool.experts[p] >= 0]
            if e.size >= 3:
                rhos.append(sps.spearmanr(v[e], pool.delta[p, : e.size]).statistic)
        return np.nanmean(rhos)

    assert mean_rho(pool, values[None])[0] == pytest.approx(loop(values), abs=1e-12)
    exact = np.array([loop(np.asarray(perm)) for perm in itertools.permutations(values)])
    obs, p = rank_relabel_p(pool, values, n_draws=4000, seed=0)
    p_exact = np.mean(np.abs(exact) >= abs(obs) - 1e-12)
    assert abs(p - p_exact) < 4 * np.sqrt(p_exact * (1 - p_exact) / 4000) + 2e-3
