r"""The share of the causal ceiling a metric's ranking reaches, with a document-bootstrap interval, per audit cell and
pooled over a metric's informative layers.

.. math::

    \text{share}_{l} = d_l / d^{ceil}_l, \qquad \text{share}_M = \sum_{l \in I} d_l \Big/ \sum_{l \in I} d^{ceil}_l

d_l is the d_z of the metric's ranking (the audit cell's d), :math:`d^{ceil}_l` the cross-fitted d of the ranking by
mean ΔL (:func:`~moeaudit.experiments._expert_null.causal_ceiling`) and I the informative layers (ceiling above the
random band). Interval: percentile over B document-bootstrap replicates; a replicate draws the run's documents with
replacement once (the same draw at every layer, since the layers share the documents) and recomputes both d and the
ceiling (with fewer halvings) on the replicated positions, so the interval carries the noise of the ceiling too.
Unit of inference: the document. Reference: Efron & Tibshirani (1993), An Introduction to the Bootstrap, ch. 13.
"""

from __future__ import annotations

import numpy as np

from moeaudit.experiments._expert_null import causal_ceiling
from moeaudit.experiments._metric_test import _dense_rank, _scores
from moeaudit.experiments._pool import Pool, high_low_d

#: Bootstrap replicates of the share and halvings of each replicate's ceiling.
N_SHARE_BOOT = 200
SHARE_SPLITS = 20


def _replicate(pool: Pool, keys: np.ndarray, doc_draw: np.ndarray, docs: np.ndarray):
    """The pool (and its tie keys) with every document repeated as often as ``doc_draw`` drew it; each copy is a
    new document id so that the ceiling's halvings treat copies as separate units."""
    counts = np.bincount(doc_draw, minlength=docs.size)
    doc_index = np.searchsorted(docs, pool.seq_id)
    rows, new_ids = [], []
    for copy in range(int(counts.max())):
        take = np.flatnonzero(counts[doc_index] > copy)
        rows.append(take)
        new_ids.append(doc_index[take] + copy * docs.size)
    rows_all = np.concatenate(rows)
    order = np.argsort(np.concatenate(new_ids), kind="stable")
    rows_all = rows_all[order]
    sub = pool.subset(rows_all)
    sub = Pool(sub.model, sub.layer, np.sort(np.concatenate(new_ids)), sub.position, sub.experts, sub.delta,
               sub.weights)
    return sub, keys[rows_all]


def share_bootstrap(layers: dict[int, tuple[Pool, int, np.ndarray]], metric_values: dict[int, dict[str, np.ndarray]],
                    *, n_boot: int = N_SHARE_BOOT, seed=0) -> tuple[dict, dict]:
    """Bootstrap replicates of each cell's d and each layer's ceiling.

    Args:
        layers: layer -> (pool, n_experts, tie keys [P, K]).
        metric_values: layer -> {metric: [n_experts] values}.

    Returns:
        ``(d_boot, ceiling_boot)``: {(layer, metric): [B]} and {layer: [B]}.
    """
    docs = np.unique(np.concatenate([pool.seq_id for pool, _, _ in layers.values()]))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, docs.size, size=(n_boot, docs.size))
    d_boot = {(layer, m): np.full(n_boot, np.nan) for layer in layers for m in metric_values.get(layer, {})}
    ceiling_boot = {layer: np.full(n_boot, np.nan) for layer in layers}
    for layer, (pool, n_experts, keys) in layers.items():
        ranks = {m: _dense_rank(np.asarray(v, dtype=float)) for m, v in metric_values.get(layer, {}).items()}
        for b in range(n_boot):
            rep, rep_keys = _replicate(pool, keys, draws[b], docs)
            if rep.n_positions < 3:
                continue
            ceiling_boot[layer][b] = causal_ceiling(rep, n_experts, n_splits=SHARE_SPLITS,
                                                    seed=[int(b), int(layer)]).d_ceiling
            for m, rank in ranks.items():
                d_boot[(layer, m)][b] = high_low_d(rep, _scores(rep, rank[None], rep_keys))[0]
    return d_boot, ceiling_boot


def ratio_interval(num: np.ndarray, den: np.ndarray) -> tuple[float, float]:
    """2.5 / 97.5 % percentile interval of num / den over the replicates where the ceiling is positive."""
    ok = np.isfinite(num) & np.isfinite(den) & (den > 0)
    if ok.sum() < 20:
        return float("nan"), float("nan")
    low, high = np.quantile(num[ok] / den[ok], (0.025, 0.975))
    return float(low), float(high)
