"""Shared look of the report figures: fixed colours per metric and model, labels, grid and axis helpers."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

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
#: Removal orders of the progressive ablation, in display order, with their labels.
ARM_LABELS: dict[str, str] = {"highest": "highest weight first", "lowest": "lowest weight first",
                              "random": "random order"}
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


def arm_label(arm: str) -> str:
    """Label of a progressive removal order."""
    return ARM_LABELS.get(arm, arm)


def arm_rank(arm: str) -> int:
    """Display position of a removal order (unknown names last)."""
    return list(ARM_LABELS).index(arm) if arm in ARM_LABELS else len(ARM_LABELS)


def model_colors(models: Sequence[str]) -> dict[str, str]:
    """tab10 colours by model order."""
    return {m: _TAB10[i % len(_TAB10)] for i, m in enumerate(models)}


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _grid(rows: int, cols: int, **share) -> tuple[Figure, np.ndarray]:
    """A rows x cols grid with fixed margins (in inches) for the super-title and super-labels. Constrained layout
    costs seconds per 40-panel grid at save time; the panels' own decorations are uniform, so fixed spacing fits."""
    from matplotlib.figure import Figure

    left, right, bottom, top = 0.75, 0.15, 0.7, 0.55  # inches
    width, height = _PANEL_W * cols + left + right, _PANEL_H * rows + bottom + top
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=0.3, hspace=0.5)
    return fig, fig.subplots(rows, cols, squeeze=False, **share)


def _grid_labels(fig: Figure, title: str, xlabel: str | None, ylabel: str | None) -> None:
    """Super-title and super-labels placed in the fixed margins of :func:`_grid` (positions in inches)."""
    fig.suptitle(title, fontsize=10, y=1 - 0.12 / fig.get_figheight(), va="top")
    if xlabel:
        fig.supxlabel(xlabel, fontsize=9, y=0.08 / fig.get_figheight(), va="bottom")
    if ylabel:
        fig.supylabel(ylabel, fontsize=9, x=0.08 / fig.get_figwidth(), ha="left")


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


def _band(audit: pd.DataFrame, model: str) -> pd.DataFrame:
    if _empty(audit):
        return pd.DataFrame(columns=["relative_depth", "low", "high"])
    cells = audit[audit["model"] == model].dropna(subset=["cohens_d"])
    return (cells.groupby("layer", sort=True)
            .agg(relative_depth=("relative_depth", "first"), low=("cohens_d", "min"), high=("cohens_d", "max"))
            .sort_values("relative_depth"))
