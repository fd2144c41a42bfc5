"""Matplotlib figures of the audit report: tables and records in, ``Figure`` out; only :func:`save` writes files.

Every function builds a standalone :class:`matplotlib.figure.Figure` (no pyplot, no global state; matplotlib is
imported lazily so ``import moeaudit.report`` stays cheap) and returns ``None`` when its input lacks the needed
experiment. Colours are fixed: one per metric in every figure (:data:`METRIC_COLORS`, a stable fallback for other
names), one per model in order of appearance (tab10).
"""

from __future__ import annotations

import io
import os
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from moeaudit import stats

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ROUTING_WEIGHT = "routing_weight"
#: One colour per metric, the same in every figure; the control is drawn dark red.
METRIC_COLORS: dict[str, str] = {
    "utilization_rate": "#1f77b4",
    "activation_norm": "#ff7f0e",
    "mean_routing_weight_when_active": "#2ca02c",
    "activation_std": "#9467bd",
    ROUTING_WEIGHT: "#8b0000",
}
#: Short labels of the paper's metrics; other names print with spaces for underscores.
METRIC_LABELS: dict[str, str] = {
    "utilization_rate": "utilization",
    "activation_norm": "activation norm",
    "mean_routing_weight_when_active": "mean weight (active)",
    "activation_std": "activation std",
    ROUTING_WEIGHT: "routing weight (control)",
}
_FALLBACK_COLORS = ("#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#7b4173")
_TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf")
_DPI = 150
_PANEL_W, _PANEL_H = 2.6, 2.3  # inches per grid panel
_DELTA = r"$\Delta L$"
_D_LABEL = r"$\Delta L_{\mathrm{high}} - \Delta L_{\mathrm{low}}$ (nats)"


def metric_color(metric: str) -> str:
    """The metric's fixed colour; unknown names get a colour from a fallback cycle keyed by a stable hash."""
    if metric in METRIC_COLORS:
        return METRIC_COLORS[metric]
    return _FALLBACK_COLORS[zlib.crc32(metric.encode()) % len(_FALLBACK_COLORS)]


def metric_label(metric: str) -> str:
    """Short human label of a metric."""
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


def model_colors(models: Sequence[str]) -> dict[str, str]:
    """tab10 colours by model order."""
    return {m: _TAB10[i % len(_TAB10)] for i, m in enumerate(models)}


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _grid(rows: int, cols: int, **share) -> tuple[Figure, np.ndarray]:
    fig = _figure(_PANEL_W * cols + 0.6, _PANEL_H * rows + 0.8)
    return fig, fig.subplots(rows, cols, squeeze=False, **share)


def _style(ax: Axes, title: str | None = None) -> None:
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.25, linewidth=0.5)
    if title:
        ax.set_title(title, fontsize=8)


def _corner(ax: Axes, text: str) -> None:
    ax.text(0.03, 0.97, text, transform=ax.transAxes, fontsize=7, va="top", ha="left",
            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.8, "linewidth": 0})


def _empty(frame: pd.DataFrame | None) -> bool:
    return frame is None or frame.empty


def _cohens_d(diff: np.ndarray) -> float:
    """mean(D) / sd(D) with ddof=1; NaN when undefined."""
    if len(diff) < 2 or np.std(diff, ddof=1) == 0:
        return float("nan")
    return float(np.mean(diff) / np.std(diff, ddof=1))


# --- Figure 1 -------------------------------------------------------------------------------------------------


def _band(audit: pd.DataFrame, model: str) -> pd.DataFrame:
    if _empty(audit):
        return pd.DataFrame(columns=["relative_depth", "low", "high"])
    cells = audit[audit["model"] == model].dropna(subset=["cohens_d"])
    return (cells.groupby("layer", sort=True)
            .agg(relative_depth=("relative_depth", "first"), low=("cohens_d", "min"), high=("cohens_d", "max"))
            .sort_values("relative_depth"))


def control_vs_depth(audit: pd.DataFrame, control: pd.DataFrame) -> Figure | None:
    """The paper's Figure 1: the routing-weight control's effect size against depth, per model.

    Each model's control Cohen's d is a line over relative depth (filled markers: significant cells); a band of
    the model's colour spans the min..max audit d over the observational metrics at each layer.

    Args:
        audit: The ``audit`` table of :func:`~moeaudit.experiments.summarize` (may be empty: no bands).
        control: The ``control`` table.

    Returns:
        The figure, or ``None`` when ``control`` is empty.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if _empty(control):
        return None
    order = list(pd.unique(pd.concat([control["model"], audit["model"] if not _empty(audit) else None])))
    colors = model_colors(order)
    fig = _figure(6.4, 4.2)
    ax = fig.subplots()
    ax.axhline(0.0, color="0.4", linewidth=0.8, zorder=1)
    handles = []
    for model in order:
        color = colors[model]
        band = _band(audit, model)
        if not band.empty:
            poly = ax.fill_between(band["relative_depth"], band["low"], band["high"], color=color, alpha=0.2,
                                   linewidth=0)
            poly.set_gid(f"band:{model}")
        cells = control[control["model"] == model].sort_values("relative_depth")
        if cells.empty:
            continue
        x, y = cells["relative_depth"].to_numpy(), cells["cohens_d"].to_numpy()
        sig = cells["significant"].fillna(False).astype(bool).to_numpy() if "significant" in cells else \
            np.zeros(len(cells), bool)
        (line,) = ax.plot(x, y, color=color, linewidth=1.8, label=model, zorder=3)
        line.set_gid(f"control:{model}")
        ax.plot(x[sig], y[sig], "o", color=color, markersize=6, zorder=4)
        ax.plot(x[~sig], y[~sig], "o", color=color, markerfacecolor="white", markersize=6, zorder=4)
        handles.append(Line2D([], [], color=color, marker="o", linewidth=1.8, label=model))
    handles += [
        Patch(facecolor="0.5", alpha=0.3, label="observational metrics (min–max d)"),
        Line2D([], [], color="0.2", marker="o", linestyle="none", label="control, significant"),
        Line2D([], [], color="0.2", marker="o", markerfacecolor="white", linestyle="none",
               label="control, not significant"),
    ]
    ax.legend(handles=handles, fontsize=7, loc="best", framealpha=0.9)
    ax.set_xlim(-0.03, 1.03)
    ax.set_xlabel("relative depth (layer / (L−1))", fontsize=9)
    ax.set_ylabel(f"Cohen's d of {_D_LABEL.replace(' (nats)', '')}", fontsize=9)
    ax.set_title("Routing-weight control vs observational metrics", fontsize=10)
    _style(ax)
    return fig


# --- Figure 2 -------------------------------------------------------------------------------------------------


def _maybe_symlog(ax: Axes, values: np.ndarray) -> None:
    """Symlog when the magnitudes span more than two orders (a few huge P95s would flatten the rest)."""
    mag = np.abs(values[np.isfinite(values)])
    mag = mag[mag > 0]
    if len(mag) and mag.max() / np.percentile(mag, 10) > 100:
        ax.set_yscale("symlog", linthresh=float(np.percentile(mag, 10)))


def progressive_curves(progressive: pd.DataFrame, model: str) -> Figure | None:
    """Mean, median and P95 of delta against k (top-weight experts removed), one line per layer.

    Args:
        progressive: The ``progressive`` table of :func:`~moeaudit.experiments.summarize`.
        model: The model to draw.

    Returns:
        A three-panel figure, or ``None`` when the table has no rows for ``model``.
    """
    from matplotlib import colormaps

    if _empty(progressive):
        return None
    cells = progressive[progressive["model"] == model]
    if cells.empty:
        return None
    fig = _figure(3 * 3.0 + 1.4, 3.2)
    axes = fig.subplots(1, 3, sharex=True)
    viridis = colormaps["viridis"]
    for ax, (column, title) in zip(axes, (("mean", "mean"), ("median", "median"), ("p95", "P95"))):
        ax.axhline(0.0, color="0.4", linewidth=0.8)
        for layer, per_layer in cells.groupby("layer", sort=True):
            per_layer = per_layer.sort_values("k")
            depth = layer / max(int(per_layer["n_layers"].iloc[0]) - 1, 1)
            ax.plot(per_layer["k"], per_layer[column], marker="o", markersize=3, linewidth=1.2,
                    color=viridis(0.9 * depth), label=f"L{layer}")
        _maybe_symlog(ax, cells[column].to_numpy(dtype=float))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("k (top-weight experts removed)", fontsize=8)
        _style(ax, f"{title} {_DELTA}")
    axes[0].set_ylabel(f"{_DELTA} (nats)", fontsize=8)
    axes[-1].legend(fontsize=6, ncols=2 if cells["layer"].nunique() > 8 else 1, loc="center left",
                    bbox_to_anchor=(1.02, 0.5), title="layer", title_fontsize=7)
    fig.suptitle(f"{model}: progressive ablation of the highest-weight experts", fontsize=10)
    return fig


# --- Figures 3 and 4: paired audit/control deltas -------------------------------------------------------------


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
        fig.supxlabel(r"$\Delta L_{\mathrm{low}}$ (nats): lower-ranked expert ablated", fontsize=9)
        fig.supylabel(r"$\Delta L_{\mathrm{high}}$ (nats): higher-ranked expert ablated", fontsize=9)
        fig.suptitle(f"{model}: paired ablations per position (dashed: y = x)", fontsize=10)
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
        fig.supxlabel(f"D = {_D_LABEL}", fontsize=9)
        fig.supylabel("positions", fontsize=9)
        fig.suptitle(f"{model}: paired differences (dashed: 0, solid: mean)", fontsize=10)
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
    fig.supylabel(f"mean {_DELTA} when ablated alone (nats)", fontsize=9)
    fig.suptitle(f"{model}: expert metric vs causal importance (area ∝ ablations)", fontsize=10)
    return fig


# --- Output ---------------------------------------------------------------------------------------------------


def to_png_bytes(fig: Figure, *, dpi: int = _DPI) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def save(fig: Figure, directory: Path, name: str, *, dpi: int = _DPI) -> list[Path]:
    """Write ``name.png`` and ``name.pdf`` into ``directory`` atomically (temp file + ``os.replace``).

    Returns:
        The two paths written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in ("png", "pdf"):
        target = directory / f"{name}.{fmt}"
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=f".{fmt}.tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                # No creation date in the PDF, so the same figure gives the same bytes.
                fig.savefig(handle, format=fmt, dpi=dpi, metadata={"CreationDate": None} if fmt == "pdf" else None)
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; a report is meant to be read by others
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        written.append(target)
    return written
