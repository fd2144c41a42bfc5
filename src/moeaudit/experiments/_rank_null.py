r"""The relabeling null of rank validity: the mean within-token Spearman ρ between a metric and ΔL over a token's
active experts, against the same mean under random relabelings of the metric across the layer's experts (the null
of the audit's ``p_perm``, applied to rank validity).

Per position, ρ is the Pearson correlation of the average ranks of the metric and of ΔL over the active experts
with a finite value of both (at least 3, neither constant), as in the rank-validity table; the statistic is the mean
ρ over positions. Relabelings permute the metric over the experts that have a value (NaN experts stay out).

.. math::

    p = \frac{1 + \#\{r : |\bar\rho_r| \ge |\bar\rho_{obs}|\}}{1 + R}

Unit of inference: the expert labeling (conditional on the pooled ΔL). Reference: Phipson & Smyth (2010).
"""

from __future__ import annotations

import warnings

import numpy as np

from moeaudit.experiments._pool import Pool

#: Relabelings of the rank-validity null.
N_RANK_DRAWS = 10_000
_CHUNK = 250


def _ranks(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis among the entries of ``mask`` (NaN elsewhere)."""
    v = np.where(mask, values, np.nan)
    less = (v[..., None, :] < v[..., :, None]) & mask[..., None, :]
    equal = (v[..., None, :] == v[..., :, None]) & mask[..., None, :]
    return np.where(mask, less.sum(-1) + 0.5 * (equal.sum(-1) - 1) + 1, np.nan)


def mean_rho(pool: Pool, scores: np.ndarray) -> np.ndarray:
    """[R] mean within-token Spearman ρ of ``scores`` [R, n_experts] with ΔL over the pooled positions."""
    safe = np.where(pool.active, pool.experts, 0)
    s = scores[:, safe]  # [R, P, K]
    mask = pool.active[None] & np.isfinite(pool.delta)[None] & np.isfinite(s)
    rx = _ranks(s, mask)
    ry = _ranks(np.broadcast_to(pool.delta, s.shape), mask)
    n = mask.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        dx = np.where(mask, rx - np.nansum(rx, -1, keepdims=True) / n[..., None], 0.0)
        dy = np.where(mask, ry - np.nansum(ry, -1, keepdims=True) / n[..., None], 0.0)
        sxx, syy = (dx ** 2).sum(-1), (dy ** 2).sum(-1)
        rho = np.where((n >= 3) & (sxx > 1e-12) & (syy > 1e-12), (dx * dy).sum(-1) / np.sqrt(sxx * syy), np.nan)
    with warnings.catch_warnings():  # a draw without any defined ρ gives NaN (left out by the callers)
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.clip(rho, -1, 1), axis=-1)


def rank_null(pool: Pool, metric_values, *, n_draws: int = N_RANK_DRAWS, seed=0) -> np.ndarray:
    """[R'] mean ρ under random relabelings of the metric over the experts with a value (finite draws only)."""
    values = np.asarray(metric_values, dtype=float)
    rng = np.random.default_rng(seed)
    slots = np.flatnonzero(np.isfinite(values))
    null = []
    for start in range(0, n_draws, _CHUNK):
        r = min(_CHUNK, n_draws - start)
        scores = np.full((r, values.size), np.nan)
        scores[:, slots] = rng.permuted(np.tile(values[slots], (r, 1)), axis=1)
        null.append(mean_rho(pool, scores))
    null = np.concatenate(null)
    return null[np.isfinite(null)]


def relabel_p(observed: float, null: np.ndarray) -> float:
    """Two-sided relabeling p of an observed mean ρ (NaN when either is undefined)."""
    if not np.isfinite(observed) or null.size == 0:
        return float("nan")
    return float((1 + np.sum(np.abs(null) >= abs(observed) * (1 - 1e-12))) / (1 + null.size))


def rank_relabel_p(pool: Pool, metric_values, *, n_draws: int = N_RANK_DRAWS, seed=0) -> tuple[float, float]:
    """``(mean ρ observed, two-sided relabeling p)`` of one rank-validity cell."""
    values = np.asarray(metric_values, dtype=float)
    obs = float(mean_rho(pool, values[None])[0])
    return obs, relabel_p(obs, rank_null(pool, values, n_draws=n_draws, seed=seed))
