"""The audit's expert-level columns and the metric-level table: per cell the secondary two-sided ``p_perm``, the
band of d under random rankings and d's percentile in it, the share of the ceiling with its interval and whether
the layer is informative; per metric the pooled one-sided test (``tables/metrics.csv``) and its decision."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from moeaudit.experiments._ceiling_share import N_SHARE_BOOT, ratio_interval, share_bootstrap
from moeaudit.experiments._expert_null import _metric_vector, _n_experts
from moeaudit.experiments._metric_test import (
    N_METRIC_DRAWS,
    LayerNull,
    layer_nulls,
    metric_table,
    observed_d,
    tie_keys,
)
from moeaudit.experiments._pool import Pool

#: Columns :func:`audit_expert_level` adds (besides filling ``p_perm``, ``d_perm_low``, ``d_perm_high``).
AUDIT_EXPERT_COLUMNS: tuple[str, ...] = ("d_perm_pct", "ceiling_share", "ceiling_share_low", "ceiling_share_high",
                                         "layer_informative")
#: Outcomes of the metric-level decision (``tables/metrics.csv`` column ``decision``).
METRIC_DECISIONS: tuple[str, ...] = (
    "supported",  # the pooled one-sided test rejects after Holm: M ranks better than random rankings
    "below_half_ceiling",  # not supported, and the share of the ceiling is shown below one half (upper bound < .5)
    "not_distinguishable",  # neither: not distinguishable from random rankings at this n
    "cannot_tell",  # no informative layer: the ceiling never rises above the random band, nothing can be learned
)
HALF_CEILING = 0.5
#: Columns of ``tables/layer_z.csv``: each audit cell's d on the scale of its layer's shared relabeling null.
LAYER_Z_COLUMNS: tuple[str, ...] = ("model", "layer", "metric", "n", "d", "null_mean", "null_sd", "z")


def _two_sided(d: float, null: LayerNull) -> float:
    ok = null.draws[np.isfinite(null.draws)]
    if not np.isfinite(d) or ok.size == 0:
        return math.nan
    return float((1 + np.sum(np.abs(ok) >= abs(d) * (1 - 1e-12))) / (1 + ok.size))


def audit_expert_level(audit: pd.DataFrame, layer_pools: dict[tuple[str, int], Pool],
                       metrics: pd.DataFrame | None, *, seed: int | None, n_draws: int = N_METRIC_DRAWS,
                       n_boot: int = N_SHARE_BOOT, alpha: float = 0.05
                       ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(audit with the expert-level columns, the metric table, the per-layer z table)``.

    ``seed`` is the run's seed: the audit's tie keys derive from it, so the observed d equals the cell's d.
    Relabelings per layer: max(``n_draws``, 20 · m / alpha), m the model's audit cells, so the secondary per-cell
    ``p_perm`` can reach the corrected level. ``layer_informative``: the layer's ceiling d lies above the 97.5 %
    point of d under random rankings (else no static ranking can be told from a random one there at this n).

    The per-layer z table (``tables/layer_z.csv``, :data:`LAYER_Z_COLUMNS`) holds the components of
    ``pooled_z``: per cell ``d`` (the audit's d, from its tie keys), the mean and sd of d under the layer's shared
    relabeling null and z = (d − null_mean) / null_sd; ``pooled_z`` of a metric is the sum of its z over the layers
    :func:`moeaudit.experiments._metric_test.pooled_metric_test` uses.
    """
    out = audit.copy()
    for column in AUDIT_EXPERT_COLUMNS:
        out[column] = pd.Series(pd.NA, index=out.index, dtype="boolean") if column == "layer_informative" else np.nan
    if out.empty or metrics is None or not layer_pools:
        return out, pd.DataFrame(columns=list(_metric_columns())), pd.DataFrame(columns=list(LAYER_Z_COLUMNS))
    run_seed = 0 if seed is None else int(seed)
    d_obs: dict[tuple[str, int, str], float] = {}
    nulls: dict[tuple[str, int, str], LayerNull] = {}
    shares: list[pd.DataFrame] = []
    for model, cells in out.groupby("model", sort=True):
        draws = max(int(n_draws), int(math.ceil(20 * len(cells) / alpha)))
        boot_layers, boot_values = {}, {}
        for layer, per_layer in cells.groupby("layer", sort=True):
            pool = layer_pools.get((str(model), int(layer)))
            if pool is None:
                continue
            n_experts = _n_experts(pool, metrics, int(layer))
            keys = tie_keys(pool, run_seed)
            values = {str(m): _metric_vector(metrics, int(layer), str(m), n_experts) for m in per_layer["metric"]}
            by_metric = layer_nulls(pool, values, keys, n_draws=draws,
                                    seed=None if seed is None else [run_seed, int(layer), 7])
            for m, vals in values.items():
                d_obs[(str(model), int(layer), m)] = observed_d(pool, vals, keys)
                nulls[(str(model), int(layer), m)] = by_metric[m]
            boot_layers[int(layer)] = (pool, n_experts, keys)
            boot_values[int(layer)] = values
        d_boot, c_boot = share_bootstrap(boot_layers, boot_values, n_boot=n_boot,
                                         seed=None if seed is None else [run_seed, 11])
        shares.append(_fill(out, cells.index, str(model), d_obs, nulls, d_boot, c_boot))
    table = metric_table(out, d_obs, nulls, alpha=alpha)
    pooled = pd.concat(shares, ignore_index=True) if shares else pd.DataFrame()
    if not table.empty:
        table = table.merge(pooled, on=["model", "metric"], how="left")
        table["decision"] = [metric_decision(r, alpha) for r in table.itertuples()]
        table = table[[c for c in _metric_columns() if c in table.columns]]
    return out, table, _layer_z(out, d_obs, nulls)


def _layer_z(audit: pd.DataFrame, d_obs, nulls) -> pd.DataFrame:
    """Per audit cell with a null: n, d, the null's mean and sd, z (NaN where the null's sd is 0 or undefined)."""
    rows = []
    for r in audit.itertuples():
        key = (str(r.model), int(r.layer), str(r.metric))
        if key not in nulls:
            continue
        null, d = nulls[key], d_obs[key]
        ok = np.isfinite(d) and np.isfinite(null.sd) and null.sd > 0
        rows.append({"model": r.model, "layer": int(r.layer), "metric": r.metric, "n": getattr(r, "n", math.nan),
                     "d": d, "null_mean": null.mean, "null_sd": null.sd,
                     "z": (d - null.mean) / null.sd if ok else math.nan})
    return pd.DataFrame(rows, columns=list(LAYER_Z_COLUMNS))


def _metric_columns() -> tuple[str, ...]:
    return ("model", "metric", "n_layers", "n_informative", "pooled_z", "p_metric", "p_metric_holm", "n_draws",
            "ceiling_share", "ceiling_share_low", "ceiling_share_high", "decision")


def _fill(out: pd.DataFrame, index, model: str, d_obs, nulls, d_boot, c_boot) -> pd.DataFrame:
    """Per-cell columns of ``out`` at ``index`` (in place) and the pooled share per metric of this model."""
    informative_layers: set[int] = set()
    for i in index:
        layer, metric = int(out.at[i, "layer"]), str(out.at[i, "metric"])
        null = nulls.get((model, layer, metric))
        if null is None:
            continue
        d = d_obs[(model, layer, metric)]
        ok = null.draws[np.isfinite(null.draws)]
        low, high = np.quantile(ok, (0.025, 0.975)) if ok.size else (math.nan, math.nan)
        ceiling = float(out.at[i, "d_ceiling"])
        informative = bool(np.isfinite(ceiling) and np.isfinite(high) and ceiling > high)
        if informative:
            informative_layers.add(layer)
        share_low, share_high = ratio_interval(d_boot[(layer, metric)], c_boot[layer])
        out.loc[i, ["p_perm", "d_perm_low", "d_perm_high", "d_perm_pct", "ceiling_share", "ceiling_share_low",
                    "ceiling_share_high"]] = [_two_sided(d, null), low, high, null.percentile(d),
                                              d / ceiling if ceiling > 0 else math.nan, share_low, share_high]
        out.at[i, "layer_informative"] = informative
    rows = []
    cells = out.loc[index]
    for metric, per_metric in cells.groupby("metric", sort=True):
        used = [int(x) for x in per_metric["layer"] if int(x) in informative_layers]
        row = {"model": model, "metric": str(metric), "n_informative": len(used), "ceiling_share": math.nan,
               "ceiling_share_low": math.nan, "ceiling_share_high": math.nan}
        if used:
            num = sum(d_obs[(model, layer, str(metric))] for layer in used)
            den = sum(float(per_metric.loc[per_metric["layer"] == layer, "d_ceiling"].iloc[0]) for layer in used)
            boot_num = np.sum([d_boot[(layer, str(metric))] for layer in used], axis=0)
            boot_den = np.sum([c_boot[layer] for layer in used], axis=0)
            low, high = ratio_interval(boot_num, boot_den)
            row.update(ceiling_share=num / den if den > 0 else math.nan, ceiling_share_low=low,
                       ceiling_share_high=high)
        rows.append(row)
    return pd.DataFrame(rows)


def metric_decision(row, alpha: float = 0.05) -> str:
    """One of :data:`METRIC_DECISIONS` from a metric-table row (see there)."""
    if getattr(row, "n_informative", 0) == 0 and not (np.isfinite(row.p_metric_holm) and row.p_metric_holm <= alpha):
        return "cannot_tell"
    if np.isfinite(row.p_metric_holm) and row.p_metric_holm <= alpha:
        return "supported"
    if np.isfinite(row.ceiling_share_high) and row.ceiling_share_high < HALF_CEILING:
        return "below_half_ceiling"
    return "not_distinguishable"
