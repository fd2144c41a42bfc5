r"""``validate`` for the rule that decides: the per-cell test of the mean under three nulls (random orientation per
token, documents resampled from centred D, orientation flipped per document), the power of the pooled metric-level
test and of its per-layer part against planted metrics, and the positions per layer the pooled test needs.

* **Skewed nulls.** D of random static rankings of a layer's experts (real D: their skew, their documents) is
  centred (mean 0); documents are resampled with replacement (the skew and the within-document correlation kept:
  ``skewed``), or each document's D has its sign flipped at random (``docflip``: symmetric by construction).
* **Power of the rule that decides.** Planted metrics (the cross-fitted causal ranking mixed with noise to
  Spearman s; :func:`moeaudit.experiments._calibration.planted_diffs`) are scored against each layer's relabeling
  null; per layer the one-sided p is the share of null d at least as large, pooled the T of
  :func:`~moeaudit.experiments._metric_test.pooled_metric_test`. A detection is p ≤ α / m_metrics (Holm's first
  step: what a single metric must pass when it is the run's strongest). s = 1 is the causal ranking itself
  (``p_detect_ceiling``).
* **n_needed** (a stated normal approximation): the variance of d under random rankings at a layer is
  a + c / n (a: random rankings differ in their own population d, which no n removes; c / n: sampling noise),
  fitted with a, c ≥ 0 on subsamples of the run's positions at n/4, n/2, n. A metric capturing half the ceiling
  has z_l(n) = (½ d_ceiling_l − mean_l) / √(a_l + c_l / n), T / √L is approximately normal with unit variance, and
  80 % power at level α' needs Σ_l z_l(n) / √L ≥ z_{1−α'} + z_{0.8}; n_needed is the smallest such n (NaN when
  even n → ∞ does not reach it, ``z_limit``: random rankings already come within half the ceiling).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

from moeaudit import stats
from moeaudit.experiments._calibration import planted_diffs, random_ranking_diffs, rate
from moeaudit.experiments._expert_null import causal_ceiling
from moeaudit.experiments._metric_test import LayerNull, relabeled_d
from moeaudit.experiments._pool import Pool, d_z_rows
from moeaudit.stats._mean_test import mean_test_rows

RULE_STRENGTHS: tuple[float, ...] = (0.0, 0.5, 0.75, 1.0)
SKEWED_TESTS = ("clustered_mean", "mean_test")


def _totals(diff: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _, g = np.unique(groups, return_inverse=True)
    onehot = np.zeros((diff.shape[1], g.max() + 1))
    onehot[np.arange(diff.shape[1]), g] = 1.0
    return diff @ onehot, np.broadcast_to(onehot.sum(axis=0), (diff.shape[0], onehot.shape[1])).copy()


def skewed_null_rates(layer_pools: list[tuple[Pool, int]], *, alpha: float, alpha_corrected: float,
                      n_draws: int, n_boot: int, rng: np.random.Generator) -> dict:
    """``{"skewed": {alpha_key: {test: rate}}, "docflip": ...}``: rejection rates of the two-sided document
    sign-flip (``clustered_mean``, the p_cluster of the tables) and of the one-sided calibrated test
    (``mean_test``, p_mean_greater) at α and at the corrected α, on the two document-level nulls of every layer."""
    hits: dict[str, dict[str, dict[str, list]]] = {
        null: {lvl: {t: [] for t in SKEWED_TESTS} for lvl in ("alpha", "alpha_corrected")}
        for null in ("skewed", "docflip")}
    for pool, n_experts in layer_pools:
        base, groups = random_ranking_diffs(pool, n_experts, 1, rng)
        d = base[0] - base[0].mean()
        docs, doc_index = np.unique(groups, return_inverse=True)
        for null in ("skewed", "docflip"):
            if null == "skewed":  # documents drawn with replacement; a copy keeps its positions together
                draw = rng.integers(0, docs.size, size=(n_draws, docs.size))
                sums, counts = _totals(d[None], doc_index)
                s, c = sums[0][draw], counts[0][draw]
            else:
                flip = rng.choice([-1.0, 1.0], size=(n_draws, docs.size))
                sums, counts = _totals(d[None], doc_index)
                s, c = flip * sums[0], np.broadcast_to(counts[0], flip.shape)
            p_fdb, _, _, _ = mean_test_rows(s, c, n_boot=n_boot, rng=rng)
            # the sign-flip of the mean on totals (the positions' sum is the documents' sum): two-sided
            p_flip = stats.clustered_tests_rows(s, np.arange(docs.size), n_perm=n_boot,
                                                seed=int(rng.integers(1 << 31))).p_mean
            for lvl, a in (("alpha", alpha), ("alpha_corrected", alpha_corrected)):
                hits[null][lvl]["clustered_mean"].append(p_flip <= a)
                hits[null][lvl]["mean_test"].append(p_fdb <= a)
    return {null: {lvl: {t: rate(np.concatenate(v)) for t, v in tests.items()} for lvl, tests in by.items()}
            for null, by in hits.items()}


def _one_sided(d: np.ndarray, null: LayerNull) -> np.ndarray:
    ok = null.draws[np.isfinite(null.draws)]
    sorted_null = np.sort(ok)
    above = ok.size - np.searchsorted(sorted_null, d - 1e-12 * np.maximum(1, np.abs(d)), side="left")
    return (1 + above) / (1 + ok.size)


def rule_power(layer_pools: list[tuple[Pool, int]], *, alpha_rule: float, n_draws: int, n_null: int,
               rng: np.random.Generator) -> tuple[list[dict], dict]:
    """Rows ``{scope, strength, n, rate, ci_low, ci_high, n_draws}`` (scope = "layer L" or "pooled") of planted
    metrics against the relabeling null at the run's n, and each layer's null (for :func:`n_needed`)."""
    nulls = {pool.layer: LayerNull.of(relabeled_d(pool, np.arange(float(n_experts)), None, n_null, rng))
             for pool, n_experts in layer_pools}
    rows = []
    for strength in RULE_STRENGTHS:
        z_sum = np.zeros(n_draws)
        for pool, n_experts in layer_pools:
            diff, _ = planted_diffs(pool, n_experts, strength, n_draws, rng)
            d = d_z_rows(diff)
            null = nulls[pool.layer]
            rows.append({"scope": f"layer {pool.layer}", "strength": strength, "n": pool.n_positions,
                         **rate(_one_sided(d, null) <= alpha_rule)})
            z_sum += (np.nan_to_num(d, nan=null.mean) - null.mean) / null.sd
        null_t = sum((nulls[p.layer].draws - nulls[p.layer].mean) / nulls[p.layer].sd for p, _ in layer_pools)
        null_t = np.sort(null_t[np.isfinite(null_t)])
        p_pooled = (1 + null_t.size - np.searchsorted(null_t, z_sum, side="left")) / (1 + null_t.size)
        rows.append({"scope": "pooled", "strength": strength,
                     "n": int(np.median([p.n_positions for p, _ in layer_pools])), **rate(p_pooled <= alpha_rule)})
    return rows, nulls


def n_needed(layer_pools: list[tuple[Pool, int]], *, alpha_rule: float, n_null: int, power: float = 0.8,
             share: float = 0.5, rng: np.random.Generator) -> dict:
    """Positions per layer at which the pooled test detects a metric capturing ``share`` of each layer's ceiling
    with probability ``power`` (see the module docstring), with the fitted exponent and the ceilings used."""
    z_target = sps.norm.ppf(1 - alpha_rule) + sps.norm.ppf(power)
    parts = []
    for pool, n_experts in layer_pools:
        n0 = pool.n_positions
        sizes = sorted({max(20, n0 // 4), max(20, n0 // 2), n0})
        var = []
        for n in sizes:
            rows = np.sort(rng.choice(n0, size=min(n, n0), replace=False))
            var.append(LayerNull.of(relabeled_d(pool.subset(rows), np.arange(float(n_experts)), None, n_null // 2,
                                                rng)).sd ** 2)
        # sd² = a + c / n: a the spread of the rankings' own d (does not shrink), c / n the sampling noise
        ok = np.isfinite(var)
        a, c = _nonnegative_fit(1.0 / np.asarray(sizes, dtype=float)[ok], np.asarray(var)[ok])
        full = LayerNull.of(relabeled_d(pool, np.arange(float(n_experts)), None, n_null, rng))
        ceiling = causal_ceiling(pool, n_experts, seed=int(rng.integers(1 << 31))).d_ceiling
        parts.append((n0, a, c, full.mean, float(ceiling)))

    def pooled_z(n: float) -> float:
        z = [(max(share * ceil, 0.0) - m) / math.sqrt(max(a + c / n, 1e-300))
             for _, a, c, m, ceil in parts if np.isfinite(ceil)]
        return sum(z) / math.sqrt(len(parts)) if z else float("nan")

    n_found = float("nan")
    for n in np.unique(np.round(np.geomspace(10, 1e7, 400))):
        if pooled_z(float(n)) >= z_target:
            n_found = float(n)
            break
    return {"n_needed": n_found, "power": power, "share_of_ceiling": share, "alpha": alpha_rule,
            "z_at_run_n": pooled_z(float(np.median([p[0] for p in parts]))),
            "z_limit": pooled_z(float("inf")),
            "layers": [{"n": p[0], "var_between": p[1], "var_noise_n": p[2], "null_mean": p[3], "d_ceiling": p[4]}
                       for p in parts]}


def _nonnegative_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares y ≈ a + c x with a, c ≥ 0 (scipy's NNLS)."""
    from scipy.optimize import nnls

    if x.size == 0:
        return float("nan"), float("nan")
    coef, _ = nnls(np.column_stack([np.ones_like(x), x]), y)
    return float(coef[0]), float(coef[1])


def decision_checks(layer_pools: dict[int, tuple[Pool, int]], cells: dict[int, int], *, seed: int = 0,
                    n_skewed: int = 1000, n_power_draws: int = 80, alpha: float = 0.05) -> dict:
    """The keys ``validate`` adds for the rule that decides: ``null_rate_skewed`` / ``null_rate_docflip`` (and
    ``_corrected``: at α / m, m the family's cells), ``power_rule``, ``p_detect_ceiling``, ``n_needed`` (a metric
    capturing half of the ceiling) and ``n_needed_ceiling`` (the causal ranking itself)."""
    rng = np.random.default_rng([int(seed), 17])
    ordered = [layer_pools[layer] for layer in sorted(cells)]
    alpha_corrected = alpha / sum(cells.values())
    skewed = skewed_null_rates(ordered, alpha=alpha, alpha_corrected=alpha_corrected,
                               n_draws=max(50, n_skewed // len(ordered)), n_boot=999, rng=rng)
    alpha_rule = alpha / max(cells.values())
    power, _ = rule_power(ordered, alpha_rule=alpha_rule, n_draws=n_power_draws, n_null=2000, rng=rng)
    half = n_needed(ordered, alpha_rule=alpha_rule, n_null=2000, rng=rng)
    full = n_needed(ordered, alpha_rule=alpha_rule, n_null=2000, share=1.0, rng=rng)
    return {"null_rate_skewed": skewed["skewed"]["alpha"],
            "null_rate_skewed_corrected": skewed["skewed"]["alpha_corrected"],
            "null_rate_docflip": skewed["docflip"]["alpha"],
            "null_rate_docflip_corrected": skewed["docflip"]["alpha_corrected"],
            "skewed_tests": {"clustered_mean": "document sign-flip of the mean, two-sided (p_cluster)",
                             "mean_test": "one-sided test of the mean, max(sign-flip, fast double bootstrap) (p_mean_greater)"},
            "alpha_rule": alpha_rule, "power_rule": power,
            "p_detect_ceiling": {r["scope"]: r["rate"] for r in power if r["strength"] == 1.0},
            "n_needed": half["n_needed"], "n_needed_detail": half, "n_needed_ceiling": full["n_needed"]}
