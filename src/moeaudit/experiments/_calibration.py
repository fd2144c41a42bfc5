r"""Calibration and power of the cell tests on a run's own data (``moeaudit validate``), from the single-expert
pool alone (no new ablation).

* **Null calibration.** At every pooled position two distinct active experts are drawn at random and ordered at
  random: D = ΔL_first − ΔL_second has mean zero by construction, while keeping the run's ΔL (its tails, its
  mixture of experts). Each test is applied to many such D at α = .05 uncorrected; a calibrated test rejects
  5 % of the time. Estimand: the average over the run's layers of the rejection probability given the run's ΔL;
  the draws are independent given the data, so a binomial interval applies. The random orientation is drawn per
  token, so these D carry no within-document correlation: this checks the tests' tails, not their clustering.
* **Family-wise rate.** A family draw gives every audit cell of the run its own null D (at the cell's layer) and
  applies the decision rule at the corrected level; the FWER is the share of families with any rejection. The
  expert-level criterion of the audit decision (``p_perm``) is a permutation test, exact by construction under
  its own null, and is not part of these draws (a random pair is not a ranking).
* **Random rankings.** The token-level tests applied to D of random *static* rankings of the experts (the
  expert-level null of ``p_perm``): the share they call significant shows how often an arbitrary ranking passes
  them where experts differ in importance (``p_perm`` is calibrated for this null by construction).
* **Power.** Synthetic metrics with a planted strength: per draw the documents are halved at random, experts are
  ranked by mean ΔL on one half (the causal ranking) and a metric with Spearman correlation ≈ s with that ranking
  (Gaussian copula: normal scores of the ranking mixed with noise, Pearson 2 sin(π s / 6)) scores the positions
  of the other half; and the reverse. The decision rule at the corrected level is applied to n positions
  subsampled from the run's, and a detection is a significant cell with D > 0.
* **Minimum detectable d.** The null D of each layer shifted by δ · σ, σ the sd of all the layer's null D (a
  location shift to true d_z ≈ δ, the run's tails and the per-draw sampling noise kept); ``mde_d`` is the
  smallest δ where the decision rule at the corrected level detects at least 80 % of the time (averaged over
  layers, linear interpolation on a grid of δ), at the run's n.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from moeaudit import stats
from moeaudit.experiments._expert_null import _halvings, expert_means_by_document
from moeaudit.experiments._pool import Pool, high_low_d

ALPHA = 0.05
STRENGTHS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
SHIFTS: np.ndarray = np.round(np.arange(0.0, 0.81, 0.05), 2)
POWER_TARGET = 0.8
#: Test names, in report order: the paper's unclustered t and Wilcoxon, the run's two document-clustered sign-flip
#: tests, and the run's decision rule (both clustered tests reject and point the same way).
TESTS: tuple[str, ...] = ("t", "wilcoxon", "clustered_mean", "clustered_rank", "decision")


def sign_vectors(m_cells: int, alpha: float = ALPHA) -> int:
    """Sign vectors per clustered test, as the run's summary draws them: at least :data:`moeaudit.stats.N_PERM`,
    and enough that the smallest attainable p is 20 times below alpha / m."""
    return max(stats.N_PERM, math.ceil(20 * m_cells / alpha) - 1)


# ---- the tests, vectorised over rows of D ------------------------------------------------------------------

def token_tests(diff: np.ndarray, groups: np.ndarray, *, n_perm: int = stats.N_PERM, seed=0,
                stop_above: float | None = None) -> dict[str, np.ndarray]:
    """p-values of every row of ``diff`` [R, n]: paired t and Wilcoxon signed-rank (scipy, two-sided, positions
    independent), and the run's document-clustered sign-flip tests of the mean and of the signed rank
    (:func:`moeaudit.stats.clustered_tests_rows`, ``groups`` [n] the document of each position); plus
    ``dir_mean`` (sign of mean D) and ``dir_rank`` (sign of W+ − W−). ``stop_above``: see
    :func:`~moeaudit.stats.clustered_tests_rows` (decisions at or below that level are exact)."""
    n = diff.shape[1]
    mean = diff.mean(axis=1)
    sd = diff.std(axis=1, ddof=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = mean / (sd / np.sqrt(n))
    flips = stats.clustered_tests_rows(diff, groups, n_perm=n_perm, seed=seed, stop_above=stop_above)
    return {"t": 2 * sps.t.sf(np.abs(t), n - 1), "wilcoxon": sps.wilcoxon(diff, axis=1).pvalue,
            "clustered_mean": flips.p_mean, "clustered_rank": flips.p_signrank,
            "dir_mean": np.sign(mean), "dir_rank": np.sign(flips.w_diff)}


def decide(p: dict[str, np.ndarray], alpha: float) -> np.ndarray:
    """The run's decision rule per row at level ``alpha`` (the per-cell level: 0.05 uncorrected, or alpha / m
    after Bonferroni): both clustered tests reject and mean(D) and W+ − W− point the same way (as
    :func:`moeaudit.stats.decide` with the summary's two criteria). Returns +1 / −1 (significant, in that
    direction) or 0."""
    ok = ((p["clustered_mean"] <= alpha) & (p["clustered_rank"] <= alpha) & (p["dir_mean"] == p["dir_rank"])
          & (p["dir_mean"] != 0))
    return np.where(ok, p["dir_mean"], 0.0)


def rejections(p: dict[str, np.ndarray], alpha: float) -> dict[str, np.ndarray]:
    """Per test, True where the row is rejected at ``alpha`` (the decision rule in either direction)."""
    out = {name: p[name] <= alpha for name in TESTS if name != "decision"}
    out["decision"] = decide(p, alpha) != 0
    return out


def rate(hits: np.ndarray) -> dict:
    """Share of True with its exact (Clopper–Pearson) binomial 95 % interval."""
    hits = np.asarray(hits, dtype=bool)
    k, n = int(hits.sum()), int(hits.size)
    if n == 0:
        return {"rate": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n_draws": 0}
    ci = sps.binomtest(k, n).proportion_ci(0.95, method="exact")
    return {"rate": k / n, "ci_low": float(ci.low), "ci_high": float(ci.high), "n_draws": n}


# ---- null draws ----------------------------------------------------------------------------------------------

def _usable(pool: Pool, diff: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isfinite(diff).all(axis=0)  # positions with two active experts with a finite ΔL
    return diff[:, keep], pool.seq_id[keep]


def random_pair_diffs(pool: Pool, n_draws: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(D [n_draws, P'], documents [P'])``: D of a random ordered pair of distinct active experts at every
    usable position."""
    _, diff = high_low_d(pool, rng.random((n_draws, *pool.experts.shape)), per_position=True)
    return _usable(pool, diff)


def random_ranking_diffs(pool: Pool, n_experts: int, n_draws: int,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(D [n_draws, P'], documents [P'])`` under random static rankings of the layer's experts."""
    _, diff = high_low_d(pool, rng.random((n_draws, n_experts)), per_position=True)
    return _usable(pool, diff)


# ---- power -------------------------------------------------------------------------------------------------

def _normal_scores(values: np.ndarray) -> np.ndarray:
    """[S, E] normal scores Φ⁻¹((rank − ½) / E') of each row's finite values (E' of them), NaN elsewhere."""
    ok = np.isfinite(values)
    ranks = sps.rankdata(np.where(ok, values, np.inf), axis=1)
    count = ok.sum(axis=1, keepdims=True)
    return np.where(ok, sps.norm.ppf((ranks - 0.5) / np.maximum(count, 1)), np.nan)


def planted_diffs(pool: Pool, n_experts: int, strength: float, n_draws: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(D [n_draws, P], spearman [n_draws])``: D of cross-fitted synthetic metrics at ``strength`` (see the
    module docstring), and each draw's realised Spearman ρ between the metric and the causal ranking it was
    planted on (mean of the two halves)."""
    docs, sums, counts = expert_means_by_document(pool, n_experts)
    in_a = _halvings(docs.size, n_draws, rng)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_a = (in_a @ sums) / (in_a @ counts)
        mean_b = (~in_a @ sums) / (~in_a @ counts)
    r = 2 * np.sin(np.pi * strength / 6)  # Pearson of a normal copula with Spearman = strength
    metric_b = r * _normal_scores(mean_a) + np.sqrt(max(0.0, 1 - r * r)) * rng.standard_normal(mean_a.shape)
    metric_a = r * _normal_scores(mean_b) + np.sqrt(max(0.0, 1 - r * r)) * rng.standard_normal(mean_b.shape)
    _, on_b = high_low_d(pool, metric_b, per_position=True)  # planted on A's ranking, scored on B
    _, on_a = high_low_d(pool, metric_a, per_position=True)
    position_in_a = in_a[:, np.searchsorted(docs, pool.seq_id)]
    diff = np.where(position_in_a, on_a, on_b)
    from moeaudit.experiments._stability import spearman_rows

    rho = (spearman_rows(metric_b, mean_a) + spearman_rows(metric_a, mean_b)) / 2
    return diff, rho


def _blocks(n_draws: int, size: int = 10) -> list[slice]:
    return [slice(s, min(s + size, n_draws)) for s in range(0, n_draws, size)]


def power_rows(layer_pools: Sequence[tuple[Pool, int]], *, alpha_corrected: float, sizes: Sequence[int],
               n_draws: int, n_perm: int, rng: np.random.Generator) -> pd.DataFrame:
    """Detection rate of planted metrics per (strength, n), pooled over layers. Every block of 10 draws gets its own
    random n positions (a layer with fewer usable positions than n, e.g. where a half lacks an expert, uses all
    it has)."""
    rows = []
    for strength in STRENGTHS:
        per_n: dict[int, list] = {}
        for pool, n_experts in layer_pools:
            diff, rho = planted_diffs(pool, n_experts, strength, n_draws, rng)
            diff, groups = _usable(pool, diff)
            for n in sizes:
                for block in _blocks(diff.shape[0]):
                    cols = np.sort(rng.choice(diff.shape[1], size=min(n, diff.shape[1]), replace=False))
                    sub = diff[block][:, cols]
                    p = token_tests(sub, groups[cols], n_perm=n_perm, seed=int(rng.integers(1 << 31)),
                                    stop_above=alpha_corrected)
                    d = sub.mean(axis=1) / sub.std(axis=1, ddof=1)
                    per_n.setdefault(n, []).append((decide(p, alpha_corrected) > 0, d, rho[block]))
        for n, parts in sorted(per_n.items()):
            detected = np.concatenate([p[0] for p in parts])
            row = {"strength": strength, "n": int(n), **rate(detected),
                   "mean_d": float(np.nanmean(np.concatenate([p[1] for p in parts]))),
                   "mean_spearman": float(np.nanmean(np.concatenate([p[2] for p in parts])))}
            rows.append(row)
    return pd.DataFrame(rows)


def minimum_detectable_d(null_diffs: Sequence[tuple[np.ndarray, np.ndarray]], *, alpha_corrected: float,
                         n_perm: int = stats.N_PERM, seed: int = 0) -> dict:
    """Detection rate of the decision rule at ``alpha_corrected`` on null D shifted to d_z = δ, per δ in
    :data:`SHIFTS` (averaged over layers), and the smallest δ reaching :data:`POWER_TARGET` (linear
    interpolation). Shifts above the first one past the target are not evaluated (the curve is monotone)."""
    rng = np.random.default_rng(seed)
    curve = []
    for delta in SHIFTS:
        rates = []
        for diff, groups in null_diffs:
            # E[D] = 0 under the random pairing; the pooled sd of the layer's null D is the population sd
            shifted = diff + delta * diff.std(ddof=1)
            p = token_tests(shifted, groups, n_perm=n_perm, seed=int(rng.integers(1 << 31)),
                            stop_above=alpha_corrected)
            rates.append(np.mean(decide(p, alpha_corrected) > 0))
        curve.append({"d": float(delta), "rate": float(np.mean(rates))})
        if curve[-1]["rate"] >= POWER_TARGET:
            break
    mde = float("nan")
    for lo, hi in zip(curve, curve[1:]):
        if lo["rate"] < POWER_TARGET <= hi["rate"]:
            mde = lo["d"] + (POWER_TARGET - lo["rate"]) / (hi["rate"] - lo["rate"]) * (hi["d"] - lo["d"])
            break
    if curve and curve[0]["rate"] >= POWER_TARGET:
        mde = 0.0
    return {"mde_d": mde, "curve": curve}


# ---- the whole check -----------------------------------------------------------------------------------------

def family_cells(records: pd.DataFrame) -> tuple[str, dict[int, int]]:
    """The family the verdict corrects over: ``("audit", {layer: cells})`` (one cell per metric and layer), or the
    control's (one cell per layer) when the run has no audit cells."""
    for experiment in ("audit", "control"):
        sub = records[records["experiment"] == experiment]
        if len(sub):
            cells = sub.groupby("layer")["metric"].nunique()
            return experiment, {int(layer): int(k) for layer, k in cells.items()}
    raise ValueError("the records hold neither audit nor control cells; validate needs a run with the audit or "
                     "the routing-weight control (experiments = audit and/or control).")


def calibrate(layer_pools: dict[int, tuple[Pool, int]], family: tuple[str, dict[int, int]], *, seed: int = 0,
              n_families: int = 200, n_power_draws: int = 40, n_mde_draws: int = 200,
              alpha: float = ALPHA) -> dict:
    """Null rates, family-wise rate, random-ranking rates, power rows and the minimum detectable d.

    Args:
        layer_pools: layer -> (its pool, n_experts).
        family: ``(name, {layer: cells})`` from :func:`family_cells`.
        seed: Seed of every draw.
        n_families: Family draws for the FWER; each layer gets n_families × its cells null draws.
        n_power_draws: Planted metrics per (layer, strength).
        n_mde_draws: Shifted null draws per layer and shift.
        alpha: The family-wise level; the corrected level is alpha / (number of cells) (Bonferroni).
    """
    name, cells = family
    missing = sorted(set(cells) - set(layer_pools))
    if missing:
        raise ValueError(f"layers {missing} have cells but no single-expert pool in the records (runs written "
                         "before moeaudit recorded it); re-run those cells to validate them.")
    m = sum(cells.values())
    alpha_corrected = alpha / m
    n_perm = sign_vectors(m, alpha)
    rng = np.random.default_rng(seed)
    null_hits: dict[str, list] = {test: [] for test in TESTS}
    by_layer: dict[str, dict] = {}
    family_any = np.zeros(n_families, dtype=bool)
    ranking_hits: dict[str, list] = {test: [] for test in TESTS}
    null_for_mde = []
    for layer in sorted(cells):
        pool, n_experts = layer_pools[layer]
        diff, groups = random_pair_diffs(pool, n_families * cells[layer], rng)
        # decisions at alpha and below are exact with stop_above=alpha (rows above it are settled early)
        p = token_tests(diff, groups, n_perm=n_perm, seed=int(rng.integers(1 << 31)), stop_above=alpha)
        hits = rejections(p, alpha)
        for test in TESTS:
            null_hits[test].append(hits[test])
        by_layer[str(layer)] = {test: float(hits[test].mean()) for test in TESTS}
        corrected = (decide(p, alpha_corrected) != 0).reshape(n_families, cells[layer])
        family_any |= corrected.any(axis=1)
        null_for_mde.append((diff[:n_mde_draws], groups))
        r_diff, r_groups = random_ranking_diffs(pool, n_experts, 200, rng)
        r_hits = rejections(token_tests(r_diff, r_groups, n_perm=n_perm, seed=int(rng.integers(1 << 31)),
                                        stop_above=alpha), alpha)
        for test in TESTS:
            ranking_hits[test].append(r_hits[test])
    n_positions = {str(layer): int(layer_pools[layer][0].n_positions) for layer in sorted(cells)}
    n_max = max(layer_pools[layer][0].n_positions for layer in cells)
    power = power_rows([layer_pools[layer] for layer in sorted(cells)], alpha_corrected=alpha_corrected,
                       sizes=_sizes(n_max), n_draws=n_power_draws, n_perm=n_perm, rng=rng)
    mde = minimum_detectable_d(null_for_mde, alpha_corrected=alpha_corrected, n_perm=n_perm,
                               seed=int(rng.integers(1 << 31)))
    return {
        "alpha": alpha, "family": name, "family_size": m, "alpha_corrected": alpha_corrected, "seed": seed,
        "sign_vectors": n_perm, "layers": sorted(cells), "n_positions": n_positions,
        "tests": {"t": "paired t-test (positions independent)", "wilcoxon": "Wilcoxon signed-rank (positions "
                  "independent)", "clustered_mean": "document sign-flip test of the mean of D (p_cluster)",
                  "clustered_rank": "document sign-flip signed-rank test (p_signrank_cluster)",
                  "decision": "the old token-level rule (no longer decides a cell; Definition 2.1 is decided by p_mean_greater, see null_rate_skewed / null_rate_docflip): both clustered tests reject and mean(D) and W+ - W- agree in sign"},
        "null_rate": {test: rate(np.concatenate(null_hits[test])) for test in TESTS},
        "null_rate_by_layer": by_layer,
        "fwer": {**rate(family_any), "family_size": m, "alpha_corrected": alpha_corrected},
        "random_ranking_rate": {test: rate(np.concatenate(ranking_hits[test])) for test in TESTS},
        "power": power.to_dict(orient="records"),
        "mde_d": mde["mde_d"],
        "mde_curve": mde["curve"],
    }


def _sizes(n_positions: int) -> list[int]:
    return sorted({max(10, n_positions // 4), max(10, n_positions // 2), n_positions} & set(range(10, n_positions + 1)))
