r"""Expert-level inference from the single-expert pool: the random-ranking null of a metric (``p_perm``), its
per-token counterpart for the routing-weight control, and the causal ceiling of static rankings (``d_ceiling``).

Why an expert-level null: a metric is one ranking of a layer's E experts. The token-level tests of an audit cell
ask whether *this* ranking's D has mean zero over positions; the question a verdict about metrics asks is whether
the metric ranks experts better than an arbitrary ranking would. Random rankings of the experts already give
|d| well above the token-level critical value wherever experts differ in importance (some experts cost more
whatever ranks them), so the two questions have different answers. No new ablation is needed: the pool holds ΔL of
every active expert at every sampled position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from moeaudit.experiments._pool import Pool, d_z_rows, high_low_d

#: Random relabelings per cell (the issue's floor is 1000).
N_RELABEL = 1000
#: Random document halvings of the causal ceiling.
N_SPLITS = 200
#: Sequential stopping: relabelings stop once this many are as extreme as the observed d.
ENOUGH_EXTREME = 10
_Q = (0.025, 0.975)
#: What ``numpy.random.default_rng`` accepts: an int or a sequence of ints (e.g. ``[run seed, layer]``).
Seed = int | Sequence[int]


@dataclass(frozen=True)
class ExpertNull:
    """Observed d of a ranking and its distribution under the null (one audit or control cell).

    Attributes:
        d_obs: d_z of D under the observed ranking, recomputed from the pool (equal to the cell's d when the
            metric has no ties and no NaN among active experts).
        p_perm: Two-sided permutation p-value, (1 + #{|d_perm| >= |d_obs|}) / (1 + n_perm).
        d_perm_low, d_perm_high: 2.5 % and 97.5 % quantiles of d_perm.
        n_perm: Null draws with a defined d (draws whose D is degenerate are left out).
        n_positions: Positions of the pool.
    """

    d_obs: float
    p_perm: float
    d_perm_low: float
    d_perm_high: float
    n_perm: int
    n_positions: int


@dataclass(frozen=True)
class CausalCeiling:
    """The cross-fitted d of the ranking by mean ΔL (see :func:`causal_ceiling`)."""

    d_ceiling: float
    d_ceiling_low: float
    d_ceiling_high: float
    n_splits: int
    n_documents: int


def _null_result(d_obs: float, d_perm: np.ndarray, n_positions: int) -> ExpertNull:
    d_perm = d_perm[np.isfinite(d_perm)]
    if not np.isfinite(d_obs) or d_perm.size == 0:
        return ExpertNull(float(d_obs), np.nan, np.nan, np.nan, int(d_perm.size), n_positions)
    # a relative tolerance so that a relabeling equal to the observed ranking counts as "as extreme"
    extreme = _extreme(d_obs, d_perm)
    low, high = np.quantile(d_perm, _Q)
    return ExpertNull(float(d_obs), (1 + extreme) / (1 + d_perm.size), float(low), float(high), int(d_perm.size),
                      n_positions)


def _extreme(d_obs: float, d_perm: np.ndarray) -> int:
    return int(np.sum(np.abs(d_perm[np.isfinite(d_perm)]) >= abs(d_obs) * (1 - 1e-12)))


def _sequential(d_obs: float, draw, n_perm: int, max_perm: int | None) -> np.ndarray:
    """``n_perm`` null draws, then more in blocks of ``n_perm`` up to ``max_perm`` while fewer than
    :data:`ENOUGH_EXTREME` are as extreme as ``d_obs`` (Besag & Clifford 1991): a large p-value is settled early,
    a small one gets the resolution a corrected level needs (p_perm >= 1 / (1 + draws))."""
    if n_perm < 1:
        raise ValueError(f"n_perm={n_perm}: use at least 1 (1000 or more for a report).")
    parts = [draw(n_perm)]
    done = n_perm
    limit = n_perm if max_perm is None else max(int(max_perm), n_perm)
    while done < limit and np.isfinite(d_obs) and _extreme(d_obs, np.concatenate(parts)) < ENOUGH_EXTREME:
        step = min(n_perm, limit - done)
        parts.append(draw(step))
        done += step
    return np.concatenate(parts)


def _dense_rank(values: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... by value (ties share a rank), NaN stays NaN."""
    out = np.full(values.shape, np.nan)
    ok = np.isfinite(values)
    out[ok] = np.unique(values[ok], return_inverse=True)[1]
    return out


def random_ranking_null(pool: Pool, metric_values, *, n_perm: int = N_RELABEL, max_perm: int | None = None,
                        seed: Seed = 0) -> ExpertNull:
    r"""Expert-level permutation null of a metric at one layer.

    Estimand: the d_z of D = ΔL(highest-ranked) − ΔL(lowest-ranked active expert) that the metric's ranking
    achieves, against the d_z of the same construction under random relabelings of the metric across the layer's
    experts. Unit of inference: the expert labelling (the layer's E experts), conditional on the sampled positions
    and their ΔL; H0: the metric's assignment to experts is exchangeable (it carries no information on which
    expert matters).

    Each of ``n_perm`` seeded draws permutes the metric's values across the experts that have a finite value (a
    NaN expert stays out of every labeling) and recomputes, at every pooled position, high = argmax and low = argmin among the active experts with
    a finite value; ties (in the metric, or created by nothing) are broken at random within each draw by a jitter
    below the gap between distinct values. The observed ranking is scored the same way, so observed and null d
    differ only by the labelling.

    .. math::

        p_{perm} = \frac{1 + \#\{r : |d_r| \ge |d_{obs}|\}}{1 + R}

    (two-sided, the +1 counting the observed labelling; Phipson & Smyth 2010), and the 2.5 / 97.5 % quantiles of
    :math:`d_r` give the band of d under random rankings.

    Args:
        pool: The layer's single-expert pool.
        metric_values: [n_experts] the metric of every expert of the layer (index = expert id).
        n_perm: Random relabelings (>= 1000 for the report).
        max_perm: Up to this many when fewer than 10 of the first are as extreme (sequential stopping, so that a
            Bonferroni-corrected level is reachable: e.g. 20 / alpha); default ``n_perm``.
        seed: Seed of the relabelings and tie-breaks.

    References:
        Besag, J., & Clifford, P. (1991). Sequential Monte Carlo p-values. Biometrika, 78(2), 301-304.
        Phipson, B., & Smyth, G. K. (2010). Permutation p-values should never be zero. Stat. Appl. Genet. Mol.
        Biol., 9(1), 39.
    """
    values = np.asarray(metric_values, dtype=float).ravel()
    n_experts = values.size
    if pool.experts.max() >= n_experts:
        raise ValueError(f"the pool of layer {pool.layer} names expert {int(pool.experts.max())} but the metric has "
                         f"{n_experts} values; pass one value per expert of the layer (index = expert id).")
    rng = np.random.default_rng(seed)
    rank = _dense_rank(values)
    observed = rank + rng.random(n_experts) * 0.5
    d_obs = float(high_low_d(pool, observed[None])[0])

    slots = np.flatnonzero(np.isfinite(rank))

    def draw(r: int) -> np.ndarray:  # only experts with a finite value are relabeled: a NaN one stays out
        ranks = np.full((r, n_experts), np.nan)
        ranks[:, slots] = rng.permuted(np.tile(rank[slots], (r, 1)), axis=1)
        return high_low_d(pool, ranks + rng.random((r, n_experts)) * 0.5)

    return _null_result(d_obs, _sequential(d_obs, draw, n_perm, max_perm), pool.n_positions)


def within_token_null(pool: Pool, *, n_perm: int = N_RELABEL, max_perm: int | None = None,
                      seed: Seed = 0) -> ExpertNull:
    r"""The routing-weight control's null: the weights permuted among the active experts within each token.

    The routing weight ranks experts per token, not per expert, so relabelling experts does not apply. Under
    H0 the weight's order among a token's active experts carries no information on their ΔL; permuting the
    weights within each token independently makes (high, low) a uniformly random ordered pair of distinct active
    experts. Estimand: the control's d_z against d_z under random per-token choices. Unit of inference: the token
    (the permutation is independent per position, so it does not see the within-document correlation of D; the
    clustered p-value of the control cell does). ``n_perm`` / ``max_perm`` as in :func:`random_ranking_null`.
    """
    rng = np.random.default_rng(seed)
    weights = np.where(pool.active, pool.weights, np.nan)
    observed = weights + rng.random(weights.shape) * 1e-12 * np.nanmax(np.abs(weights))
    d_obs = float(high_low_d(pool, observed[None])[0])

    def draw(r: int) -> np.ndarray:
        return np.concatenate([high_low_d(pool, rng.random((min(256, r - s), *weights.shape)))
                               for s in range(0, r, 256)])

    return _null_result(d_obs, _sequential(d_obs, draw, n_perm, max_perm), pool.n_positions)


def _halvings(n_docs: int, n_splits: int, rng: np.random.Generator) -> np.ndarray:
    """[n_splits, n_docs] True for the documents of half A (floor(n/2) of them, drawn without replacement)."""
    keys = rng.random((n_splits, n_docs))
    order = np.argsort(keys, axis=1)
    member = np.zeros((n_splits, n_docs), dtype=bool)
    np.put_along_axis(member, order[:, : n_docs // 2], True, axis=1)
    return member


def expert_means_by_document(pool: Pool, n_experts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-document sums of ΔL and counts per expert: ``(documents [G], sums [G, E], counts [G, E])``."""
    docs, doc_index = np.unique(pool.seq_id, return_inverse=True)
    ok = pool.active & np.isfinite(pool.delta)
    g = np.broadcast_to(doc_index[:, None], ok.shape)[ok]
    e = pool.experts[ok]
    sums = np.zeros((docs.size, n_experts))
    counts = np.zeros((docs.size, n_experts))
    np.add.at(sums, (g, e), pool.delta[ok])
    np.add.at(counts, (g, e), 1.0)
    return docs, sums, counts


def causal_ceiling(pool: Pool, n_experts: int, *, n_splits: int = N_SPLITS, seed: Seed = 0) -> CausalCeiling:
    r"""The best d a static per-expert ranking reaches at a layer, estimated without fitting to the test data.

    For each of ``n_splits`` random halvings of the documents (A, B): rank experts by their mean ΔL over the
    pooled positions of A and evaluate d_z of D = ΔL(highest-ranked) − ΔL(lowest-ranked active expert) on the
    positions of B; swap; average the two. ``d_ceiling`` is the mean of that cross-fitted d over the halvings and
    ``d_ceiling_low`` / ``d_ceiling_high`` its 2.5 % / 97.5 % quantiles over the halvings: the spread due to the
    choice of halving, not a confidence interval of the population ceiling. Unit: document (halves are whole
    documents, so a ranking is never scored on positions of a document it was estimated from).

    The ranking is estimated on half the data, so the ceiling is conservative (noise in the estimated means lowers
    it); the ranking fitted and scored on the same positions would overstate it.

    Experts without a pooled ΔL in the estimating half are left out of that half's ranking. NaN when the pool has
    fewer than 4 documents.
    """
    docs = np.unique(pool.seq_id)
    if docs.size < 4:
        nan = float("nan")
        return CausalCeiling(nan, nan, nan, 0, int(docs.size))
    both = cross_fitted_d(pool, n_experts, _halvings(docs.size, n_splits, np.random.default_rng(seed)))
    both = both[np.isfinite(both)]
    if both.size == 0:
        nan = float("nan")
        return CausalCeiling(nan, nan, nan, 0, int(docs.size))
    low, high = np.quantile(both, _Q)
    return CausalCeiling(float(both.mean()), float(low), float(high), int(both.size), int(docs.size))


def cross_fitted_d(pool: Pool, n_experts: int, in_a: np.ndarray) -> np.ndarray:
    """[S] the cross-fitted d of each halving: ``in_a`` [S, G] marks half A among the pool's G documents (sorted
    ids); rank by mean ΔL on A, score on B, and the reverse; the mean of the two (or the one that is defined)."""
    docs, sums, counts = expert_means_by_document(pool, n_experts)
    doc_index = np.searchsorted(docs, pool.seq_id)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_a = (in_a @ sums) / (in_a @ counts)
        mean_b = (~in_a @ sums) / (~in_a @ counts)
    _, diff_on_b = high_low_d(pool, mean_a, per_position=True)  # ranked on A
    _, diff_on_a = high_low_d(pool, mean_b, per_position=True)  # ranked on B
    position_in_a = in_a[:, doc_index]
    d_b = d_z_rows(np.where(position_in_a, np.nan, diff_on_b))
    d_a = d_z_rows(np.where(position_in_a, diff_on_a, np.nan))
    return np.where(np.isfinite(d_a) & np.isfinite(d_b), (d_a + d_b) / 2, np.where(np.isfinite(d_a), d_a, d_b))


#: Columns :func:`add_expert_level` adds to the audit and control tables.
EXPERT_COLUMNS: tuple[str, ...] = ("p_perm", "d_perm_low", "d_perm_high", "d_ceiling", "d_ceiling_low",
                                   "d_ceiling_high")


def add_expert_level(table: pd.DataFrame, layer_pools: dict[tuple[str, int], Pool], *, kind: str,
                     metric_table: pd.DataFrame | None, n_perm: int = N_RELABEL, n_splits: int = N_SPLITS,
                     seed: int | None = 0, alpha: float = 0.05) -> pd.DataFrame:
    """``table`` (the audit or control table of ``summarize``) with :data:`EXPERT_COLUMNS` filled per row.

    ``kind="audit"``: :func:`random_ranking_null` of the row's metric (needs ``metric_table``, the run's
    ``observe`` table; without it the p_perm columns are NaN). ``kind="control"``: :func:`within_token_null`.
    Both: :func:`causal_ceiling` of the row's layer. At least ``n_perm`` null draws per cell, and up to
    20 / (alpha / m) while fewer than 10 are as extreme, m the model's cells in ``table`` (so p_perm can reach
    the Bonferroni level the decision uses). ``seed`` None: unseeded. Rows whose layer has no pool keep NaN. Why a column is NaN
    is listed in ``table.attrs["notes"]``. Seeds: one stream per (seed, layer), shared by the metrics of a layer
    (common random numbers: metrics at a layer are compared against the same relabelings).
    """
    out = table.copy()
    for column in EXPERT_COLUMNS:
        out[column] = np.nan
    notes: list[str] = []
    if out.empty:
        return out
    if not layer_pools:
        notes.append("p_perm and d_ceiling are n/a: the records hold no single-expert pool (runs written before "
                      "moeaudit recorded it); re-run the cells to get them.")
    elif kind == "audit" and metric_table is None:
        notes.append("p_perm is n/a: the expert-level null needs the run's metric table (pass metrics= to "
                     "summarize, or load the run directory, which holds metrics.parquet).")
    ceilings: dict[tuple[str, int], CausalCeiling] = {}
    family_size = out["model"].map(out["model"].value_counts())

    def stream(layer: int, k: int):
        return None if seed is None else [int(seed), layer, k]

    for i, row in out.iterrows():
        key = (str(row["model"]), int(row["layer"]))
        pool = layer_pools.get(key)
        if pool is None:
            continue
        n_experts = _n_experts(pool, metric_table, key[1])
        if key not in ceilings:
            ceilings[key] = causal_ceiling(pool, n_experts, n_splits=n_splits, seed=stream(key[1], 1))
        c = ceilings[key]
        out.loc[i, ["d_ceiling", "d_ceiling_low", "d_ceiling_high"]] = [c.d_ceiling, c.d_ceiling_low,
                                                                        c.d_ceiling_high]
        max_perm = max(n_perm, int(np.ceil(20 * family_size[i] / alpha)))
        if kind == "control":
            null = within_token_null(pool, n_perm=n_perm, max_perm=max_perm, seed=stream(key[1], 2))
        else:  # audit: the shared per-layer relabeling null of moeaudit.experiments._audit_expert fills p_perm
            continue
        out.loc[i, ["p_perm", "d_perm_low", "d_perm_high"]] = [null.p_perm, null.d_perm_low, null.d_perm_high]
    out.attrs["notes"] = notes
    return out


def _n_experts(pool: Pool, metric_table: pd.DataFrame | None, layer: int) -> int:
    seen = int(pool.experts.max()) + 1
    if metric_table is None:
        return seen
    listed = metric_table.loc[metric_table["layer"] == layer, "expert"]
    return max(seen, int(listed.max()) + 1) if len(listed) else seen


def _metric_vector(metric_table: pd.DataFrame, layer: int, metric: str, n_experts: int) -> np.ndarray:
    """[n_experts] the metric by expert id (NaN for an expert the table does not list)."""
    sub = metric_table[metric_table["layer"] == layer]
    if metric not in sub.columns:
        raise ValueError(f"the metric table has no column {metric!r} (the audit ranked by it); pass the run's own "
                         "metrics.parquet.")
    values = np.full(n_experts, np.nan)
    values[sub["expert"].to_numpy(dtype=np.int64)] = sub[metric].to_numpy(dtype=float)
    return values
