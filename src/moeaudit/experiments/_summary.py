"""Cell tables of every experiment, rebuilt from the record table alone (``summarize``)."""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import pandas as pd
from scipy import stats as sps

from moeaudit import stats

ALPHA = 0.05


def _relative_depth(frame: pd.DataFrame) -> pd.Series:
    return frame["layer"] / (frame["n_layers"] - 1).clip(lower=1)


def _paired_cells(records: pd.DataFrame, experiment: str, keys: list[str], n_boot: int) -> pd.DataFrame:
    sub = records[records["experiment"] == experiment]
    rows = []
    for key, group in sub.groupby(keys, sort=True):
        pivot = group.pivot_table(index=["seq_id", "position"], columns="role", values="delta", aggfunc="first")
        weights = group.pivot_table(index=["seq_id", "position"], columns="role", values="ablated_metric_value",
                                    aggfunc="first")
        pivot = pivot.dropna(subset=[c for c in ("high", "low") if c in pivot.columns])
        if not {"high", "low"} <= set(pivot.columns) or len(pivot) < 3:
            continue
        test = stats.paired_test(pivot["high"].to_numpy(), pivot["low"].to_numpy(),
                                 clusters=pivot.index.get_level_values("seq_id").to_numpy(), n_boot=n_boot)
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        row["n_layers"] = int(group["n_layers"].iloc[0])
        row.update(asdict(test))
        if experiment == "control":
            diff = pivot["high"] - pivot["low"]
            ratio = (weights["high"] / weights["low"]).reindex(pivot.index)
            row["spearman_rho"], row["spearman_p"] = stats.spearman(ratio.to_numpy(), diff.to_numpy())
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame.insert(frame.columns.get_loc("layer") + 1, "relative_depth", _relative_depth(frame))
    frame["sig_t_uncorrected"] = frame["p_t"] < ALPHA
    frame["sig_w_uncorrected"] = frame["p_wilcoxon"] < ALPHA
    parts = []
    for _, per_model in frame.groupby("model", sort=False):
        per_model = per_model.copy()
        m = len(per_model)
        per_model["alpha_corrected"] = ALPHA / m
        per_model["significant"] = stats.significant_both(per_model["p_t"].to_numpy(),
                                                          per_model["p_wilcoxon"].to_numpy(), alpha=ALPHA)
        parts.append(per_model)
    return pd.concat(parts, ignore_index=True)


def _rank_validity(records: pd.DataFrame) -> pd.DataFrame:
    sub = records[records["experiment"] == "rank_validity"]
    rows = []
    token_rho = _token_spearman(sub)
    for (model, layer, metric), group in sub.groupby(["model", "layer", "metric"], sort=True):
        rhos_arr = token_rho.get((model, layer, metric), np.empty(0))
        z = stats.fisher_z(rhos_arr) if len(rhos_arr) else rhos_arr
        t_res = sps.ttest_1samp(z, 0.0) if len(z) >= 3 else None
        rows.append({
            "model": model, "layer": layer, "metric": metric, "n_layers": int(group["n_layers"].iloc[0]),
            "n_positions": int(len(rhos_arr)),
            "mean_rho": float(rhos_arr.mean()) if len(rhos_arr) else math.nan,
            "median_rho": float(np.median(rhos_arr)) if len(rhos_arr) else math.nan,
            "pct_positive": float(100 * (rhos_arr > 0).mean()) if len(rhos_arr) else math.nan,
            "p_sign": stats.sign_test(rhos_arr) if len(rhos_arr) else math.nan,
            "mean_z": float(z.mean()) if len(z) else math.nan,
            "t_z": float(t_res.statistic) if t_res is not None else math.nan,
            "p_t_z": float(t_res.pvalue) if t_res is not None else math.nan,
        })
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame.insert(2, "relative_depth", _relative_depth(frame))
    return frame


def _token_spearman(sub: pd.DataFrame) -> dict[tuple, np.ndarray]:
    """Spearman rho between metric value and delta within every token (>= 3 experts, neither constant), grouped
    by (model, layer, metric) in token order: Pearson correlation of average ranks, vectorised over tokens."""
    keys = ["model", "layer", "metric", "seq_id", "position"]
    frame = sub[keys].copy()
    grouped = sub.groupby(keys, sort=False)
    frame["rx"] = grouped["ablated_metric_value"].rank(method="average")
    frame["ry"] = grouped["delta"].rank(method="average")
    g = frame.groupby(keys, sort=False)
    n = g["rx"].transform("size")
    frame["dx"] = frame["rx"] - g["rx"].transform("mean")
    frame["dy"] = frame["ry"] - g["ry"].transform("mean")
    frame["sxy"], frame["sxx"], frame["syy"] = frame["dx"] * frame["dy"], frame["dx"] ** 2, frame["dy"] ** 2
    sums = frame[n >= 3].groupby(keys, sort=False)[["sxy", "sxx", "syy"]].sum()
    tiny = 1e-12  # a constant vector has zero squared deviation from its ranks' mean
    ok = (sums["sxx"] > tiny) & (sums["syy"] > tiny)
    rho = (sums.loc[ok, "sxy"] / np.sqrt(sums.loc[ok, "sxx"] * sums.loc[ok, "syy"])).clip(-1.0, 1.0)
    out: dict[tuple, np.ndarray] = {}
    for key, values in rho.groupby(level=[0, 1, 2], sort=False):
        out[key] = values.to_numpy(dtype=float)
    return out


def _progressive(records: pd.DataFrame) -> pd.DataFrame:
    sub = records[records["experiment"] == "progressive"]
    if sub.empty:
        return pd.DataFrame()
    grouped = sub.groupby(["model", "layer", "k"], sort=True)["delta"]
    frame = grouped.agg(n="count", mean="mean", median="median",
                        p95=lambda d: float(np.percentile(d, 95))).reset_index()
    frame["n_layers"] = sub.groupby(["model", "layer", "k"], sort=True)["n_layers"].first().to_numpy()
    return frame


def _redistribution(records: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    sub = records[records["experiment"] == "redistribution"].copy()
    if sub.empty:
        return pd.DataFrame(), pd.DataFrame()
    sub["expert"] = sub["ablated_experts"].map(lambda e: int(e[0]))
    sub["propagation"] = sub["final_gap_norm"] / sub["gap_norm"].where(sub["gap_norm"] > 0)
    n_pos = sub.groupby(["model", "layer"])[["seq_id", "position"]].apply(
        lambda g: len(g.drop_duplicates())).rename("n_positions")
    experts = sub.groupby(["model", "layer", "expert"], sort=True).agg(
        n=("delta", "count"), mean_freed_weight=("ablated_weight", "mean"), mean_gap_norm=("gap_norm", "mean"),
        std_gap_norm=("gap_norm", "std"), mean_compensation_cos=("compensation_cos", "mean"),
        mean_relative_compensation=("relative_compensation", "mean"), mean_final_gap_norm=("final_gap_norm", "mean"),
        mean_delta=("delta", "mean"),
    ).reset_index()
    experts = experts.join(n_pos, on=["model", "layer"])
    experts["coverage"] = experts["n"] / experts["n_positions"]
    layers = []
    for (model, layer), group in sub.groupby(["model", "layer"], sort=True):
        rho_wg, p_wg = stats.spearman(group["ablated_weight"].to_numpy(), group["gap_norm"].to_numpy())
        ok = group["relative_compensation"].notna()
        rho_gc, p_gc = stats.spearman(group.loc[ok, "gap_norm"].to_numpy(),
                                      group.loc[ok, "relative_compensation"].to_numpy())
        layers.append({
            "model": model, "layer": layer, "n_layers": int(group["n_layers"].iloc[0]), "n": len(group),
            "mean_gap_norm": float(group["gap_norm"].mean()), "mean_final_gap_norm": float(group["final_gap_norm"].mean()),
            "mean_propagation": float(group["propagation"].mean()),
            "mean_compensation_cos": float(group["compensation_cos"].mean()),
            "rho_weight_gap": rho_wg, "p_weight_gap": p_wg, "rho_gap_compensation": rho_gc,
            "p_gap_compensation": p_gc,
        })
    return experts, pd.DataFrame(layers)


def summarize(records: pd.DataFrame, *, n_boot: int = 2000) -> dict[str, pd.DataFrame]:
    """Every cell table, from the record table alone.

    Returns:
        ``audit`` (per model x layer x metric: paired test, corrected significance with the t/Wilcoxon agreement
        rule, Bonferroni over the model's audit cells), ``control`` (per model x layer, with the Spearman
        correlation of the weight ratio high/low and D, Bonferroni over layers), ``rank_validity``,
        ``progressive`` (per model x layer x k: n, mean, median, P95), ``redistribution_experts`` and
        ``redistribution_layers``.
    """
    audit = _paired_cells(records, "audit", ["model", "layer", "metric"], n_boot)
    control = _paired_cells(records, "control", ["model", "layer"], n_boot)
    experts, layers = _redistribution(records)
    return {"audit": audit, "control": control, "rank_validity": _rank_validity(records),
            "progressive": _progressive(records), "redistribution_experts": experts,
            "redistribution_layers": layers}
