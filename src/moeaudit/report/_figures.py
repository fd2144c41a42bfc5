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
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

from moeaudit.report._grids import difference_histograms, expert_importance, metric_vs_importance, paired_scatter
from moeaudit.report._style import (
    _D_LABEL,
    _DELTA,
    _DPI,
    METRIC_COLORS,
    METRIC_LABELS,
    ROUTING_WEIGHT,
    _band,
    _empty,
    _figure,
    _style,
    arm_label,
    arm_rank,
    metric_color,
    metric_label,
    model_colors,
)

__all__ = ["METRIC_COLORS", "METRIC_LABELS", "ROUTING_WEIGHT", "control_vs_depth", "difference_histograms",
           "expert_importance", "metric_color", "metric_label", "metric_vs_importance", "model_colors",
           "paired_scatter", "progressive_curves", "save", "to_png_bytes"]


def control_vs_depth(audit: pd.DataFrame, control: pd.DataFrame) -> Figure | None:
    """The paper's Figure 1: the routing-weight control's effect size against depth, per model.

    Each model's control Cohen's d is a line over relative depth (filled markers: significant cells); a band of
    the model's colour spans the min..max audit d over the observational metrics at each layer; a hatched band
    spans the 95 % range of d under random rankings of the experts (``d_perm_low``..``d_perm_high`` of the audit
    cells, widest over the layer's metrics); triangles on a dashed line mark the causal ceiling ``d_ceiling``
    with its 2.5-97.5 % range over document halvings (when the tables have these columns).

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
        _random_band(ax, audit, model, color)
        _ceiling(ax, control, audit, model, color)
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
        Patch(facecolor="none", edgecolor="0.4", hatch="////", label="random expert rankings (95% of d)"),
        Line2D([], [], color="0.2", marker="^", linestyle="--", label="causal ceiling (range over halvings)"),
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


def _random_band(ax: Axes, audit: pd.DataFrame, model: str, color: str) -> None:
    if _empty(audit) or "d_perm_low" not in audit:
        return
    cells = audit[audit["model"] == model].dropna(subset=["d_perm_low", "d_perm_high"])
    if cells.empty:
        return
    band = cells.groupby("layer", sort=True).agg(relative_depth=("relative_depth", "first"),
                                                 low=("d_perm_low", "min"), high=("d_perm_high", "max"))
    band = band.sort_values("relative_depth")
    poly = ax.fill_between(band["relative_depth"], band["low"], band["high"], facecolor="none", edgecolor=color,
                           hatch="////", linewidth=0.0, alpha=0.45, zorder=2)
    poly.set_gid(f"random:{model}")


def _ceiling(ax: Axes, control: pd.DataFrame, audit: pd.DataFrame, model: str, color: str) -> None:
    frames = [t[t["model"] == model] for t in (control, audit) if not _empty(t) and "d_ceiling" in t]
    if not frames:
        return
    per_layer = (pd.concat(frames).dropna(subset=["d_ceiling"]).groupby("layer", sort=True)
                 .agg(relative_depth=("relative_depth", "first"), d=("d_ceiling", "first"),
                      low=("d_ceiling_low", "first"), high=("d_ceiling_high", "first")).sort_values("relative_depth"))
    if per_layer.empty:
        return
    x, y = per_layer["relative_depth"].to_numpy(), per_layer["d"].to_numpy()
    err = np.vstack([y - per_layer["low"].to_numpy(), per_layer["high"].to_numpy() - y])
    bars = ax.errorbar(x, y, yerr=err, color=color, marker="^", markersize=5, linestyle="--", linewidth=1.0,
                       capsize=2, elinewidth=0.8, zorder=3)
    bars.lines[0].set_gid(f"ceiling:{model}")


# --- Figure 2 -------------------------------------------------------------------------------------------------


def _maybe_symlog(ax: Axes, values: np.ndarray) -> None:
    """Symlog when the magnitudes span more than two orders (a few huge P95s would flatten the rest)."""
    mag = np.abs(values[np.isfinite(values)])
    mag = mag[mag > 0]
    if len(mag) and mag.max() / np.percentile(mag, 10) > 100:
        ax.set_yscale("symlog", linthresh=float(np.percentile(mag, 10)))


def progressive_curves(progressive: pd.DataFrame, model: str) -> Figure | None:
    """Mean, median and P95 of delta against k (experts removed), one line per layer; one row per removal order
    (arm), the panels of a column on one y scale so the orders compare at a glance.

    Args:
        progressive: The ``progressive`` table of :func:`~moeaudit.experiments.summarize` (a table without an
            ``arm`` column holds the highest-weight-first order only).
        model: The model to draw.

    Returns:
        A (arms x 3)-panel figure, or ``None`` when the table has no rows for ``model``.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure as _Figure

    if _empty(progressive):
        return None
    cells = progressive[progressive["model"] == model]
    if cells.empty:
        return None
    if "arm" not in cells.columns:
        cells = cells.assign(arm="highest")
    arms = sorted(cells["arm"].unique(), key=arm_rank)
    # Fixed margins in inches (constrained layout costs seconds at save time): title on top, legend on the right.
    left, right, bottom, top, panel_w, panel_h = 0.7, 1.1, 0.55, 0.6, 3.0, 2.3
    width, height = left + right + 3 * panel_w, bottom + top + panel_h * len(arms)
    fig = _Figure(figsize=(width, height))
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=0.3, hspace=0.45)
    axes = fig.subplots(len(arms), 3, sharex=True, sharey="col", squeeze=False)
    viridis = colormaps["viridis"]
    for row, arm in enumerate(arms):
        per_arm = cells[cells["arm"] == arm]
        for ax, (column, title) in zip(axes[row], (("mean", "mean"), ("median", "median"), ("p95", "P95"))):
            ax.axhline(0.0, color="0.4", linewidth=0.8)
            for layer, per_layer in per_arm.groupby("layer", sort=True):
                per_layer = per_layer.sort_values("k")
                depth = layer / max(int(per_layer["n_layers"].iloc[0]) - 1, 1)
                ax.plot(per_layer["k"], per_layer[column], marker="o", markersize=3, linewidth=1.2,
                        color=viridis(0.9 * depth), label=f"L{layer}", gid=f"progressive:{arm}:{column}:L{layer}")
            if row == 0:
                _maybe_symlog(ax, cells[column].to_numpy(dtype=float))
            ax.xaxis.get_major_locator().set_params(integer=True)
            _style(ax, f"{title} {_DELTA} · {arm_label(arm)}")
        axes[row, 0].set_ylabel(f"{_DELTA} (nats)", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("k (experts removed)", fontsize=8)
    axes[0, -1].legend(fontsize=6, ncols=2 if cells["layer"].nunique() > 8 else 1, loc="center left",
                       bbox_to_anchor=(1.02, 0.5), title="layer", title_fontsize=7)
    fig.suptitle(f"{model}: progressive ablation by removal order", fontsize=10, y=1 - 0.12 / height, va="top")
    return fig


# --- Figures 3 and 4: paired audit/control deltas -------------------------------------------------------------


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
