"""The report's short tables, read before the details: the metric-level test per metric and one row per layer
(informative or not, the ceiling, random rankings' band, the control, the cells with E[D] > 0). The long per-cell
tables go to ``report-details.md`` and the ``tables/`` CSVs."""

from __future__ import annotations

import math

import pandas as pd

from moeaudit.report._document import Table
from moeaudit.report._tables import DECISION_LABELS, fmt, fmt_ci, fmt_d_ci, fmt_p, metric_label

#: How the metric-level decision reads (``tables/metrics.csv`` column ``decision``).
METRIC_DECISIONS = {"supported": "better than random rankings", "not_distinguishable": "not distinguishable",
                    "below_half_ceiling": "< ½ of the ceiling", "cannot_tell": "cannot tell"}


def metric_table(metrics: pd.DataFrame | None, model: str) -> Table | None:
    """One row per metric: the pooled one-sided relabeling test, Holm over the metrics, the pooled share of the
    ceiling with its document-bootstrap interval, and the decision."""
    if metrics is None or metrics.empty:
        return None
    rows = [[metric_label(str(r["metric"])), str(int(r["n_layers"])), fmt(r["pooled_z"], 2), fmt_p(r["p_metric"]),
             fmt_p(r["p_metric_holm"], mark=False),
             fmt_d_ci(r["ceiling_share"], r["ceiling_share_low"], r["ceiling_share_high"]),
             METRIC_DECISIONS.get(str(r["decision"]), str(r["decision"]))] for _, r in metrics.iterrows()]
    return Table(f"{model}: does the metric rank experts better than random rankings? (the decision)",
                 ["metric", "layers", "pooled z", "p_metric", "p (Holm)", "share of ceiling [95%]", "decision"],
                 rows, notes="Pooled one-sided relabeling test over the layers (T = Σ z_l, z_l the layer's d "
                             "standardised by its random rankings; null from independent relabelings per layer), "
                             "Holm over the metrics at α = 0.05. Share of ceiling: at informative layers, d / d of the "
                             "cross-fitted causal ranking, document-bootstrap 95% interval; '< ½ of the ceiling': "
                             "not better than random and the interval's upper end below ½. tables/metrics.csv.")


def layer_table(audit: pd.DataFrame | None, control: pd.DataFrame | None, model: str) -> Table | None:
    """One row per layer: informative or not, the causal ceiling, random rankings' 95% band of d, the cells with
    E[D] > 0 and the best metric's percentile among random rankings, and the routing-weight control."""
    if audit is None or audit.empty:
        return None
    ctrl = control.set_index("layer") if control is not None and len(control) else pd.DataFrame()
    rows = []
    for layer, g in audit.groupby("layer", sort=True):
        r = g.iloc[0]
        informative = r.get("layer_informative", math.nan)
        best = g.loc[g["d_perm_pct"].idxmax()] if "d_perm_pct" in g and g["d_perm_pct"].notna().any() else None
        row = [f"L{layer}", "n/a" if pd.isna(informative) else ("yes" if bool(informative) else "no"),
               fmt_d_ci(r.get("d_ceiling", math.nan), r.get("d_ceiling_low", math.nan),
                        r.get("d_ceiling_high", math.nan)),
               fmt_ci(r.get("d_perm_low", math.nan), r.get("d_perm_high", math.nan)),
               f"{int(g['significant'].astype(bool).sum())} of {len(g)}",
               f"{metric_label(str(best['metric']))} ({best['d_perm_pct']:.0f}%)" if best is not None else "n/a"]
        if layer in ctrl.index:
            c = ctrl.loc[layer]
            row += [fmt_d_ci(c["cohens_d"], c["ci_low"], c["ci_high"]),
                    DECISION_LABELS.get(str(c["decision"]), str(c["decision"]))]
        else:
            row += ["n/a", ""]
        rows.append(row)
    return Table(f"{model}: per layer", ["layer", "informative", "ceiling d [range]", "d, random rankings (95%)",
                                        "cells E[D] > 0", "best metric (percentile)", "control d [95% CI]",
                                        "control"], rows,
                 notes="Informative: the causal ceiling (experts ranked by their mean ΔL on half of the documents, "
                       "scored on the other half) lies above the 97.5% point of d under random rankings; elsewhere "
                       "no static ranking can be told from a random one at this n. Cells E[D] > 0: the one-sided "
                       "document-level test of the mean, Holm over the model's cells, at a measured level that "
                       "holds .05. Percentile: the best metric's d among random rankings of the layer's experts. "
                       "Every cell, with all its tests, is in report-details.md and tables/audit.csv.")

