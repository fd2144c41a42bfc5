"""Figures of ``moeaudit map`` and ``moeaudit prune-eval``: the layer x expert importance heat map, perplexity
against the pruned fraction per criterion (random band, causal line), and the loss increase of one-layer prunings
(matplotlib imported lazily; each function returns a Figure or ``None`` when its input is empty)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from moeaudit.report._style import _grid, _grid_labels, _style, metric_color, metric_label

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RANDOM, CAUSAL, NONE = "random", "causal", "none"
_BAND = "#b0b0b0"


def importance_heatmap(importance: pd.DataFrame, model: str) -> Figure | None:
    """Mean ΔL when each expert is removed alone (top) and the share of positions where that hurts (bottom),
    layers as rows and experts as columns; experts never routed at a sampled position are hatched grey."""
    if importance is None or importance.empty:
        return None
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    layers = sorted(importance["layer"].unique())
    n_experts = int(importance["expert"].max()) + 1
    # two panels stacked: one row per layer, one column per expert (64-256 experts stay readable at 16 inches)
    fig = Figure(figsize=(min(16.0, 3.0 + 0.25 * n_experts), 2 * (1.0 + 0.22 * len(layers)) + 0.5),
                 layout="constrained")
    axes = fig.subplots(2, 1)
    for ax, column, title, cmap in ((axes[0], "mean_delta", "mean ΔL when removed (nats)", "RdBu_r"),
                                    (axes[1], "share_hurts", "share of positions with ΔL > 0", "viridis")):
        grid = (importance.pivot(index="layer", columns="expert", values=column)
                .reindex(index=layers, columns=range(n_experts)).to_numpy(dtype=float))
        finite = grid[np.isfinite(grid)]
        if column == "mean_delta":
            bound = float(np.max(np.abs(finite))) if finite.size else 1.0
            norm = TwoSlopeNorm(vcenter=0.0, vmin=-bound or -1e-9, vmax=bound or 1e-9)
            image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, norm=norm,
                              interpolation="nearest")
        else:
            image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0, vmax=1,
                              interpolation="nearest")
        ax.set_facecolor("#e6e6e6")
        never = importance[importance["never_routed"]]
        if len(never):
            ax.scatter(never["expert"], [layers.index(v) for v in never["layer"]], marker="x", s=14,
                       color="#555555", linewidths=0.8, label="never routed")
            ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False)
        every = max(1, len(layers) // 24)
        ax.set_yticks(range(0, len(layers), every), [f"L{v}" for v in layers][::every])
        step = max(1, n_experts // 32)
        ax.set_xticks(range(0, n_experts, step))
        ax.tick_params(labelsize=7)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.9).ax.tick_params(labelsize=7)
    fig.suptitle(f"{model}: causal importance map", fontsize=10)
    return fig


def perplexity_curves(prune: pd.DataFrame, model: str) -> Figure | None:
    """Held-out perplexity against the pruned fraction, one panel per criterion, each with the random band
    (shaded: the seeds' range; dashed: their mean), the causal reference (black) and the unpruned model (dotted)."""
    if prune is None or prune.empty:
        return None
    criteria = [c for c in pd.unique(prune["criterion"]) if c not in (RANDOM, NONE)]
    if not criteria:
        criteria = [RANDOM] if RANDOM in set(prune["criterion"]) else []
    if not criteria:
        return None
    cols = min(4, len(criteria))
    rows = math.ceil(len(criteria) / cols)
    fig, axes = _grid(rows, cols, sharex=True, sharey=True)
    random = prune[prune["criterion"] == RANDOM]
    band = random.groupby("fraction")["perplexity"].agg(["min", "max", "mean"]) if len(random) else None
    causal = prune[prune["criterion"] == CAUSAL].sort_values("fraction")
    base = prune[prune["criterion"] == NONE]["perplexity"]
    values = prune["perplexity"].to_numpy(dtype=float)
    log = np.nanmax(values) / max(np.nanmin(values), 1e-12) > 3
    for i, ax in enumerate(axes.flat):
        if i >= len(criteria):
            ax.set_visible(False)
            continue
        criterion = criteria[i]
        if band is not None:
            ax.fill_between(band.index, band["min"], band["max"], color=_BAND, alpha=0.45, linewidth=0,
                            label="random (range)")
            ax.plot(band.index, band["mean"], color="#707070", linestyle="--", linewidth=1, label="random (mean)")
        if len(causal) and criterion != CAUSAL:
            ax.plot(causal["fraction"], causal["perplexity"], color="black", linewidth=1.2, marker=".",
                    label="causal reference")
        if len(base):
            ax.axhline(float(base.iloc[0]), color="black", linestyle=":", linewidth=0.8, label="unpruned")
        mine = prune[prune["criterion"] == criterion].groupby("fraction")["perplexity"].mean()
        ax.plot(mine.index, mine.to_numpy(), color="black" if criterion == CAUSAL else metric_color(criterion),
                linewidth=1.8, marker="o", markersize=3, label=metric_label(criterion))
        if log:
            from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
        _style(ax, metric_label(criterion))
        if i == 0:
            ax.legend(fontsize=6, loc="upper left")
    _grid_labels(fig, f"{model}: held-out perplexity after pruning", "fraction of experts removed per layer",
                 "perplexity")
    return fig


def per_layer_curves(effects: pd.DataFrame, model: str) -> Figure | None:
    """Loss increase over the unpruned model when one layer alone is pruned, per fraction (panels): one line per
    criterion, the random band (seeds' range) shaded and the causal reference in black."""
    if effects is None or effects.empty:
        return None
    fractions = sorted(effects["fraction"].unique())
    fig, axes = _grid(1, len(fractions), sharey=True)
    for ax, fraction in zip(axes.flat, fractions):
        part = effects[effects["fraction"] == fraction]
        for criterion, rows in part.groupby("criterion", sort=True):
            rows = rows.sort_values("layer")
            if criterion == RANDOM:
                ax.fill_between(rows["layer"], rows["seed_min"], rows["seed_max"], color=_BAND, alpha=0.45,
                                linewidth=0, label="random (range)")
                ax.plot(rows["layer"], rows["delta_loss"], color="#707070", linestyle="--", linewidth=1)
            elif criterion == CAUSAL:
                ax.plot(rows["layer"], rows["delta_loss"], color="black", linewidth=1.6, marker=".",
                        label="causal reference")
            else:
                ax.plot(rows["layer"], rows["delta_loss"], color=metric_color(criterion), linewidth=0.9,
                        alpha=0.8, label=metric_label(criterion))
        ax.axhline(0, color="black", linewidth=0.5)
        _style(ax, f"f = {fraction:g}")
    axes.flat[0].legend(fontsize=5, loc="upper left", ncol=2)
    _grid_labels(fig, f"{model}: pruning one layer at a time", "layer", "loss increase over unpruned (nats)")
    return fig


def answer_figure(answer: pd.DataFrame, pooled: pd.DataFrame, model: str, allocation: str) -> Figure | None:
    """Per fraction (panels): every criterion's pooled mean loss with its 95% interval (the causal reference's loss
    plus the interval of δ against it), criteria sorted best first; the random prunings' pooled mean losses drawn
    as quantile bands (5–95% light, 25–75% dark, median line); dotted: unpruned."""
    part = answer[(answer["allocation"] == allocation) & (answer["criterion"] != RANDOM)]
    if part.empty:
        return None
    fractions = sorted(part["fraction"].unique())
    n_rows = int(part.groupby("fraction").size().max())
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 3.8 * len(fractions)), max(2.5, 0.2 * n_rows + 1.6)), layout="constrained")
    axes = fig.subplots(1, len(fractions), squeeze=False)
    base = pooled[pooled["criterion"] == NONE]["mean_loss"]
    for ax, fraction in zip(axes.flat, fractions):
        rows = part[part["fraction"] == fraction].sort_values("mean_loss", ascending=False)
        y = np.arange(len(rows))
        rand = pooled[(pooled["criterion"] == RANDOM) & (pooled["fraction"] == fraction)
                      & (pooled["allocation"] == allocation)]["mean_loss"].to_numpy()
        if rand.size:
            q = np.quantile(rand, [0.05, 0.25, 0.5, 0.75, 0.95])
            ax.axvspan(q[0], q[4], color=_BAND, alpha=0.3, linewidth=0, label="random 5–95%")
            ax.axvspan(q[1], q[3], color=_BAND, alpha=0.6, linewidth=0, label="random 25–75%")
            ax.axvline(q[2], color="#707070", linestyle="--", linewidth=1, label="random median")
        causal = rows[rows["criterion"] == CAUSAL]["mean_loss"]
        ref = float(causal.iloc[0]) if len(causal) else np.nan
        low = ref + rows["delta_causal_low"].to_numpy(dtype=float)
        high = ref + rows["delta_causal_high"].to_numpy(dtype=float)
        x = rows["mean_loss"].to_numpy(dtype=float)
        has = np.isfinite(low) & np.isfinite(high)
        ax.errorbar(x[has], y[has], xerr=[x[has] - low[has], high[has] - x[has]], fmt="none", ecolor="black",
                    elinewidth=0.8, capsize=2)
        colors = ["black" if c == CAUSAL else metric_color(c) for c in rows["criterion"]]
        ax.scatter(x, y, c=colors, s=16, zorder=3)
        ax.set_yticks(y, [metric_label(c) if c != CAUSAL else "causal reference" for c in rows["criterion"]],
                      fontsize=6)
        if len(base):
            ax.axvline(float(base.iloc[0]), color="black", linestyle=":", linewidth=0.8, label="unpruned")
        _style(ax, f"f = {fraction:g}")
    axes.flat[0].legend(fontsize=5, loc="upper left", bbox_to_anchor=(0.0, -0.12), ncol=4, frameon=False)
    fig.suptitle(f"{model}: mean loss after pruning ({allocation} allocation, pooled over folds)", fontsize=9)
    fig.supxlabel("mean loss (nats)", fontsize=8)
    return fig
