"""Summaries of the progressive ablation: per arm the distribution of ΔL at each depth k, and the paired
comparison of the arms (highest- vs lowest-weight first vs random order) at the same positions.

The comparison turns "the selection criterion does not matter" into a tested claim. Per model x layer x k and
pair of arms (a, b): D = ΔL_a − ΔL_b at each position where both removed k experts. Estimand: E[D], the mean over
positions sampled uniformly from the corpus. Unit of inference: the document (positions of one document share
their context), so the tests are the document-level sign-flip test of E[D] = 0 and its TOST against ±sesoi nats
(:func:`moeaudit.stats.paired_equivalence`); both families of p-values are Holm-corrected over the model's
comparisons. A cell is "equivalent" only where the corrected TOST rejects, "differs" where the corrected
difference test rejects, and "inconclusive" where neither does.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from moeaudit import stats
from moeaudit.config import PROGRESSIVE_ARMS, PROGRESSIVE_SESOI
from moeaudit.experiments._records import progressive_arms

ALPHA = 0.05
#: Pairs compared, in this order (a, b): D = ΔL_a − ΔL_b.
ARM_PAIRS: tuple[tuple[str, str], ...] = (("highest", "lowest"), ("highest", "random"), ("lowest", "random"))
DECISIONS = ("differs", "equivalent", "differs, within bounds", "inconclusive")


def _with_arm(records: pd.DataFrame) -> pd.DataFrame:
    sub = records[records["experiment"] == "progressive"]
    return sub.assign(arm=progressive_arms(sub["role"])) if len(sub) else sub.assign(arm=pd.Series(dtype=object))


def _arm_key(arm: str) -> int:
    return PROGRESSIVE_ARMS.index(arm) if arm in PROGRESSIVE_ARMS else len(PROGRESSIVE_ARMS)


def progressive_cells(records: pd.DataFrame) -> pd.DataFrame:
    """Per model x layer x arm x k: n positions, n documents, mean ΔL with its document-clustered 95% interval
    (CR1, t with G−1 df), median and P95."""
    sub = _with_arm(records)
    if sub.empty:
        return pd.DataFrame()
    rows = []
    for (model, layer, arm, k), g in sub.groupby(["model", "layer", "arm", "k"], sort=False):
        delta = g["delta"].to_numpy(dtype=float)
        docs = g["seq_id"].to_numpy()
        if len(delta) >= 2 and len(np.unique(docs)) >= 2:
            cm = stats.clustered_mean(delta, docs)
            low, high = cm.ci_low, cm.ci_high
        else:
            low = high = math.nan
        rows.append({"model": model, "layer": int(layer), "arm": arm, "k": int(k), "n": len(delta),
                     "n_docs": int(len(np.unique(docs))), "mean": float(delta.mean()), "ci_low": low,
                     "ci_high": high, "median": float(np.median(delta)), "p95": float(np.percentile(delta, 95)),
                     "n_layers": int(g["n_layers"].iloc[0])})
    frame = pd.DataFrame(rows)
    order = frame.assign(_arm=frame["arm"].map(_arm_key)).sort_values(["model", "layer", "_arm", "k"], kind="stable")
    return order.drop(columns="_arm").reset_index(drop=True)


def arm_comparisons(records: pd.DataFrame, *, sesoi: float = PROGRESSIVE_SESOI, alpha: float = ALPHA,
                    n_perm: int = 10000, seed: int = 0) -> pd.DataFrame:
    """Per model x layer x k x pair of arms: the paired comparison of :func:`stats.paired_equivalence` on
    D = ΔL_a − ΔL_b, Holm-corrected over the model's comparisons, with a decision (see the module docstring).

    The sign-flip tests draw at least 10 m / α sign vectors (m: the largest model's number of comparisons), so
    the smallest attainable p-value, 1 / (n_perm + 1), stays ten times below Holm's first threshold α / m.

    Returns:
        Columns ``model, layer, k, arm_a, arm_b, n, n_docs, mean_a, mean_b, mean_diff, ci_low, ci_high,
        cohens_d, p_signflip, p_holm, significant, sesoi, p_tost, p_tost_holm, equivalent, decision, n_layers``;
        empty when fewer than two arms were run.
    """
    sub = _with_arm(records)
    if sub.empty or sub["arm"].nunique() < 2:
        return pd.DataFrame()
    wide = sub.pivot_table(index=["model", "layer", "k", "seq_id", "position"], columns="arm", values="delta",
                           aggfunc="first")
    n_layers = sub.groupby("model")["n_layers"].first()
    cells = []
    for (model, layer, k), cell in wide.groupby(level=["model", "layer", "k"], sort=True):
        for a, b in ARM_PAIRS:
            if a not in cell.columns or b not in cell.columns:
                continue
            pair = cell[[a, b]].dropna()
            docs = pair.index.get_level_values("seq_id").to_numpy()
            if len(pair) >= 3 and len(np.unique(docs)) >= 2:
                cells.append((model, layer, k, a, b, pair, docs))
    per_model = pd.Series([c[0] for c in cells]).value_counts()
    draws = max(int(n_perm), int(math.ceil(10 * per_model.max() / alpha))) if len(cells) else int(n_perm)
    rows = []
    for model, layer, k, a, b, pair, docs in cells:
        test = stats.paired_equivalence(pair[a].to_numpy(), pair[b].to_numpy(), docs, sesoi=sesoi, n_perm=draws,
                                        seed=seed)
        rows.append({"model": model, "layer": int(layer), "k": int(k), "arm_a": a, "arm_b": b, "n": test.n,
                     "n_docs": test.n_clusters, "mean_a": test.mean_a, "mean_b": test.mean_b,
                     "mean_diff": test.mean_diff, "ci_low": test.ci_low, "ci_high": test.ci_high,
                     "cohens_d": test.cohens_d, "p_signflip": test.p_signflip, "sesoi": test.sesoi,
                     "p_tost": test.p_tost, "n_layers": int(n_layers[model])})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    parts = []
    for _, per_model in frame.groupby("model", sort=False):
        per_model = per_model.copy()
        diff = stats.correct(per_model["p_signflip"].to_numpy(), "holm", alpha)
        equiv = stats.correct(per_model["p_tost"].to_numpy(), "holm", alpha)
        per_model["p_holm"], per_model["significant"] = diff.p_corrected, diff.reject
        per_model["p_tost_holm"], per_model["equivalent"] = equiv.p_corrected, equiv.reject
        parts.append(per_model)
    frame = pd.concat(parts, ignore_index=True)
    frame["decision"] = [
        ("differs, within bounds" if eq else "differs") if sig else ("equivalent" if eq else "inconclusive")
        for sig, eq in zip(frame["significant"], frame["equivalent"])]
    columns = ["model", "layer", "k", "arm_a", "arm_b", "n", "n_docs", "mean_a", "mean_b", "mean_diff", "ci_low",
               "ci_high", "cohens_d", "p_signflip", "p_holm", "significant", "sesoi", "p_tost", "p_tost_holm",
               "equivalent", "decision", "n_layers"]
    return frame[columns]
