"""The report's Answer (at most five sentences, each from one test or one estimate with its interval) and the
scorecard figure (metric × layer: d's percentile among random rankings and its share of the causal ceiling)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from moeaudit.report._style import _figure, metric_label

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: How each metric decision reads in the Answer.
DECISION_LEADS: dict[str, str] = {
    "supported": "Ranks a layer's experts by causal importance better than random rankings (pooled one-sided "
                 "relabeling test over layers, Holm over metrics)",
    "not_distinguishable": "Not distinguishable from random rankings at this n (pooled relabeling test, Holm)",
    "below_half_ceiling": "Shown to capture less than half of the causal ceiling at the informative layers "
                          "(document-bootstrap 95% upper bound < 0.5) and not shown better than random",
    "cannot_tell": "This run cannot tell, because no layer's causal ceiling rises above the band of random "
                   "rankings",
}


def _num(x: float, fmt: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _metric_item(r) -> str:
    share = (f", {_num(r['ceiling_share'])} of the ceiling [{_num(r['ceiling_share_low'])}, "
             f"{_num(r['ceiling_share_high'])}]") if np.isfinite(r["ceiling_share"]) else ""
    return f"{metric_label(str(r['metric']))} (p = {_num(r['p_metric_holm'], '.2g')}{share})"


def answer_sentences(metrics: pd.DataFrame | None, audit: pd.DataFrame | None,
                     validation: dict | None = None) -> list[str]:
    """At most five sentences: one per metric decision present (the metrics it applies to, their Holm-adjusted
    pooled p and pooled share of the ceiling with its interval), then which layers are informative, then (from
    ``validate``) the probability that the causal ranking is found and ``n_needed``."""
    if metrics is None or metrics.empty:
        return []
    out = []
    for decision, lead in DECISION_LEADS.items():
        rows = metrics[metrics["decision"] == decision]
        if len(rows):
            out.append(f"{lead}: " + "; ".join(_metric_item(r) for _, r in rows.iterrows()) + ".")
    last = []
    if audit is not None and "layer_informative" in audit and len(audit):
        layers = audit.groupby("layer")["layer_informative"].first()
        informative = [int(x) for x, v in layers.items() if bool(v) is True]
        verb = "is" if len(informative) == 1 else "are"
        named = ": " + ", ".join(f"L{x}" for x in informative) if informative else ""
        last.append(f"{len(informative)} of {len(layers)} layers {verb} informative (the causal ranking's d above "
                    f"the 97.5% point of random rankings'{named}), elsewhere no static ranking can be told from a "
                    "random one at this n")
    if validation and "p_detect_ceiling" in validation:
        pooled = validation["p_detect_ceiling"].get("pooled", math.nan)
        n_half, n_full = validation.get("n_needed", math.nan), validation.get("n_needed_ceiling", math.nan)
        need = (f"about n = {n_half:,.0f} positions per layer would be needed for a metric capturing half of the "
                "ceiling" if n_half is not None and np.isfinite(n_half) else
                "no n makes a metric capturing half of the ceiling detectable (random rankings' own spread is as "
                "large)")
        if n_full is not None and np.isfinite(n_full):
            need += f", about n = {n_full:,.0f} for the causal ranking itself"
        n_run = int(audit["n"].median()) if audit is not None and len(audit) else 0
        last.append(f"at n = {n_run} even the causal ranking is found with probability {_num(pooled)} "
                    f"(`moeaudit validate`); {need}")
    if last:
        text = "; ".join(last)
        out.append(text[0].upper() + text[1:] + ".")
    return out[:5]


def scorecard_figure(audit: pd.DataFrame, label: str) -> Figure | None:
    """Metric × layer heat map of d's percentile among random rankings (d_perm_pct), each cell annotated with its
    share of the ceiling; uninformative layers hatched."""
    if audit is None or audit.empty or "d_perm_pct" not in audit or audit["d_perm_pct"].isna().all():
        return None
    pct = audit.pivot_table(index="metric", columns="layer", values="d_perm_pct", aggfunc="first", dropna=False)
    share = audit.pivot_table(index="metric", columns="layer", values="ceiling_share", aggfunc="first",
                              dropna=False).reindex(index=pct.index, columns=pct.columns)
    informative = audit.groupby("layer")["layer_informative"].first()
    fig = _figure(1.2 + 0.75 * pct.shape[1], 0.9 + 0.55 * pct.shape[0])
    ax = fig.subplots()
    image = ax.imshow(pct.to_numpy(dtype=float), cmap="RdBu_r", vmin=0, vmax=100, aspect="auto")
    for i in range(pct.shape[0]):
        for j, layer in enumerate(pct.columns):
            p, s = pct.iat[i, j], share.iat[i, j]
            text = f"{p:.0f}%" + (f"\n{s:.2f}" if np.isfinite(s) and bool(informative.get(layer, False)) else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=6.5)
    for j, layer in enumerate(pct.columns):
        if informative.get(layer) is not True and not bool(informative.get(layer, False)):
            ax.add_patch(_hatch(j, pct.shape[0]))
    ax.set_xticks(range(pct.shape[1]), [f"L{x}" for x in pct.columns], fontsize=7)
    ax.set_yticks(range(pct.shape[0]), [metric_label(m) for m in pct.index], fontsize=7)
    bar = fig.colorbar(image, ax=ax, fraction=0.04)
    bar.set_label("percentile among random rankings", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    ax.set_title(f"{label}: scorecard (hatched: uninformative layer)", fontsize=9)
    return fig


def _hatch(column: int, rows: int):
    from matplotlib.patches import Rectangle

    return Rectangle((column - 0.5, -0.5), 1, rows, fill=False, hatch="//", edgecolor="0.6", linewidth=0)
