"""Cell tables of every experiment, rebuilt from the record table alone (``summarize``)."""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from moeaudit import stats
from moeaudit.config import PROGRESSIVE_SESOI
from moeaudit.experiments._arms import arm_comparisons, progressive_cells
from moeaudit.experiments._attribution_control import ATTRIBUTION, attribution_vs_control
from moeaudit.experiments._audit_expert import audit_expert_level
from moeaudit.experiments._decide import ALPHA, CORRECTION, decide_family, decide_rank_validity
from moeaudit.experiments._expert_null import N_RELABEL, N_SPLITS, _metric_vector, _n_experts, add_expert_level
from moeaudit.experiments._metric_test import N_METRIC_DRAWS, null_key
from moeaudit.experiments._pool import pools
from moeaudit.experiments._rank_null import N_RANK_DRAWS, rank_null, relabel_p


def _relative_depth(frame: pd.DataFrame) -> pd.Series:
    return frame["layer"] / (frame["n_layers"] - 1).clip(lower=1)


def _cell_seed(seed: int | None, *key) -> np.random.SeedSequence | None:
    """A seed per cell from the run's seed and the cell's key (stable across processes, unlike ``hash``), so
    cells do not share bootstrap or sign-flip draws and a cell's numbers do not depend on which others exist."""
    if seed is None:
        return None
    return np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32("|".join(map(str, key)).encode())])


def _n_perm(m_cells: int, alpha: float = ALPHA) -> int:
    """Sign vectors per cell: enough that the smallest attainable p, 1 / (n_perm + 1), is 20 times below the
    corrected level alpha / m (at least :data:`moeaudit.stats.N_PERM`)."""
    return max(stats.N_PERM, math.ceil(20 * m_cells / alpha) - 1)


_PAIRED_FIELDS = [f.name for f in dataclasses.fields(stats.PairedTest)]


def _untestable(n: int, n_clusters: int, note: str) -> dict:
    row = {name: math.nan for name in _PAIRED_FIELDS}
    row.update(n=n, n_clusters=n_clusters, ci_method="", note=note)
    return row


def _nonfinite_note(pivot: pd.DataFrame) -> str | None:
    bad = pivot[~np.isfinite(pivot[["high", "low"]]).all(axis=1)]
    if bad.empty:
        return None
    where = ", ".join(f"seq {s} pos {p}" for s, p in bad.index[:5]) + (", ..." if len(bad) > 5 else "")
    return (f"ΔL is missing or not finite at {len(bad)} position(s) ({where}): the cell is not tested; check "
            "the model's precision (float32) or these tokens")


#: Nulls and first-level draws of each cell's measured level (``mean_level``) on its own skewed null.
LEVEL_DRAWS, LEVEL_BOOT = 300, 99


def _mean_columns(diff: np.ndarray, docs: np.ndarray, seed) -> dict:
    """``p_mean_greater``: the one-sided (E[D] > 0) document-level test of the mean, calibrated for skew
    (:func:`moeaudit.stats.clustered_mean_test`); ``mean_level`` (``mean_level_low`` / ``_high``): its measured rejection rate
    at α = .05 (and the upper end of its 95 % binomial interval) on nulls resampled from the cell's own centred
    documents (:func:`moeaudit.stats.skewed_null_level`), the level the decision actually carries."""
    if np.unique(docs).size < 3:
        return {"p_mean_greater": math.nan, "mean_level": math.nan, "mean_level_low": math.nan,
                "mean_level_high": math.nan}
    rng = np.random.default_rng(seed)
    test = stats.clustered_mean_test(diff, docs, alternative="greater", seed=rng.integers(1 << 31))
    level = stats.skewed_null_level(diff, docs, alpha=ALPHA, n_draws=LEVEL_DRAWS, n_boot=LEVEL_BOOT,
                                    seed=rng.integers(1 << 31))
    return {"p_mean_greater": test.pvalue, "mean_level": level.rate, "mean_level_low": level.ci_low,
            "mean_level_high": level.ci_high}


def _paired_cells(records: pd.DataFrame, experiment: str, keys: list[str], *, n_boot: int, seed: int | None,
                  sesoi_d: float) -> pd.DataFrame:
    """The paired test of every cell (not yet decided: :func:`_decided` adds the decision)."""
    sub = records[records["experiment"] == experiment]
    groups = list(sub.groupby(keys, sort=True))
    m_by_model = pd.Series([k[0] if isinstance(k, tuple) else k for k, _ in groups]).value_counts().to_dict()
    rows = []
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        pivot = group.pivot_table(index=["seq_id", "position"], columns="role", values="delta", aggfunc="first",
                                  dropna=False)
        if not {"high", "low"} <= set(pivot.columns):
            continue
        pivot = pivot.dropna(subset=["high", "low"], how="all")
        if len(pivot) < 3:
            continue
        docs = pivot.index.get_level_values("seq_id").to_numpy()
        row = dict(zip(keys, key))
        row["n_layers"] = int(group["n_layers"].iloc[0])
        note = _nonfinite_note(pivot)
        if note is not None:
            row.update(_untestable(len(pivot), len(np.unique(docs)), note))
            row["design_effect"] = math.nan
        else:
            high, low = pivot["high"].to_numpy(dtype=float), pivot["low"].to_numpy(dtype=float)
            test = stats.paired_test(high, low, clusters=docs, n_boot=n_boot, n_perm=_n_perm(m_by_model[key[0]]),
                                     sesoi_d=sesoi_d, seed=_cell_seed(seed, experiment, *key))
            row.update(dataclasses.asdict(test))
            row["design_effect"] = stats.design_effect(high - low, docs)
            row.update(_mean_columns(high - low, docs, _cell_seed(seed, experiment, "mean", *key)))
        if experiment == "control":
            weights = group.pivot_table(index=["seq_id", "position"], columns="role", values="ablated_metric_value",
                                        aggfunc="first").reindex(pivot.index)
            diff = (pivot["high"] - pivot["low"]).to_numpy(dtype=float)
            ratio = (weights["high"] / weights["low"]).to_numpy(dtype=float)
            ok = np.isfinite(diff) & np.isfinite(ratio)
            row["spearman_rho"], row["spearman_p"] = stats.spearman(ratio[ok], diff[ok]) if ok.sum() >= 3 \
                else (math.nan, math.nan)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame.insert(frame.columns.get_loc("layer") + 1, "relative_depth", _relative_depth(frame))
    frame["sig_t_uncorrected"] = frame["p_t"] < ALPHA
    frame["sig_w_uncorrected"] = frame["p_wilcoxon"] < ALPHA
    frame["sesoi_d"] = sesoi_d
    return frame


def _decided(frame: pd.DataFrame, *, expert_level: bool) -> pd.DataFrame:
    if frame.empty:
        return frame
    parts = [decide_family(per_model, expert_level=expert_level)
             for _, per_model in frame.groupby("model", sort=False)]
    out = pd.concat(parts, ignore_index=True)
    out.attrs = dict(frame.attrs)
    return out


def _rank_validity(records: pd.DataFrame, *, seed: int | None, metrics: pd.DataFrame | None = None,
                   layer_pools: dict | None = None, n_draws: int = N_RANK_DRAWS) -> pd.DataFrame:
    sub = records[records["experiment"] == "rank_validity"]
    finite = np.isfinite(sub["delta"].to_numpy(dtype=float))
    token_key = ["model", "layer", "metric", "seq_id", "position"]
    dropped = sub.loc[~finite, token_key].drop_duplicates()
    if len(dropped):  # a token with a non-finite ΔL has no rank correlation
        bad = pd.MultiIndex.from_frame(dropped)
        sub = sub[~pd.MultiIndex.from_frame(sub[token_key]).isin(bad)]
    token_rho = _token_spearman(sub)
    cells = list(records[records["experiment"] == "rank_validity"].groupby(["model", "layer", "metric"], sort=True))
    m_by_model = pd.Series([k[0] for k, _ in cells]).value_counts().to_dict()
    rows = []
    for (model, layer, metric), group in cells:
        rhos, docs = token_rho.get((model, layer, metric), (np.empty(0), np.empty(0, dtype=int)))
        n_dropped = int(((dropped["model"] == model) & (dropped["layer"] == layer)
                         & (dropped["metric"] == metric)).sum()) if len(dropped) else 0
        row = {"model": model, "layer": layer, "metric": metric, "n_layers": int(group["n_layers"].iloc[0]),
               "n_positions": int(len(rhos)), "n_clusters": int(len(np.unique(docs))),
               "mean_rho": math.nan, "median_rho": math.nan, "pct_positive": math.nan, "p_sign": math.nan,
               "p_cluster": math.nan, "n_perm": 0,
               "note": f"{n_dropped} token(s) with a non-finite ΔL left out" if n_dropped else ""}
        if len(rhos):
            cell_seed = _cell_seed(seed, "rank_validity", model, layer, metric)
            flips = stats.clustered_tests(rhos, docs, n_perm=_n_perm(m_by_model[model]), seed=cell_seed)
            row.update(mean_rho=float(rhos.mean()), median_rho=float(np.median(rhos)),
                       pct_positive=float(100 * (rhos > 0).mean()), p_sign=flips.p_sign, p_cluster=flips.p_mean,
                       n_perm=flips.n_perm)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame.insert(2, "relative_depth", _relative_depth(frame))
    frame["p_perm"] = _rank_relabeling(frame, metrics, layer_pools or {}, seed=seed, n_draws=n_draws)
    return pd.concat([decide_rank_validity(g) for _, g in frame.groupby("model", sort=False)], ignore_index=True)


def _rank_relabeling(frame: pd.DataFrame, metrics: pd.DataFrame | None, layer_pools: dict, *, seed: int | None,
                     n_draws: int) -> list[float]:
    """Per rank-validity row, the relabeling p of its mean ρ (:mod:`moeaudit.experiments._rank_null`); NaN for the
    per-token routing weight (no static ranking to relabel) and without the metric table or the pool. Tie-free
    metrics of a layer share one null (as the audit's p_perm)."""
    out, cache = [], {}
    for _, row in frame.iterrows():
        pool = layer_pools.get((str(row["model"]), int(row["layer"])))
        if metrics is None or pool is None or row["metric"] not in metrics.columns:
            out.append(math.nan)
            continue
        values = _metric_vector(metrics, int(row["layer"]), str(row["metric"]), _n_experts(pool, metrics,
                                                                                         int(row["layer"])))
        key = (str(row["model"]), int(row["layer"]), null_key(values))
        if key not in cache:
            cache[key] = rank_null(pool, values, n_draws=n_draws,
                                   seed=None if seed is None else [int(seed), int(row["layer"]), 13])
        out.append(relabel_p(float(row["mean_rho"]), cache[key]))
    return out


def _token_spearman(sub: pd.DataFrame) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """Spearman rho between metric value and delta within every token (>= 3 experts, neither constant), grouped
    by (model, layer, metric) in token order, with each token's document: Pearson correlation of average ranks,
    vectorised over tokens."""
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
    out: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    for key, values in rho.groupby(level=[0, 1, 2], sort=False):
        out[key] = values.to_numpy(dtype=float), values.index.get_level_values("seq_id").to_numpy()
    return out


#: Per-layer redistribution correlations: column -> (x, y) over the layer's redistribution rows.
REDISTRIBUTION_CORRELATIONS: dict[str, tuple[str, str]] = {
    "rho_weight_gap": ("ablated_weight", "gap_norm"),
    "rho_weight_norm": ("ablated_weight", "output_norm"),
    "rho_gap_compensation": ("gap_norm", "relative_compensation"),
    "rho_gap_numerator": ("gap_norm", "compensation_numerator"),
}


def _redistribution(records: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    sub = records[records["experiment"] == "redistribution"].copy()
    if sub.empty:
        return pd.DataFrame(), pd.DataFrame()
    sub["expert"] = sub["ablated_experts"].map(lambda e: int(e[0]))
    sub["propagation"] = sub["final_gap_norm"] / sub["gap_norm"].where(sub["gap_norm"] > 0)
    sub["compensation_numerator"] = sub["remaining_norm"] * sub["compensation_cos"].clip(lower=0.0)
    if "output_norm" not in sub.columns:
        sub["output_norm"] = np.nan
    # Records written before output_norm was stored: in zero mode the gap at the layer is exactly w * ||E(x)||.
    derive = sub["output_norm"].isna() & (sub["mode"] == "zero") & (sub["ablated_weight"] > 0)
    sub.loc[derive, "output_norm"] = sub.loc[derive, "gap_norm"] / sub.loc[derive, "ablated_weight"]
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
        row = {
            "model": model, "layer": layer, "n_layers": int(group["n_layers"].iloc[0]), "n": len(group),
            "n_documents": int(group["seq_id"].nunique()),
            "mean_gap_norm": float(group["gap_norm"].mean()), "mean_final_gap_norm": float(group["final_gap_norm"].mean()),
            "mean_propagation": float(group["propagation"].mean()),
            "mean_compensation_cos": float(group["compensation_cos"].mean()),
        }
        row.update(_clustered_rhos(group, n_boot, [seed, int(layer)]))
        layers.append(row)
    return experts, pd.DataFrame(layers)


def _clustered_rhos(group: pd.DataFrame, n_boot: int, seed) -> dict:
    """Every correlation of :data:`REDISTRIBUTION_CORRELATIONS` over the rows where all its quantities are
    defined, with document-clustered intervals (one set of resamples for all four), and the two-sided p of the
    paper's two (rows as independent: kept for reference, the intervals are what to read)."""
    names = list(dict.fromkeys(c for pair in REDISTRIBUTION_CORRELATIONS.values() for c in pair))
    ok = np.isfinite(group[names].to_numpy(dtype=float)).all(axis=1)
    out: dict = {}
    for column in REDISTRIBUTION_CORRELATIONS:
        out.update({column: np.nan, f"{column}_low": np.nan, f"{column}_high": np.nan})
    out.update(p_weight_gap=np.nan, p_gap_compensation=np.nan)
    if ok.sum() < 3:
        return out
    rows = group[ok]
    columns = {name: rows[name].to_numpy(dtype=float) for name in names}
    res = stats.spearman_cluster_cis(columns, list(REDISTRIBUTION_CORRELATIONS.values()), rows["seq_id"].to_numpy(),
                                     n_boot=n_boot, seed=seed)
    for column, pair in REDISTRIBUTION_CORRELATIONS.items():
        out[column], out[f"{column}_low"], out[f"{column}_high"] = res[pair].rho, res[pair].ci_low, res[pair].ci_high
    out["p_weight_gap"] = stats.spearman(columns["ablated_weight"], columns["gap_norm"])[1]
    out["p_gap_compensation"] = stats.spearman(columns["gap_norm"], columns["relative_compensation"])[1]
    return out


def _families(tables: dict[str, pd.DataFrame], sesoi_d: float) -> pd.DataFrame:
    """One row per test family (a model's audit cells, its control layers): its size, corrected level and the
    minimum detectable d_z of the decision rule at 80% power, for independent positions and for the family's
    median design effect of clustering."""
    rows = []
    for name in ("audit", "control"):
        table = tables.get(name)
        if table is None or table.empty:
            continue
        for model, cells in table.groupby("model", sort=False):
            m, n = len(cells), float(cells["n"].median())
            deff = float(np.nanmedian(cells["design_effect"])) if cells["design_effect"].notna().any() else 1.0
            mde = stats.minimum_detectable_d(n, m, alpha=ALPHA)
            rows.append({"model": model, "family": name, "m_cells": m, "n": n, "correction": CORRECTION,
                         "alpha": ALPHA, "alpha_corrected": ALPHA / m, "sesoi_d": sesoi_d, "power": 0.8,
                         "rule": "mean_and_rank", "mde_d": mde, "design_effect": deff,
                         "mde_d_clustered": stats.minimum_detectable_d(n, m, alpha=ALPHA,
                                                                      design_effect=max(deff, 1.0))})
    return pd.DataFrame(rows)


def summary_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`summarize` a stored run configuration (``manifest["config"]``) implies,
    with the defaults of :class:`~moeaudit.config.RunConfig` for keys an older version did not write, so a report
    or a merge of shards recomputes exactly the run's own summary."""
    from moeaudit.config import RunConfig

    defaults = RunConfig()
    return {"n_boot": int(config.get("n_boot", defaults.n_boot)), "seed": int(config.get("seed", defaults.seed)),
            "sesoi_d": float(config.get("sesoi_d", defaults.sesoi_d)),
            "progressive_sesoi": float(config.get("progressive_sesoi", defaults.progressive_sesoi))}


def summarize(records: pd.DataFrame, *, metrics: pd.DataFrame | None = None, n_boot: int = 2000,
              seed: int | None = 0, sesoi_d: float = stats.SESOI_D, n_relabel: int = N_RELABEL,
              n_splits: int = N_SPLITS, progressive_sesoi: float = PROGRESSIVE_SESOI,
              n_metric_draws: int = N_METRIC_DRAWS) -> dict[str, pd.DataFrame]:
    """Every cell table, from the record table (and, for the expert-level null, the run's metric table).

    Args:
        records: The record table (:data:`~moeaudit.experiments.RECORD_COLUMNS`).
        metrics: The run's ``observe`` table (``metrics.parquet``); without it ``p_perm`` / ``d_perm_low`` /
            ``d_perm_high`` of the audit table are NaN, the audit decision rests on the token-level tests alone,
            and ``tables["audit"].attrs["notes"]`` says so.
        n_boot: Bootstrap resamples of the intervals.
        seed: The run's seed; every cell's bootstrap, sign-flip, relabeling and halving draws derive from it and
            the cell's key.
        sesoi_d: Smallest effect of interest of the equivalence tests, in units of d_z.
        n_relabel: Random relabelings of the metric per audit cell (random per-token choices per control cell);
            more, up to 20 / alpha_corrected, where fewer than 10 are as extreme.
        n_splits: Random document halvings of the causal ceiling.
        progressive_sesoi: Equivalence bound (nats of mean ΔL) of the progressive arms' comparison.
        n_metric_draws: Relabelings of each layer's shared null (the metric-level test and ``p_perm``).

    Returns:
        ``metrics`` (per model x metric: the pooled one-sided relabeling test ``p_metric`` with Holm over the
        model's metrics, the pooled share of the ceiling with its document-bootstrap interval and ``decision``; see
        :mod:`moeaudit.experiments._metric_test`), ``layer_z`` (per model x layer x metric: the audit's d on the
        scale of the layer's shared relabeling null, z = (d − null mean) / null sd, the components of
        ``pooled_z``), ``audit`` (per model x layer x metric: :func:`moeaudit.stats.paired_test` on D = ΔL_high - ΔL_low with
        documents as clusters, the design effect; the expert-level null ``p_perm`` with the band
        ``d_perm_low..d_perm_high`` of d under random relabelings of the metric across the layer's experts, and
        the layer's causal ceiling ``d_ceiling`` / ``d_ceiling_low`` / ``d_ceiling_high``; and the decision:
        ``significant`` when the document-clustered mean and signed-rank tests and the expert-level permutation
        test all survive Bonferroni correction over the model's audit cells and agree in direction; ``decision``,
        ``reason``, ``equivalent``), ``control`` (the same per model x layer, with the Spearman correlation of the
        weight ratio high/low and D; its ``p_perm`` permutes the weights within each token and is not part of its
        decision), ``rank_validity`` (per-token Spearman rho: mean, median, share > 0, document-clustered
        sign-flip p-values of the mean (``p_cluster``) and of the sign, Bonferroni over the model's rank-validity
        cells), ``progressive`` (per model x layer x arm x k: n, mean with its document-clustered interval,
        median, P95), ``progressive_arms`` (per model x layer x k x pair of removal orders: the paired comparison
        with its equivalence test against ±``progressive_sesoi`` nats, Holm over the model's comparisons; see
        :mod:`moeaudit.experiments._arms`), ``redistribution_experts``,
        ``redistribution_layers`` (four Spearman correlations with document-clustered intervals) and ``families``
        (per test family: m, corrected alpha, minimum detectable d). A cell whose ΔL is not finite somewhere is
        not tested and says why in ``note``; the other cells are unaffected.
    """
    layer_pools = pools(records)
    expert = {"metric_table": metrics, "n_perm": n_relabel, "n_splits": n_splits, "seed": seed}
    audit = _paired_cells(records, "audit", ["model", "layer", "metric"], n_boot=n_boot, seed=seed, sesoi_d=sesoi_d)
    audit, metric_level, layer_z = audit_expert_level(add_expert_level(audit, layer_pools, kind="audit", **expert),
                                             layer_pools, metrics, seed=seed, n_draws=n_metric_draws)
    audit = _decided(audit, expert_level=True)
    control = _paired_cells(records, "control", ["model", "layer"], n_boot=n_boot, seed=seed, sesoi_d=sesoi_d)
    control = _decided(add_expert_level(control, layer_pools, kind="control", **expert), expert_level=False)
    experts, layers = _redistribution(records, n_boot, seed)
    tables = {"metrics": metric_level, "layer_z": layer_z, "audit": audit, "control": control, "rank_validity": _rank_validity(records, seed=seed, metrics=metrics, layer_pools=layer_pools),
              "progressive": progressive_cells(records),
              "progressive_arms": arm_comparisons(
                  records, sesoi=progressive_sesoi, n_perm_for=_n_perm,
                  seed_for=lambda *key: _cell_seed(seed, "progressive_arms", *key)),
              "redistribution_experts": experts,
              "redistribution_layers": layers}
    tables["families"] = _families(tables, sesoi_d)
    if (records["experiment"] == ATTRIBUTION).any():  # the optional attribution control and its paired question
        tables["attribution_control"] = _decided(_paired_cells(records, ATTRIBUTION, ["model", "layer"],
                                                               n_boot=n_boot, seed=seed, sesoi_d=sesoi_d),
                                                 expert_level=False)
        tables["attribution_vs_control"] = attribution_vs_control(records, n_boot=n_boot, seed=seed)
    return tables
