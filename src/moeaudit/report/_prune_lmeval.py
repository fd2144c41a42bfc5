"""The lm-eval part of the prune-eval report, rebuilt from ``lm_eval_answer.csv`` (paired item-level statistics,
see :mod:`moeaudit.pruning._lmeval_stats`): a table per task metric and the downstream clause of each
recommendation sentence."""

from __future__ import annotations

import numpy as np
import pandas as pd

from moeaudit.report._document import Table
from moeaudit.report._style import metric_label
from moeaudit.report._tables import fmt, fmt_ci


def downstream_clause(row: pd.Series) -> str:
    """``"; downstream: tiny_mc acc 0.750 (against the causal reference: inconclusive; against random: better)"``
    from the lm-eval columns that ``answer.csv`` carries (``lm_eval:<task>:<metric>`` and its
    decisions); empty when there are none."""
    parts = []
    for column in row.index:
        if not column.startswith("lm_eval:") or column.count(":") != 2 or not np.isfinite(row[column]):
            continue
        _, task, metric = column.split(":")
        what = "mean item log-likelihood" if metric == "perplexity" else metric  # lm-eval's per-item value
        causal, rand = row.get(column + ":decision_causal"), row.get(column + ":decision_random")
        against = [f"against the causal reference: {causal}"] if isinstance(causal, str) else []
        against += [f"against random: {rand}"] if isinstance(rand, str) and rand != "n/a" else []
        parts.append(f"{task} {what} {row[column]:.3f}" + (f" ({'; '.join(against)})" if against else ""))
    return ("; downstream: " + ", ".join(parts)) if parts else ""


def lm_answer_table(lm: pd.DataFrame, label: str) -> Table:
    """One row per (task, metric, criterion, fraction, allocation, method) of ``lm_eval_answer.csv``."""
    rows = []
    for _, r in lm.iterrows():
        rows.append([r["task"], r["metric"], metric_label(r["criterion"]), f"{r['fraction']:g}",
                     str(r["allocation"]) if isinstance(r["allocation"], str) else "", f"{r['score']:.4g}",
                     fmt(r["delta_unpruned"]), fmt_ci(r["delta_unpruned_low"], r["delta_unpruned_high"]),
                     fmt(r["delta_causal"]), fmt_ci(r["delta_causal_low"], r["delta_causal_high"]),
                     str(r["decision_causal"]) if isinstance(r["decision_causal"], str) else "",
                     fmt(r["share_random_better"]), str(r["decision_random"])
                     if isinstance(r["decision_random"], str) else ""])
    return Table(f"{label}: downstream scores, paired item by item",
                 ["task", "metric", "criterion", "f", "allocation", "score", "δ unpruned", "95% CI", "δ causal",
                  "95% CI", "vs causal", "share random ≥", "vs random"], rows, align_left=5,
                 notes="score: mean over items of each item's value (averaged over the folds' pruned models; for "
                       "metrics lm-eval aggregates as a perplexity, the item's log-likelihood, higher is better). "
                       "δ: paired item differences (bootstrap over items; decisions need the paired t and the item "
                       "sign-flip test, the exact McNemar test on 0/1 items, Holm-corrected). share random ≥: the "
                       "share of random prunings scoring at least as well (interval and test in "
                       "lm_eval_answer.csv). Per-item values: lm_eval_items/<task>.parquet.")
