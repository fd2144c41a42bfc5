"""Does metric validity differ between two models (e.g. two redundancy levels)? A test on per-layer statistics,
layers as units."""

from __future__ import annotations

import numpy as np
import pandas as pd
from statsmodels.stats.multitest import multipletests

from moeaudit.stats import layer_permutation_test

#: Columns of :func:`compare_models`' table.
COMPARISON_COLUMNS: tuple[str, ...] = ("metric", "model_a", "model_b", "n_layers_a", "n_layers_b", "mean_a",
                                       "mean_b", "diff", "t", "p_perm", "p_holm", "p_joint", "statistic")


def compare_models(per_layer: pd.DataFrame, model_a: str, model_b: str, *, statistic: str = "z",
                   seed: int = 0) -> pd.DataFrame:
    r"""Per metric, whether the mean per-layer validity statistic differs between two models.

    Estimand: for metric M, :math:`\bar z_{A,M} - \bar z_{B,M}`, the difference between the two models' mean
    per-layer z, z_l = (d_l − mean_l) / sd_l the audit cell's d on the scale of its layer's shared relabeling null
    (``tables/layer_z.csv``): the components of the metric-level statistic, pooled_z = Σ_l z_l
    (``tables/metrics.csv``), so the mean z is pooled_z / n_layers, comparable between models with different
    depths. Unit of inference: the layer; H0: the two models' layers are exchangeable for M (the per-layer z of
    both come from one distribution). Welch's t, two-sided, p from the permutation distribution of the model
    labels over layers (:func:`moeaudit.stats.layer_permutation_test`, exact for 8 + 8 layers: all 12,870
    splits); Holm over the metrics (``p_holm``) and one joint permutation test over all metrics (``p_joint``, the
    same on every row; a layer's metrics move together, so their correlation is respected). Each model's own
    relabeling test says whether its metric beats random rankings; this one says whether the two models' layers
    differ in how far above random rankings they lie, which the relabeling null cannot (under it both are 0).

    What it can show: whether *these two checkpoints* differ, beyond layer-to-layer variation, in how far their
    metrics rank experts above random rankings. What it cannot: that redundancy caused a difference (the models
    also differ in routing rule, width, training run), or anything about redundancy levels in general (two
    models are one draw each).

    Args:
        per_layer: Columns ``model``, ``layer``, ``metric`` and ``statistic`` (both runs' ``layer_z`` tables).
        model_a, model_b: The two models' labels in ``per_layer``.
        statistic: The per-layer column to compare.

    Raises:
        ValueError: A model is missing from ``per_layer`` or has fewer than 2 layers with the statistic.
    """
    missing = [m for m in (model_a, model_b) if m not in set(per_layer["model"])]
    if missing:
        raise ValueError(f"no per-layer statistics for {', '.join(missing)}; models present: "
                         f"{', '.join(sorted(set(map(str, per_layer['model']))))}.")
    wide = per_layer.pivot_table(index=["model", "layer"], columns="metric", values=statistic, aggfunc="first")
    metrics = [m for m in wide.columns if wide.loc[[model_a, model_b], m].notna().any()]
    a = wide.loc[model_a, metrics].to_numpy(float)
    b = wide.loc[model_b, metrics].to_numpy(float)
    result = layer_permutation_test(a, b, seed=seed)
    p_holm = multipletests(result.p, method="holm")[1] if len(metrics) else np.array([])
    n_a, n_b = int(np.isfinite(a).all(1).sum()), int(np.isfinite(b).all(1).sum())
    return pd.DataFrame({
        "metric": metrics, "model_a": model_a, "model_b": model_b, "n_layers_a": n_a, "n_layers_b": n_b,
        "mean_a": result.mean_a, "mean_b": result.mean_b, "diff": result.diff, "t": result.t, "p_perm": result.p,
        "p_holm": p_holm, "p_joint": result.p_joint, "statistic": statistic}, columns=list(COMPARISON_COLUMNS))


def comparison_sentence(table: pd.DataFrame, alpha: float = 0.05, label=str) -> str:
    """One verdict sentence on :func:`compare_models`' table, never more than the test supports (``label``: how a
    metric is named)."""
    if table.empty:
        return "The two models could not be compared (no per-layer statistics)."
    a, b = table["model_a"].iloc[0], table["model_b"].iloc[0]
    n = f"{table['n_layers_a'].iloc[0]} + {table['n_layers_b'].iloc[0]} layers"
    p_joint = float(table["p_joint"].iloc[0])
    differ = table[table["p_holm"] <= alpha]
    if len(differ):
        parts = ", ".join(f"{label(r.metric)} ({'higher' if r.diff > 0 else 'lower'} in {a}: mean z {r.mean_a:+.2f} vs "
                          f"{r.mean_b:+.2f}, Holm p = {r.p_holm:.3g})" for r in differ.itertuples())
        return (f"Metric validity differs between {a} and {b} for {parts} (layers as units, {n}; joint p = "
                f"{p_joint:.3g}). This is a difference between these two checkpoints, not evidence that the "
                "redundancy level causes it: they also differ in routing rule, expert width and training run.")
    if p_joint <= alpha:
        return (f"Taken together the metrics' validity differs between {a} and {b} (joint permutation p = "
                f"{p_joint:.3g}, layers as units, {n}), though no single metric's difference survives Holm; this "
                "is a difference between two checkpoints, not a shown effect of the redundancy level.")
    spread = ", ".join(f"{label(r.metric)} {r.diff:+.2f}" for r in table.itertuples())
    return (f"This run cannot tell whether metric validity differs between {a} and {b}: no metric's mean z "
            f"differs beyond layer-to-layer variation (Holm p ≥ {table['p_holm'].min():.2g}; joint p = "
            f"{p_joint:.3g}; differences in mean z, the per-layer components of the metric-level statistic: {spread}; "
            f"{n}). Not rejecting is not equality (8 layers per model detect only large differences), and two small "
            "checkpoints cannot speak for redundancy levels in general.")
