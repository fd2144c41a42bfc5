"""Per-cell grids of the report: paired scatters, histograms of D, metric against causal importance (rows are
layers, columns metrics)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from moeaudit import stats

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

from moeaudit.report._style import (
    _D_LABEL,
    _DELTA,
    METRIC_COLORS,
    ROUTING_WEIGHT,
    _cohens_d,
    _corner,
    _empty,
    _grid,
    _grid_labels,
    _style,
    metric_color,
    metric_label,
)


def _paired_deltas(records: pd.DataFrame, model: str) -> tuple[pd.DataFrame, list[str]]:
    """One row per (layer, metric, seq_id, position) with ``low``, ``high`` and ``D``; metric columns in order."""
    sub = records[(records["model"] == model) & records["experiment"].isin(("audit", "control"))]
    if sub.empty:
        return pd.DataFrame(), []
    columns = list(pd.unique(sub.loc[sub["experiment"] == "audit", "metric"]))
    if (sub["experiment"] == "control").any():
        columns.append(ROUTING_WEIGHT)
    wide = sub.pivot_table(index=["layer", "metric", "seq_id", "position"], columns="role", values="delta",
                           aggfunc="first")
    if not {"high", "low"} <= set(wide.columns):
        return pd.DataFrame(), []
    wide = wide[["low", "high"]].dropna().reset_index()
    wide["D"] = wide["high"] - wide["low"]
    return wide, columns


def _paired_grid(records: pd.DataFrame, model: str, draw, sharey: str | bool) -> Figure | None:
    if _empty(records):
        return None
    pairs, columns = _paired_deltas(records, model)
    if pairs.empty:
        return None
    layers = sorted(pairs["layer"].unique())
    cells = dict(tuple(pairs.groupby(["layer", "metric"])))
    fig, axes = _grid(len(layers), len(columns), sharex="row", sharey=sharey)
    for i, layer in enumerate(layers):
        row = pairs[pairs["layer"] == layer]
        for j, metric in enumerate(columns):
            ax = axes[i, j]
            cell = cells.get((layer, metric))
            if cell is None or cell.empty:
                ax.set_visible(False)
                continue
            draw(ax, cell, row, metric_color(metric))
            _style(ax, f"L{layer} · {metric_label(metric)}")
    return fig


def _draw_scatter(ax: Axes, cell: pd.DataFrame, row: pd.DataFrame, color: str) -> None:
    lo = float(min(row["low"].min(), row["high"].min()))
    hi = float(max(row["low"].max(), row["high"].max()))
    pad = 0.05 * (hi - lo) or 0.05
    lims = (lo - pad, hi + pad)
    ax.plot(lims, lims, color="0.5", linewidth=0.8, linestyle="--", zorder=1)
    ax.scatter(cell["low"], cell["high"], s=9, color=color, alpha=0.6, linewidths=0, zorder=2)
    ax.set_xlim(lims)
    ax.set_ylim(lims)
    _corner(ax, f"d = {_cohens_d(cell['D'].to_numpy()):+.2f}\nn = {len(cell)}")


def paired_scatter(records: pd.DataFrame, model: str) -> Figure | None:
    """ΔL_low (x) against ΔL_high (y) per position, one panel per layer (rows) and audited metric (columns).

    The control (routing weight) is the last column; the dashed diagonal is y = x, points above it are positions
    where removing the higher-ranked expert hurt more. The corner shows d = mean(D) / sd(D) and n.

    Args:
        records: The record table (``audit`` and ``control`` rows are used).
        model: The model to draw.

    Returns:
        The figure, or ``None`` when there are no paired audit/control records for ``model``.
    """
    fig = _paired_grid(records, model, _draw_scatter, sharey="row")
    if fig is not None:
        _grid_labels(fig, f"{model}: paired ablations per position (dashed: y = x)",
                     r"$\Delta L_{\mathrm{low}}$ (nats): lower-ranked expert ablated",
                     r"$\Delta L_{\mathrm{high}}$ (nats): higher-ranked expert ablated")
    return fig


def _draw_histogram(ax: Axes, cell: pd.DataFrame, row: pd.DataFrame, color: str) -> None:
    diff = cell["D"].to_numpy()
    bins = int(np.clip(np.sqrt(len(diff)), 8, 40))
    edges = np.histogram_bin_edges(row["D"].to_numpy(), bins=bins)
    ax.hist(diff, bins=edges, color=color, alpha=0.75)
    ax.axvline(0.0, color="0.3", linewidth=0.8, linestyle="--")
    ax.axvline(float(diff.mean()), color="black", linewidth=1.2)
    _corner(ax, f"mean = {diff.mean():+.3f}\nd = {_cohens_d(diff):+.2f}")


def difference_histograms(records: pd.DataFrame, model: str) -> Figure | None:
    """Histograms of D = ΔL_high − ΔL_low per layer (rows) and audited metric (columns), control last.

    Dashed line: 0; solid line: mean(D). Bins are shared within a row.

    Args:
        records: The record table (``audit`` and ``control`` rows are used).
        model: The model to draw.

    Returns:
        The figure, or ``None`` when there are no paired audit/control records for ``model``.
    """
    fig = _paired_grid(records, model, _draw_histogram, sharey=False)
    if fig is not None:
        _grid_labels(fig, f"{model}: paired differences (dashed: 0, solid: mean)", f"D = {_D_LABEL}", "positions")
    return fig


# --- Figure 5 -------------------------------------------------------------------------------------------------


def expert_importance(records: pd.DataFrame, model: str) -> pd.DataFrame:
    """Per (layer, expert): mean delta (``mean_delta``) and count (``n``) of its single-expert ablations.

    Uses ``rank_validity`` records (one per active expert and position, repeated once per metric: de-duplicated by
    layer, seq_id, position and expert), else ``redistribution`` records. Empty when neither exists.
    """
    sub = records[records["model"] == model]
    for experiment in ("rank_validity", "redistribution"):
        single = sub[sub["experiment"] == experiment]
        if not single.empty:
            break
    else:
        return pd.DataFrame(columns=["layer", "expert", "mean_delta", "n"])
    single = single.assign(expert=single["ablated_experts"].map(lambda e: int(e[0])))
    single = single.drop_duplicates(["layer", "seq_id", "position", "expert"])
    return (single.groupby(["layer", "expert"], sort=True)["delta"].agg(mean_delta="mean", n="count")
            .reset_index())


def _observed_metrics(records: pd.DataFrame, metrics: pd.DataFrame, model: str) -> list[str]:
    sub = records[records["model"] == model]
    names = list(pd.unique(sub.loc[sub["experiment"] == "audit", "metric"]))
    if not names:
        names = [m for m in pd.unique(sub.loc[sub["experiment"] == "rank_validity", "metric"]) if m != ROUTING_WEIGHT]
    if not names:
        names = list(METRIC_COLORS)[:-1]
    return [m for m in names if m in metrics.columns]


def metric_vs_importance(records: pd.DataFrame, metrics: pd.DataFrame, model: str) -> Figure | None:
    """Each expert's metric value (x) against its mean ΔL when ablated alone (y), per layer and audited metric.

    Point area grows with the number of ablations; the corner shows Spearman's rho across experts (when at least
    three experts have finite values).

    Args:
        records: The record table (``rank_validity`` rows, else ``redistribution`` rows).
        metrics: The ``observe`` table (``layer``, ``expert``, one column per metric; a ``model`` column is
            filtered when present).
        model: The model to draw.

    Returns:
        The figure, or ``None`` without single-expert records, metric columns or matching experts.
    """
    if _empty(records) or _empty(metrics):
        return None
    if "model" in metrics.columns:
        metrics = metrics[metrics["model"] == model]
    importance = expert_importance(records, model)
    columns = _observed_metrics(records, metrics, model)
    if importance.empty or not columns:
        return None
    table = importance.merge(metrics[["layer", "expert", *columns]], on=["layer", "expert"], how="inner")
    if table.empty:
        return None
    layers = sorted(table["layer"].unique())
    fig, axes = _grid(len(layers), len(columns), sharey="row")
    size_scale = 60.0 / max(float(table["n"].max()), 1.0)
    for i, layer in enumerate(layers):
        experts = table[table["layer"] == layer]
        for j, metric in enumerate(columns):
            ax = axes[i, j]
            ok = experts[np.isfinite(experts[metric].to_numpy(dtype=float))]
            ax.axhline(0.0, color="0.5", linewidth=0.8, linestyle="--")
            points = ax.scatter(ok[metric], ok["mean_delta"], s=8 + size_scale * ok["n"], color=metric_color(metric),
                                alpha=0.7, linewidths=0)
            points.set_gid(f"experts:{layer}:{metric}")
            if len(ok) >= 3:
                rho, _ = stats.spearman(ok[metric].to_numpy(dtype=float), ok["mean_delta"].to_numpy(dtype=float))
                _corner(ax, f"ρ = {rho:+.2f}" if np.isfinite(rho) else "ρ undefined")
            _style(ax, f"L{layer} · {metric_label(metric)}")
            if i == len(layers) - 1:
                ax.set_xlabel(metric_label(metric), fontsize=8)
    _grid_labels(fig, f"{model}: expert metric vs causal importance (area ∝ ablations)", None,
                 f"mean {_DELTA} when ablated alone (nats)")
    return fig


# --- Output ---------------------------------------------------------------------------------------------------
