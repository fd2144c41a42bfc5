r"""The metric-level claim, tested once per metric: does metric M rank a layer's experts by causal importance better
than random rankings do, pooled over the run's layers (``tables/metrics.csv``)?

One relabeling null per layer and tie structure. At a layer, the metric's values are permuted across the experts
that *have* a finite value (a NaN expert stays out of every labeling: it is never high or low), and at every pooled
position the highest- and lowest-ranked active experts are chosen with the audit's own tie keys (the same keys
:func:`moeaudit.experiments._run._tie_keys` gives the recorded cells), so the observed d equals the audit cell's d.
A metric whose finite values are all distinct (tie-free) permutes into a uniformly random ranking of the same
experts, so every tie-free metric with the same NaN pattern shares one null at a layer: one band, not several
noisy ones.

.. math::

    z_l = \frac{d_l - \bar d^{\,0}_l}{s^0_l}, \qquad T_M = \sum_l z_l, \qquad
    p_M = \frac{1 + \#\{r : T^{(r)} \ge T_M\}}{1 + R}

with :math:`\bar d^{\,0}_l, s^0_l` the mean and sd of d over the layer's R relabelings and
:math:`T^{(r)} = \sum_l z^{(r)}_l` built from independent relabelings per layer (draw r of every layer). One-sided:
the claim is that M ranks *better* than random. Holm over the run's metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from moeaudit import stats
from moeaudit.experiments._pool import Pool, high_low_d

#: Relabelings of each layer's shared null (the issue's floor: 10,000).
N_METRIC_DRAWS = 10_000
#: Columns of ``tables/metrics.csv``.
METRIC_COLUMNS: tuple[str, ...] = ("model", "metric", "n_layers", "pooled_z", "p_metric", "p_metric_holm",
                                   "ceiling_share", "ceiling_share_low", "ceiling_share_high", "decision")
_CHUNK = 500


def tie_keys(pool: Pool, seed: int) -> np.ndarray:
    """[P, K] the audit's tie keys of every pooled position (``default_rng([seed, layer, seq_id, position])``, one
    uniform key per active expert in router order; NaN at padding)."""
    keys = np.full(pool.experts.shape, np.nan)
    n_active = pool.active.sum(axis=1)
    for p in range(pool.n_positions):
        rng = np.random.default_rng([int(seed), int(pool.layer), int(pool.seq_id[p]), int(pool.position[p])])
        keys[p, : n_active[p]] = rng.random(int(n_active[p]))
    return keys


def _dense_rank(values: np.ndarray) -> np.ndarray:
    out = np.full(values.shape, np.nan)
    ok = np.isfinite(values)
    out[ok] = np.unique(values[ok], return_inverse=True)[1]
    return out


def null_key(values: np.ndarray) -> tuple:
    """What determines a metric's relabeling null at a layer: which experts have no value, and the multiset of
    dense ranks of the others (equal for every tie-free metric with the same NaN pattern)."""
    rank = _dense_rank(np.asarray(values, dtype=float))
    finite = np.isfinite(rank)
    return tuple(np.flatnonzero(~finite).tolist()), tuple(np.sort(rank[finite]).astype(int).tolist())


def _scores(pool: Pool, ranks: np.ndarray, keys: np.ndarray | None) -> np.ndarray:
    """Scores of rankings ``ranks`` [R, E] as :func:`high_low_d` takes them: static when tie-free, else per
    position (rank + ½ · tie key, so ties go by the audit's keys; NaN experts stay NaN)."""
    if keys is None:
        return ranks
    safe = np.where(pool.active, pool.experts, 0)
    return ranks[:, safe] + 0.5 * keys[None]


def observed_d(pool: Pool, values, keys: np.ndarray) -> float:
    """d_z of D = ΔL(high) − ΔL(low) of the metric's own ranking, ties broken by the audit's tie keys."""
    rank = _dense_rank(np.asarray(values, dtype=float))
    return float(high_low_d(pool, _scores(pool, rank[None], keys))[0])


def relabeled_d(pool: Pool, values, keys: np.ndarray, n_draws: int, rng: np.random.Generator) -> np.ndarray:
    """[n_draws] d under random relabelings of the metric across the experts with a finite value (NaN draws,
    where D is degenerate, kept as NaN so draws stay aligned across layers)."""
    rank = _dense_rank(np.asarray(values, dtype=float))
    slots = np.flatnonzero(np.isfinite(rank))
    tie_free = np.unique(rank[slots]).size == slots.size
    out = np.empty(n_draws)
    for start in range(0, n_draws, _CHUNK):
        r = min(_CHUNK, n_draws - start)
        perms = rng.permuted(np.tile(rank[slots], (r, 1)), axis=1)
        ranks = np.full((r, rank.size), np.nan)
        ranks[:, slots] = perms
        out[start:start + r] = high_low_d(pool, _scores(pool, ranks, None if tie_free else keys))
    return out


@dataclass(frozen=True)
class LayerNull:
    """A layer's relabeling null for one tie structure: ``draws`` [R] (NaN where degenerate), their mean and sd."""

    draws: np.ndarray
    mean: float
    sd: float

    @classmethod
    def of(cls, draws: np.ndarray) -> LayerNull:
        ok = draws[np.isfinite(draws)]
        if ok.size < 3:
            return cls(draws, float("nan"), float("nan"))
        return cls(draws, float(ok.mean()), float(ok.std(ddof=1)))

    def percentile(self, d: float) -> float:
        """100 × share of the finite draws at or below ``d`` (the observed d's percentile among random rankings)."""
        ok = self.draws[np.isfinite(self.draws)]
        return float(100 * np.mean(ok <= d * (1 + 1e-12) if d >= 0 else ok <= d * (1 - 1e-12))) if ok.size and \
            np.isfinite(d) else float("nan")


@dataclass(frozen=True)
class MetricTest:
    """The pooled test of one metric: ``pooled_z`` = Σ z_l, ``p_metric`` (one-sided), the layers it used."""

    pooled_z: float
    p_metric: float
    z: dict[int, float]
    n_draws: int


def pooled_metric_test(d_obs: dict[int, float], nulls: dict[int, LayerNull]) -> MetricTest:
    r"""Pooled one-sided relabeling test over layers (see the module docstring for T_M and p_M).

    Estimand: Σ_l of the standardized d of M's ranking at layer l against random rankings of the same experts.
    Unit of inference: the expert labeling (independent relabelings per layer, conditional on the pooled ΔL).
    H0: at every layer M's values are exchangeable across the experts that have one. Layers where d or the null
    is undefined are left out; draw r enters the null only where every used layer's draw r is defined.

    References:
        Pesarin, F., & Salmaso, L. (2010). Permutation Tests for Complex Data, ch. 4 (combining partial tests).
        Phipson, B., & Smyth, G. K. (2010). Permutation p-values should never be zero. SAGMB 9(1), 39.
    """
    layers = [layer for layer in sorted(d_obs) if np.isfinite(d_obs[layer]) and layer in nulls
              and np.isfinite(nulls[layer].sd) and nulls[layer].sd > 0]
    if not layers:
        return MetricTest(float("nan"), float("nan"), {}, 0)
    z = {layer: (d_obs[layer] - nulls[layer].mean) / nulls[layer].sd for layer in layers}
    n = min(nulls[layer].draws.size for layer in layers)
    null_t = sum((nulls[layer].draws[:n] - nulls[layer].mean) / nulls[layer].sd for layer in layers)
    null_t = null_t[np.isfinite(null_t)]
    t_obs = float(sum(z.values()))
    p = (1 + np.sum(null_t >= t_obs - 1e-12 * max(1.0, abs(t_obs)))) / (1 + null_t.size)
    return MetricTest(t_obs, float(p), z, int(null_t.size))


def layer_nulls(pool: Pool, metric_values: dict[str, np.ndarray], keys: np.ndarray, *, n_draws: int,
                seed: Sequence[int] | None) -> dict[str, LayerNull]:
    """Each metric's null at one layer, one per :func:`null_key` (tie-free metrics share one). Seeds: one stream
    per (seed, layer, structure index) so that the shared null does not depend on which other metrics exist."""
    cache: dict[tuple, LayerNull] = {}
    out = {}
    for name in sorted(metric_values):
        key = null_key(metric_values[name])
        if key not in cache:
            stream = None if seed is None else [*seed, len(key[0]), len(set(key[1])), _crc(key)]
            cache[key] = LayerNull.of(relabeled_d(pool, metric_values[name], keys, n_draws,
                                                  np.random.default_rng(stream)))
        out[name] = cache[key]
    return out


def _crc(key: tuple) -> int:
    import zlib

    return zlib.crc32(repr(key).encode())


def metric_table(audit: pd.DataFrame, d_obs: dict[tuple[str, int, str], float],
                 nulls: dict[tuple[str, int, str], LayerNull], *, alpha: float = 0.05) -> pd.DataFrame:
    """Per (model, metric) the pooled test and Holm over the model's metrics (the share of the ceiling and the
    decision are added by :func:`moeaudit.experiments._audit_expert.audit_expert_level`)."""
    rows = []
    for (model, metric), cells in audit.groupby(["model", "metric"], sort=True):
        layers = [int(x) for x in cells["layer"]]
        test = pooled_metric_test({layer: d_obs.get((model, layer, metric), np.nan) for layer in layers},
                                  {layer: nulls[(model, layer, metric)] for layer in layers
                                   if (model, layer, metric) in nulls})
        rows.append({"model": model, "metric": metric, "n_layers": len(test.z), "pooled_z": test.pooled_z,
                     "p_metric": test.p_metric, "n_draws": test.n_draws})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    parts = []
    for _, per_model in frame.groupby("model", sort=False):
        per_model = per_model.copy()
        p = per_model["p_metric"].to_numpy(dtype=float)
        holm = np.full(p.shape, np.nan)
        ok = np.isfinite(p)
        if ok.any():
            holm[ok] = stats.correct(p[ok], "holm", alpha).p_corrected
        per_model["p_metric_holm"] = holm
        parts.append(per_model)
    return pd.concat(parts, ignore_index=True)
