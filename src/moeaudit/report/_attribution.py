"""Report of ``moeaudit attribute``, rebuilt from its run directory: per layer whether the first-order estimate can
stand in for exact ablation (with the numbers), the within-token question next to the routing-weight control, the
estimated importance map and a scatter of estimate against exact ΔL. No sentence calls the estimate causal beyond
what its measured agreement supports."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from moeaudit.report._document import Block, Heading, Paragraph, Table, figure_block, write_document
from moeaudit.report._prune import _generated, _label, _read_csv
from moeaudit.report._tables import fmt, fmt_ci, fmt_d_ci, fmt_p
from moeaudit.rundir import RunDirectory

if TYPE_CHECKING:
    from matplotlib.figure import Figure as MplFigure

_MEANING = {
    "stands in": "the estimate can stand in for exact ablation here (values and ranking agree: Spearman and Pearson "
                 "lower bounds ≥ 0.8, calibration slope in [0.8, 1.25])",
    "ranks only": "the estimate orders experts like exact ablation (Spearman lower bound ≥ 0.6) but its values are "
                  "not calibrated ΔL: use it to rank, not as a measured effect",
    "does not stand in": "the estimate does not agree well enough with exact ablation to replace it; treat it as a "
                         "gradient heuristic, not as a causal effect",
    "cannot tell": "this run cannot tell (too few documents or no interval)",
}


def _sentence(row) -> str:
    within = ("picks the costlier active expert (Definition 2.1 significant)" if row["significant_attr"]
              else "does not significantly pick the costlier active expert")
    control = "significant" if row["significant_control"] else "not significant"
    return (f"**L{int(row['layer'])}, {row['mode']}: {row['verdict']}.** Spearman {fmt(row['spearman'])} "
            f"{fmt_ci(row['spearman_low'], row['spearman_high'])}, Pearson {fmt(row['pearson'])} "
            f"{fmt_ci(row['pearson_low'], row['pearson_high'])}, slope {fmt(row['slope'])}, sign agreement "
            f"{fmt(row['sign_agree'])}; within a token the estimate {within} (d = {fmt(row['d_attr'])}; routing "
            f"weight control d = {fmt(row['d_control'])}, {control}). Meaning: {_MEANING[row['verdict']]}.")


def _agreement_table(table: pd.DataFrame, label: str) -> Table:
    rows = [[f"L{int(r.layer)}", r.mode, str(int(r.n_positions)), str(int(r.n_docs)),
             f"{fmt(r.pearson)} {fmt_ci(r.pearson_low, r.pearson_high)}",
             f"{fmt(r.spearman)} {fmt_ci(r.spearman_low, r.spearman_high)}",
             f"{fmt(r.slope)} {fmt_ci(r.slope_low, r.slope_high)}", fmt(r.sign_agree),
             fmt_d_ci(r.d_attr, r.d_attr_low, r.d_attr_high) + (" ✓" if r.significant_attr else ""),
             fmt_d_ci(r.d_control, r.d_control_low, r.d_control_high) + (" ✓" if r.significant_control else ""),
             fmt_p(r.p_attr_vs_control), f"{fmt(r.map_spearman)} / {fmt(r.map_overlap, 2)}", r.verdict]
            for r in table.itertuples()]
    return Table(f"{label}: attribution estimate against exact ablation",
                 ["layer", "mode", "positions", "docs", "Pearson [95%]", "Spearman [95%]", "slope [95%]",
                  "sign agree", "d attr [95%]", "d control [95%]", "p attr vs control", "map ρ / overlap",
                  "verdict"], rows, align_left=2,
                 notes="Rows: every active expert at the exact pool's positions. Intervals resample or cluster "
                       "documents. slope: exact ΔL = a + slope · estimate (1 = calibrated). d: Cohen's d_z of "
                       "D = ΔL(top-ranked active expert) − ΔL(bottom-ranked) per token, ranked by the estimate "
                       "(attr) or by routing weight (control); ✓ = paired t and Wilcoxon both below 0.05 / cells, "
                       "positive. p attr vs control: document sign-flip test of mean D_attr − D_control. map: "
                       "Spearman over experts and overlap of the n_experts/4 lowest between each expert's mean "
                       "estimate and its mean exact ΔL (the map's mean_delta) over the same positions. Full table "
                       "(also attr_removal_cost over every position vs the pool): tables/attribution.csv.")


def scatter(attribution: pd.DataFrame, modes: list[str], label: str) -> MplFigure | None:
    """Estimate against exact ΔL per layer (columns) and mode (rows), with the identity line."""
    from matplotlib.figure import Figure

    layers = sorted(attribution["layer"].unique())
    if not layers:
        return None
    fig = Figure(figsize=(min(16.0, 2.6 * len(layers) + 1), 2.6 * len(modes) + 0.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(modes), len(layers), squeeze=False))
    for i, mode in enumerate(modes):
        for j, layer in enumerate(layers):
            ax = axes[i, j]
            part = attribution[(attribution["layer"] == layer)].dropna(subset=[f"exact_{mode}"])
            x, y = part[f"estimate_{mode}"].to_numpy(float), part[f"exact_{mode}"].to_numpy(float)
            ax.scatter(x, y, s=4, alpha=0.5, color="#3465a4", linewidths=0)
            if len(x):
                lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
                ax.plot([lo, hi], [lo, hi], color="#888888", linewidth=0.8)
            ax.set_title(f"L{layer} {mode}", fontsize=8)
            ax.tick_params(labelsize=6)
            if j == 0:
                ax.set_ylabel("exact ΔL (nats)", fontsize=7)
            if i == len(modes) - 1:
                ax.set_xlabel("estimate g·δy", fontsize=7)
    fig.suptitle(f"{label}: attribution estimate vs exact ablation", fontsize=10)
    return fig


def importance_heatmap(importance: pd.DataFrame, mode: str, label: str) -> MplFigure | None:
    """attr_removal_cost per (layer, expert) for one mode; experts never routed are grey."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    part = importance[importance["mode"] == mode]
    if part.empty:
        return None
    layers = sorted(part["layer"].unique())
    n_experts = int(part["expert"].max()) + 1
    grid = part.pivot(index="layer", columns="expert", values="attr_removal_cost").reindex(
        index=layers, columns=range(n_experts)).to_numpy(float)
    finite = grid[np.isfinite(grid)]
    bound = float(np.max(np.abs(finite))) if finite.size else 1.0
    fig = Figure(figsize=(min(16.0, 3.0 + 0.25 * n_experts), 1.6 + 0.25 * len(layers)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="RdBu_r", interpolation="nearest",
                      norm=TwoSlopeNorm(vcenter=0.0, vmin=-bound or -1e-9, vmax=bound or 1e-9))
    ax.set_facecolor("#e6e6e6")
    ax.set_yticks(range(len(layers)), [f"L{v}" for v in layers])
    ax.set_xlabel("expert", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.colorbar(image, ax=ax, shrink=0.9).ax.tick_params(labelsize=7)
    ax.set_title(f"{label}: attr_removal_cost ({mode}; routed share × mean estimate, nats per position)",
                 fontsize=9)
    return fig


def write_attribution_report(path: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """``report.md`` / ``report.html`` / ``figures/`` of a ``moeaudit attribute`` directory."""
    run_dir = RunDirectory(path)
    manifest = run_dir.manifest()
    label, config = _label(manifest), manifest.get("config", {})
    modes = list(config.get("modes", ["zero"]))
    table = _read_csv(run_dir, "tables/attribution.csv")
    attribution = run_dir.read_parquet("attribution.parquet")
    importance = run_dir.read_parquet("attribution_importance.parquet")
    n_rows = 0 if attribution is None else len(attribution)
    blocks: list[Block] = [_generated(run_dir), Paragraph(
        f"First-order estimates g·δy of the loss change from removing each routed expert, at every position of the "
        f"{config.get('n_docs')} documents of `{config.get('corpus')}` ({n_rows} (position, layer, expert) rows, "
        f"modes {', '.join(modes)}), checked against exact ablation of every active expert at "
        f"{config.get('n_exact')} sampled positions per layer. An estimate is a gradient-based approximation: "
        "it is evidence about an expert's causal effect only where the agreement below supports it.")]
    blocks.append(Heading("Can the estimate stand in for ablation?"))
    if table is not None and len(table):
        blocks += [Paragraph(_sentence(row)) for row in table.to_dict("records")]
        blocks.append(_agreement_table(table, label))
    else:
        blocks.append(Paragraph("No agreement table: this run cannot tell."))
    if attribution is not None:
        fig = scatter(attribution, modes, label)
        if fig is not None:
            blocks.append(figure_block("attribution_scatter", "Estimate against exact ΔL at the exact pool's "
                                       "(position, active expert) rows; grey: identity.", fig))
    if importance is not None:
        blocks.append(Heading("Estimated importance map"))
        for mode in modes:
            fig = importance_heatmap(importance, mode, label)
            if fig is not None:
                blocks.append(figure_block(f"attribution_importance_{mode}", f"attr_removal_cost ({mode}): routed "
                                           "share × mean estimate per expert, all positions (red: removal "
                                           "estimated to raise the loss).", fig))
    return write_document(f"moeaudit attribute: {label}", blocks, out or run_dir.path)
