"""How well attribution estimates stand in for exact ablations (pure: tables in, tables out).

The inputs are the rows of the exact single-expert pool (every active expert ablated at ``n_exact`` positions per
layer) joined with their attribution estimates: one row per (document, position, layer, expert) with ``weight``,
``estimate_<mode>`` and ``exact_<mode>``. Unit of inference everywhere: the document (rows of one document, and the
experts of one token, are not independent), through cluster bootstraps, CR1 standard errors and document sign flips.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from moeaudit.intervene._attribution import attribution_importance as removal_costs  # noqa: F401 (re-exported)
from moeaudit.stats import clustered_difference, clustered_mean, paired_test, significant_both, spearman_cluster_ci

#: Columns of ``tables/attribution.csv``, one row per (layer, mode).
AGREEMENT_COLUMNS: tuple[str, ...] = (
    "layer", "mode", "n", "n_positions", "n_docs",
    "pearson", "pearson_low", "pearson_high",  # estimate vs exact ΔL over (position, expert) rows
    "spearman", "spearman_low", "spearman_high",
    "slope", "slope_low", "slope_high", "intercept",  # calibration: exact = intercept + slope * estimate
    "sign_agree", "sign_agree_low", "sign_agree_high",  # share of rows whose estimate has the exact sign
    # Definition 2.1 within token: D = ΔL(top-ranked active expert) - ΔL(bottom-ranked), ranked by the estimate
    # (attr) or by the routing weight (control)
    "d_attr", "d_attr_low", "d_attr_high", "p_attr_t", "p_attr_wilcoxon", "p_attr_cluster", "significant_attr",
    "d_control", "d_control_low", "d_control_high", "p_control_t", "p_control_wilcoxon", "p_control_cluster",
    "significant_control",
    "attr_minus_control", "p_attr_vs_control",  # mean D_attr - D_control, document sign-flip p
    "map_spearman", "map_overlap", "map_overlap_chance", "map_m",  # per-expert importance vs the exact map
    "map_spearman_full",  # attr_removal_cost (every position) vs the pool's removal cost
    "verdict",
)

#: Verdict thresholds on the 95% cluster-bootstrap lower bounds (see :func:`verdict`).
STANDS_IN_RHO, RANKS_RHO, SLOPE_RANGE = 0.8, 0.6, (0.8, 1.25)


def _pearson_ci(x: np.ndarray, y: np.ndarray, docs: np.ndarray, n_boot: int, seed: int) -> tuple[float, ...]:
    """Pearson r with a percentile document-bootstrap interval (whole documents resampled)."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.nan, np.nan, np.nan
    r = float(sps.pearsonr(x, y).statistic)
    labels, index = np.unique(docs, return_inverse=True)
    if len(labels) < 2:
        return r, np.nan, np.nan
    members = [np.flatnonzero(index == g) for g in range(len(labels))]
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        rows = np.concatenate([members[g] for g in rng.integers(0, len(labels), len(labels))])
        xs, ys = x[rows], y[rows]
        if np.ptp(xs) > 0 and np.ptp(ys) > 0:
            boot.append(np.corrcoef(xs, ys)[0, 1])
    low, high = np.quantile(boot, [0.025, 0.975]) if boot else (np.nan, np.nan)
    return r, float(low), float(high)


def _slope(x: np.ndarray, y: np.ndarray, docs: np.ndarray) -> tuple[float, float, float, float]:
    """OLS of exact on estimate with a document-clustered (CR1) interval, t with documents - 1 df."""
    import statsmodels.api as sm

    if np.ptp(x) == 0 or len(np.unique(docs)) < 2:
        return np.nan, np.nan, np.nan, np.nan
    fit = sm.OLS(y, sm.add_constant(x)).fit(cov_type="cluster", cov_kwds={"groups": pd.factorize(docs)[0]},
                                            use_t=True)
    low, high = fit.conf_int()[1]
    return float(fit.params[1]), float(low), float(high), float(fit.params[0])


def within_token_pairs(rows: pd.DataFrame, exact: str, rank_by: str) -> pd.DataFrame:
    """Per position with >= 2 active experts: ΔL of its top- and bottom-ranked active expert by ``rank_by``
    (columns ``doc_id``, ``high``, ``low``). Ties: the first in routing order (measure-zero for real values)."""
    active = rows[rows["weight"] != 0]
    out = []
    for (doc, _pos), part in active.groupby(["doc_id", "position"], sort=True):
        if len(part) < 2:
            continue
        values = part[rank_by].to_numpy(float)
        losses = part[exact].to_numpy(float)
        out.append((doc, losses[int(np.argmax(values))], losses[int(np.argmin(values))]))
    return pd.DataFrame(out, columns=["doc_id", "high", "low"])


def map_agreement(rows: pd.DataFrame, importance: pd.DataFrame, est: str, exact: str, mode: str,
                  n_experts: int) -> dict:
    """Per-expert importance from the estimate against the exact map.

    ``map_spearman`` / ``map_overlap``: over the experts the pool ablated, Spearman ρ and the overlap of the
    m = n_experts // 4 lowest between the mean estimate and the mean exact ΔL over the same pool rows (the exact
    side is ``moeaudit map``'s ``mean_delta``; same positions, so only the estimate's error separates them).
    ``map_spearman_full``: attribution's ``attr_removal_cost`` over every position against the pool's removal cost
    (routed share x mean ΔL over the pool's positions; adds the pool's sampling noise). ``map_overlap_chance``:
    the overlap two random rankings have in expectation (m / experts compared)."""
    nan = {"map_spearman": np.nan, "map_overlap": np.nan, "map_overlap_chance": np.nan, "map_m": 0,
           "map_spearman_full": np.nan}
    grouped = rows.groupby("expert")
    exact_mean, est_mean = grouped[exact].mean(), grouped[est].mean()
    if len(exact_mean) < 3:
        return nan
    a, b = exact_mean.to_numpy(), est_mean.loc[exact_mean.index].to_numpy()
    m = max(1, min(n_experts // 4, len(a) - 1))
    out = {"map_spearman": _rho(a, b), "map_m": m, "map_overlap_chance": m / len(a),
           "map_overlap": len(set(exact_mean.index[np.argsort(a, kind="stable")[:m]])
                              & set(exact_mean.index[np.argsort(b, kind="stable")[:m]])) / m}
    n_pos = rows.groupby(["doc_id", "position"]).ngroups
    exact_cost = grouped[exact].sum() / max(n_pos, 1)
    attr = importance[importance["mode"] == mode].set_index("expert")["attr_removal_cost"].dropna()
    common = exact_cost.index.intersection(attr.index)
    out["map_spearman_full"] = _rho(exact_cost.loc[common].to_numpy(), attr.loc[common].to_numpy()) \
        if len(common) >= 3 else np.nan
    return out


def _rho(a: np.ndarray, b: np.ndarray) -> float:
    return float(sps.spearmanr(a, b).statistic) if np.ptp(a) > 0 and np.ptp(b) > 0 else np.nan


def verdict(row: dict) -> str:
    """``stands in`` (ΔL values: Spearman and Pearson lower bounds >= 0.8 and calibration slope in [0.8, 1.25]),
    ``ranks only`` (Spearman lower bound >= 0.6), ``does not stand in``, or ``cannot tell`` (fewer than 2 documents
    or no interval)."""
    if row["n_docs"] < 2 or not np.isfinite(row["spearman_low"]):
        return "cannot tell"
    if row["spearman_low"] >= STANDS_IN_RHO and row["pearson_low"] >= STANDS_IN_RHO \
            and SLOPE_RANGE[0] <= row["slope"] <= SLOPE_RANGE[1]:
        return "stands in"
    if row["spearman_low"] >= RANKS_RHO:
        return "ranks only"
    return "does not stand in"


def agreement_table(joined: pd.DataFrame, importance: pd.DataFrame, modes: Sequence[str], n_experts: int, *,
                    n_boot: int = 1000, n_perm: int = 9999, seed: int = 0) -> pd.DataFrame:
    """One row per (layer, mode) of :data:`AGREEMENT_COLUMNS`.

    Estimands: Pearson r and Spearman ρ of estimate vs exact ΔL over the pool's (position, active expert) rows
    (95% percentile intervals from resampling documents); the calibration slope b of ``exact = a + b·estimate`` (OLS,
    CR1 interval clustered by document); sign agreement (share of rows with ``sign(estimate) == sign(exact)``, CR1
    interval). Definition 2.1 within token (seed paper): per position, D = ΔL(argmax) − ΔL(argmin) of its active
    experts ranked by the estimate (``d_attr``) or by routing weight (``d_control``): Cohen's d_z with a document
    BCa interval, paired t, Wilcoxon and document sign-flip p-values (:func:`moeaudit.stats.paired_test`);
    ``significant_*``: t and Wilcoxon both below 0.05 / (cells of the table) in the positive direction
    (:func:`moeaudit.stats.significant_both`). ``attr_minus_control``: mean of D_attr − D_control, its document
    sign-flip p (:func:`moeaudit.stats.clustered_difference`).
    """
    cells = []
    for layer, part in joined.groupby("layer", sort=True):
        for mode in modes:
            est, exact = f"estimate_{mode}", f"exact_{mode}"
            rows = part.dropna(subset=[est, exact])
            x, y, docs = rows[est].to_numpy(float), rows[exact].to_numpy(float), rows["doc_id"].to_numpy()
            row: dict = {"layer": int(layer), "mode": mode, "n": len(rows),
                         "n_positions": rows.groupby(["doc_id", "position"]).ngroups, "n_docs": len(np.unique(docs))}
            row["pearson"], row["pearson_low"], row["pearson_high"] = _pearson_ci(x, y, docs, n_boot, seed)
            sp = spearman_cluster_ci(x, y, docs, n_boot=n_boot, seed=seed)
            row.update(spearman=sp.rho, spearman_low=sp.ci_low, spearman_high=sp.ci_high)
            row["slope"], row["slope_low"], row["slope_high"], row["intercept"] = _slope(x, y, docs)
            agree = clustered_mean((np.sign(x) == np.sign(y)).astype(float), docs)
            row.update(sign_agree=agree.estimate, sign_agree_low=agree.ci_low, sign_agree_high=agree.ci_high)
            pairs = {name: within_token_pairs(rows, exact, by) for name, by in (("attr", est), ("control", "weight"))}
            for name, p in pairs.items():
                if len(p) >= 3 and p["doc_id"].nunique() >= 2:  # one document: this run cannot tell
                    test = paired_test(p["high"], p["low"], clusters=p["doc_id"], n_perm=n_perm, seed=seed)
                    row.update({f"d_{name}": test.cohens_d, f"d_{name}_low": test.ci_low,
                                f"d_{name}_high": test.ci_high, f"p_{name}_t": test.p_t,
                                f"p_{name}_wilcoxon": test.p_wilcoxon, f"p_{name}_cluster": test.p_cluster,
                                f"_mean_{name}": test.mean_diff, f"_w_{name}": test.w_diff})
            a, c = pairs["attr"], pairs["control"]
            if len(a) >= 2 and a["doc_id"].nunique() >= 2:
                diff = clustered_difference(a["high"] - a["low"], c["high"] - c["low"], a["doc_id"], n_perm=n_perm,
                                            seed=seed)
                row.update(attr_minus_control=diff.estimate, p_attr_vs_control=diff.p_signflip)
            row.update(map_agreement(rows, importance[importance["layer"] == layer], est, exact, mode, n_experts))
            cells.append(row)
    table = pd.DataFrame(cells)
    for name in ("attr", "control"):
        for col in (f"p_{name}_t", f"p_{name}_wilcoxon", f"_mean_{name}", f"_w_{name}"):
            if col not in table:
                table[col] = np.nan
        table[f"significant_{name}"] = significant_both(
            table[f"p_{name}_t"].to_numpy(float), table[f"p_{name}_wilcoxon"].to_numpy(float),
            sign_t=table[f"_mean_{name}"].to_numpy(float), sign_w=table[f"_w_{name}"].to_numpy(float)) \
            & (table[f"_mean_{name}"].to_numpy(float) > 0)
    table["verdict"] = [verdict(r) for r in table.to_dict("records")]
    return table.reindex(columns=list(AGREEMENT_COLUMNS))
