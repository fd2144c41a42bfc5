"""``validate``'s stated power of the rule that decides, against a simulation with known truth.

A world of L layers with fixed true expert importances μ_{l,e}; each run draws fresh documents (skewed ΔL, an
expert × document interaction so positions of one document are correlated). The metric "at the ceiling's strength"
is what ``validate`` plants at s = 1: the experts ranked by their mean ΔL estimated on half as many documents,
independent of the positions it is scored on. The truth: the share of fresh runs in which the decision's pooled
metric-level test (:func:`pooled_metric_test`, the run's relabeling nulls) rejects at validate's α / m_metrics.
The claim: ``validate``'s ``p_detect_ceiling`` (pooled), computed from one run's records alone, matches that share
on average over runs, within the binomial error of both and the run-to-run spread of validate's estimate."""

from __future__ import annotations

import numpy as np
import pytest

from moeaudit.experiments._metric_test import LayerNull, observed_d, pooled_metric_test, relabeled_d, tie_keys
from moeaudit.experiments._pool import Pool
from moeaudit.experiments._rule_power import rule_power

LAYERS, E, K, DOCS, PER_DOC = 3, 8, 3, 30, 6
ALPHA_RULE = 0.05 / 4  # four metrics: Holm's first step, as validate uses


def _truth(rng: np.random.Generator) -> np.ndarray:
    return rng.normal(0.0, 0.06, size=(LAYERS, E))


def _pool(layer: int, mu: np.ndarray, n_docs: int, rng: np.random.Generator) -> Pool:
    seq = np.repeat(np.arange(n_docs), PER_DOC)
    n = seq.size
    experts = np.argsort(rng.random((n, E)), axis=1)[:, :K]
    interaction = rng.normal(0.0, 0.1, size=(n_docs, E))[seq[:, None], experts]
    noise = 0.15 * (rng.gamma(0.5, 1.0, size=(n, K)) - 0.5)  # skewness ≈ 2.8
    delta = mu[experts] + interaction + noise
    return Pool("m", layer, seq, np.tile(np.arange(PER_DOC), n_docs), experts.astype(np.int64), delta,
                rng.random((n, K)))


def _expert_means(pool: Pool) -> np.ndarray:
    sums = np.bincount(pool.experts.ravel(), weights=pool.delta.ravel(), minlength=E)
    return sums / np.maximum(np.bincount(pool.experts.ravel(), minlength=E), 1)


def _detected(mu: np.ndarray, rng: np.random.Generator) -> bool:
    """One fresh run: the metric from an independent half-size sample, the decision's pooled test."""
    d_obs, nulls = {}, {}
    for layer in range(LAYERS):
        pool = _pool(layer, mu[layer], DOCS, rng)
        metric = _expert_means(_pool(layer, mu[layer], DOCS // 2, rng))
        d_obs[layer] = observed_d(pool, metric, tie_keys(pool, 0))
        nulls[layer] = LayerNull.of(relabeled_d(pool, np.arange(float(E)), None, 2000, rng))
    return pooled_metric_test(d_obs, nulls).p_metric <= ALPHA_RULE


def _stated(mu: np.ndarray, rng: np.random.Generator) -> float:
    """validate's p_detect_ceiling (pooled) from one run's records."""
    pools = [(_pool(layer, mu[layer], DOCS, rng), E) for layer in range(LAYERS)]
    rows, _ = rule_power(pools, alpha_rule=ALPHA_RULE, n_draws=40, n_null=2000, rng=rng)
    return next(r["rate"] for r in rows if r["scope"] == "pooled" and r["strength"] == 1.0)


@pytest.mark.slow
def test_a_metric_at_the_ceilings_strength_is_found_with_the_stated_power():
    rng = np.random.default_rng(2026)
    mu = _truth(rng)
    n_truth, n_runs = 150, 12
    truth = np.array([_detected(mu, rng) for _ in range(n_truth)])
    stated = np.array([_stated(mu, rng) for _ in range(n_runs)])
    p_true = truth.mean()
    assert 0.15 < p_true < 0.95, f"the world should give intermediate power, got {p_true}"
    se = np.sqrt(p_true * (1 - p_true) / n_truth + stated.var(ddof=1) / n_runs)
    assert abs(stated.mean() - p_true) < 3 * se, (stated.mean(), p_true, se)
