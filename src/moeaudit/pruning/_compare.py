"""The measured results of a prune-eval run: held-out mean loss and perplexity of every pruned model, the paired
tests of each criterion against the random band and the causal reference, and per-layer loss increases.

Mean loss is token-weighted: the mean next-token cross-entropy over every predicted token of the evaluation split
(documents contribute in proportion to their length); perplexity is its exponential.

Tests (per criterion x fraction; Holm-corrected across all rows of each test, at ``alpha``):

- **vs random**, estimand δ = mean loss(criterion) - mean over seeds of mean loss(random seed s). Two questions,
  both required for a claim: (1) does it generalise over documents? Paired per token against the seeds' mean
  per-token loss, clustered by document (:func:`moeaudit.stats.clustered_difference`: CR1 t and document sign-flip,
  both); (2) does it generalise over random draws of experts? :func:`moeaudit.stats.prediction_test` of the
  criterion's mean loss against the S seeds' (unit: the seed). Two fixed random prunings differ in truth, so (1)
  alone would call a lucky or unlucky draw "better" or "worse than random"; (2) asks whether the criterion lies
  outside the spread of random prunings.
- **vs causal**, estimand δ = mean loss(criterion) - mean loss(causal reference): two fixed pruned models, so the
  document-level test (1) only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from moeaudit.pruning._config import CAUSAL, NONE, RANDOM
from moeaudit.pruning._units import PruneUnit
from moeaudit.stats import clustered_difference, clustered_mean, correct, prediction_test

PRUNE_COLUMNS = ["criterion", "fraction", "seed", "method", "n_tokens", "mean_loss", "perplexity"]
BETTER, WORSE, INCONCLUSIVE = "better", "worse", "inconclusive"


def loss_tables(units: Sequence[PruneUnit], losses: Mapping[str, np.ndarray]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``prune.csv`` (every pruned layer pruned, the unpruned model as criterion ``none``) and
    ``prune_per_layer.csv`` (one layer at a time, with its ``layer``)."""
    rows, per_layer = [], []
    for u in units:
        loss = losses[u.key]
        mean = float(loss.mean())
        row = [u.criterion, u.fraction, u.seed, u.method, int(loss.size), mean, float(np.exp(mean))]
        (rows if u.layer is None else per_layer).append(row if u.layer is None else [*row[:3], u.layer, *row[3:]])
    prune = pd.DataFrame(rows, columns=PRUNE_COLUMNS)
    layered = pd.DataFrame(per_layer, columns=[*PRUNE_COLUMNS[:3], "layer", *PRUNE_COLUMNS[3:]])
    return prune, layered


def _index(units: Sequence[PruneUnit], per_layer: bool) -> dict[tuple, list[PruneUnit]]:
    out: dict[tuple, list[PruneUnit]] = defaultdict(list)
    for u in units:
        if (u.layer is not None) == per_layer:
            out[(u.criterion, u.fraction, u.layer)].append(u)
    return out


def _decide(delta: float, rejected: Sequence[bool]) -> str:
    if all(rejected) and np.isfinite(delta) and delta != 0:
        return BETTER if delta < 0 else WORSE
    return INCONCLUSIVE


def paired_tests(units: Sequence[PruneUnit], losses: Mapping[str, np.ndarray], docs: np.ndarray, *,
                 alpha: float = 0.05, n_perm: int = 10000, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per (criterion, fraction) of the all-layer prunings (``random`` itself excluded): the comparisons
    against the random band and the causal reference described in the module docstring.

    Columns: ``criterion, fraction, mean_loss``; vs random: ``random_mean_loss, random_sd, delta_random,
    ci_low_random, ci_high_random, p_t_random, p_signflip_random, p_seed`` and their ``*_holm`` versions, the
    decisions ``vs_random_docs`` (document-level tests only: against these seeds' mean) and ``vs_random`` (also the
    seed-level test: against random pruning in general), each better / worse / inconclusive; vs causal: ``causal_mean_loss, delta_causal,
    ci_low_causal, ci_high_causal, p_t_causal, p_signflip_causal`` (+ ``*_holm``) and ``vs_causal``.
    """
    index = _index(units, per_layer=False)
    fractions = sorted({u.fraction for u in units if u.criterion != NONE})
    rows = []
    for fraction in fractions:
        seeds = [losses[u.key] for u in index.get((RANDOM, fraction, None), [])]
        band = np.mean(seeds, axis=0) if len(seeds) >= 2 else None
        causal = index.get((CAUSAL, fraction, None))
        causal_loss = losses[causal[0].key] if causal else None
        for (criterion, f, _), (unit, *_) in index.items():
            if f != fraction or criterion in (RANDOM, NONE):
                continue
            loss = losses[unit.key]
            row: dict = {"criterion": criterion, "fraction": fraction, "mean_loss": float(loss.mean())}
            if band is not None:
                d = clustered_difference(loss, band, docs, n_perm=n_perm, n_boot=n_boot, seed=seed)
                pt = prediction_test(float(loss.mean()), [float(s.mean()) for s in seeds])
                row.update(random_mean_loss=float(band.mean()), random_sd=pt.reference_sd, delta_random=d.estimate,
                           ci_low_random=d.ci_low, ci_high_random=d.ci_high, p_t_random=d.p_t,
                           p_signflip_random=d.p_signflip, p_seed=pt.p)
            if causal_loss is not None and criterion != CAUSAL:
                d = clustered_difference(loss, causal_loss, docs, n_perm=n_perm, n_boot=n_boot, seed=seed)
                row.update(causal_mean_loss=float(causal_loss.mean()), delta_causal=d.estimate,
                           ci_low_causal=d.ci_low, ci_high_causal=d.ci_high, p_t_causal=d.p_t,
                           p_signflip_causal=d.p_signflip)
            rows.append(row)
    table = pd.DataFrame(rows)
    return _corrected(table, alpha)


_DOCS_P = ("p_t_random", "p_signflip_random")
_CAUSAL_P = ("p_t_causal", "p_signflip_causal")


def _corrected(table: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Holm-correct every p column over the rows; decide ``vs_random_docs`` (document-level tests only),
    ``vs_random`` (document-level and seed-level) and ``vs_causal``."""
    for column in (*_DOCS_P, "p_seed", *_CAUSAL_P):
        if column in table.columns:
            p = table[column].to_numpy(dtype=float)
            table[f"{column}_holm"] = correct(p, "holm", alpha).p_corrected if np.isfinite(p).any() else p
    for decision, delta, columns in (("vs_random_docs", "delta_random", _DOCS_P),
                                     ("vs_random", "delta_random", (*_DOCS_P, "p_seed")),
                                     ("vs_causal", "delta_causal", _CAUSAL_P)):
        if delta not in table.columns:
            continue
        table[decision] = [
            _decide(d, [bool(row[f"{c}_holm"] < alpha) for c in columns]) if np.isfinite(d) else "n/a"
            for d, (_, row) in zip(table[delta].to_numpy(dtype=float), table.iterrows())]
    return table


def per_layer_effects(units: Sequence[PruneUnit], losses: Mapping[str, np.ndarray], docs: np.ndarray) -> pd.DataFrame:
    """Per (criterion, fraction, layer) of the one-layer prunings: the loss increase over the unpruned model,
    token-weighted, with a document-clustered 95% interval (``random``: of the seeds' mean per-token loss, with the
    seeds' range ``seed_min`` / ``seed_max``)."""
    base = losses[NONE]
    rows = []
    for (criterion, fraction, layer), group in sorted(_index(units, per_layer=True).items(),
                                                      key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        arms = [losses[u.key] - base for u in group]
        cm = clustered_mean(np.mean(arms, axis=0), docs)
        means = [float(a.mean()) for a in arms]
        rows.append({"criterion": criterion, "fraction": fraction, "layer": layer, "delta_loss": cm.estimate,
                     "ci_low": cm.ci_low, "ci_high": cm.ci_high, "seed_min": min(means), "seed_max": max(means),
                     "n_seeds": len(arms)})
    return pd.DataFrame(rows)


def by_method(compute, units: Sequence[PruneUnit], *args, **kwargs) -> pd.DataFrame:
    """``compute(units, ...)`` (:func:`paired_tests` or :func:`per_layer_effects`) once per removal method, on the
    unpruned model and that method's prunings (so ``random`` and ``causal`` of the same method are the references,
    and Holm corrects within each method), with a ``method`` column after ``fraction``."""
    methods = list(dict.fromkeys(u.method for u in units if u.criterion != NONE))
    parts = []
    for method in methods:
        table = compute([u for u in units if u.criterion == NONE or u.method == method], *args, **kwargs)
        if len(table):
            table.insert(int(table.columns.get_loc("fraction")) + 1, "method", method)
        parts.append(table)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
