"""Summaries of the progressive ablation: per arm the distribution of ΔL at each depth k, and the paired
comparison of the arms (highest- vs lowest-weight first vs random order) at the same positions.

The comparison turns "the selection criterion does not matter" into a tested claim. Per model x layer x k and
pair of arms (a, b): D = ΔL_a − ΔL_b at each position where both removed k experts. Estimand: E[D], the mean over
positions sampled uniformly from the corpus. Unit of inference: the document (positions of one document share
their context), so the tests are the document-level sign-flip test of E[D] = 0
(:func:`moeaudit.stats.sign_flip_test`) and the TOST of |E[D]| < sesoi nats with a document-clustered standard
error (:func:`moeaudit.stats.tost_mean`); both families of p-values are Holm-corrected over the model's
comparisons. A cell is "equivalent" only where the corrected TOST rejects, "differs" where the corrected
difference test rejects, and "inconclusive" where neither does.

The margin scales with the layer: mean ΔL runs from about 0 to several nats over a model's layers and depths, so a
fixed margin in nats says nothing at a layer where removing the experts costs less than the margin itself, and is
needlessly strict where it costs nats. Per (layer, k) the margin is min(``sesoi`` nats, ``sesoi_rel`` × |scale|),
scale = the mean ΔL at that layer and depth averaged over the arms run (column ``scale``): "equivalent" then means
within ``sesoi`` nats *and* within ``sesoi_rel`` (10 %) of what removing k experts costs there. The scale is
estimated from the same positions (a data-dependent margin; the TOST treats it as fixed, an approximation stated in
the report).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from moeaudit import stats
from moeaudit.config import PROGRESSIVE_ARMS, PROGRESSIVE_SESOI
from moeaudit.experiments._records import progressive_arms

ALPHA = 0.05
#: Pairs compared, in this order (a, b): D = ΔL_a − ΔL_b.
ARM_PAIRS: tuple[tuple[str, str], ...] = (("highest", "lowest"), ("highest", "random"), ("lowest", "random"))
DECISIONS = ("differs", "equivalent", "differs, within bounds", "inconclusive")
#: The margin's share of the layer's mean ΔL at k (see the module docstring).
PROGRESSIVE_SESOI_REL = 0.10


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


def arm_comparisons(records: pd.DataFrame, *, sesoi: float = PROGRESSIVE_SESOI,
                    sesoi_rel: float = PROGRESSIVE_SESOI_REL, alpha: float = ALPHA,
                    seed_for: Callable[..., Any] | None = None,
                    n_perm_for: Callable[[int], int] | None = None) -> pd.DataFrame:
    """Per model x layer x k x pair of arms: the paired comparison on D = ΔL_a − ΔL_b, Holm-corrected over the
    model's comparisons, with a decision (see the module docstring).

    Per comparison: mean D with its CR1 interval (:func:`stats.clustered_mean`), d_z, the document-level sign-flip
    p-value of E[D] = 0 (:func:`stats.sign_flip_test`, ``p_cluster``) and the TOST p-value of |E[D]| < ``sesoi``
    nats (:func:`stats.tost_mean`, ``tost_p``), where the margin ``sesoi`` of the row is min(``sesoi``,
    ``sesoi_rel`` × |``scale``|) and ``scale`` the mean ΔL at (layer, k) over the arms run.

    Args:
        records: The record table.
        sesoi: Largest equivalence bound, in nats of mean ΔL (``sesoi_cap`` column).
        sesoi_rel: The bound's largest share of the layer's mean ΔL at k (``sesoi_rel`` column).
        alpha: Family-wise error rate of each family (difference tests; equivalence tests).
        seed_for: ``(model, layer, k, arm_a, arm_b) -> seed`` of a comparison's sign vectors (the summary derives
            it from the run's seed); default 0 for every comparison.
        n_perm_for: ``m -> sign vectors`` for a model with m comparisons (the summary raises them with m so Holm
            can still reject); default :data:`moeaudit.stats.N_PERM`.

    Returns:
        Columns ``model, layer, k, arm_a, arm_b, n, n_docs, mean_a, mean_b, mean_diff, ci_low, ci_high,
        cohens_d, p_cluster, p_holm, significant, scale, sesoi (the row's margin, nats), sesoi_cap, sesoi_rel,
        tost_p, tost_p_holm, equivalent, decision, n_perm, n_layers``; empty when fewer than two arms were run.
    """
    sub = _with_arm(records)
    if sub.empty or sub["arm"].nunique() < 2:
        return pd.DataFrame()
    wide = sub.pivot_table(index=["model", "layer", "k", "seq_id", "position"], columns="arm", values="delta",
                           aggfunc="first")
    n_layers = sub.groupby("model")["n_layers"].first()
    scales = sub.groupby(["model", "layer", "k", "arm"])["delta"].mean().groupby(level=["model", "layer", "k"]).mean()
    cells = []
    for (model, layer, k), cell in wide.groupby(level=["model", "layer", "k"], sort=True):
        for a, b in ARM_PAIRS:
            if a not in cell.columns or b not in cell.columns:
                continue
            pair = cell[[a, b]].dropna()
            docs = pair.index.get_level_values("seq_id").to_numpy()
            if len(pair) >= 3 and len(np.unique(docs)) >= 2:
                cells.append((model, int(layer), int(k), a, b, pair[a].to_numpy(), pair[b].to_numpy(), docs))
    if not cells:
        return pd.DataFrame()
    m_by_model = pd.Series([c[0] for c in cells]).value_counts()
    rows = []
    for model, layer, k, a, b, delta_a, delta_b, docs in cells:
        diff = delta_a - delta_b
        n_perm = n_perm_for(int(m_by_model[model])) if n_perm_for else stats.N_PERM
        cm = stats.clustered_mean(diff, docs)
        sd = float(np.std(diff, ddof=1))
        scale = float(scales.loc[(model, layer, k)])
        margin = min(float(sesoi), float(sesoi_rel) * abs(scale))
        rows.append({
            "model": model, "layer": layer, "k": k, "arm_a": a, "arm_b": b, "n": int(diff.size),
            "n_docs": cm.n_clusters, "mean_a": float(delta_a.mean()), "mean_b": float(delta_b.mean()),
            "mean_diff": cm.estimate, "ci_low": cm.ci_low, "ci_high": cm.ci_high,
            "cohens_d": cm.estimate / sd if np.ptp(diff) > 0 else math.nan,
            "p_cluster": stats.sign_flip_test(diff, docs, n_perm=n_perm,
                                              seed=seed_for(model, layer, k, a, b) if seed_for else 0),
            "scale": scale, "sesoi": margin, "sesoi_cap": float(sesoi), "sesoi_rel": float(sesoi_rel),
            "tost_p": stats.tost_mean(diff, docs, sesoi=margin).p if margin > 0 else 1.0, "n_perm": n_perm,
            "n_layers": int(n_layers[model])})
    frame = pd.DataFrame(rows)
    parts = []
    for _, per_model in frame.groupby("model", sort=False):
        per_model = per_model.copy()
        diff = stats.correct(per_model["p_cluster"].to_numpy(), "holm", alpha)
        equiv = stats.correct(per_model["tost_p"].to_numpy(), "holm", alpha)
        per_model["p_holm"], per_model["significant"] = diff.p_corrected, diff.reject
        per_model["tost_p_holm"], per_model["equivalent"] = equiv.p_corrected, equiv.reject
        parts.append(per_model)
    frame = pd.concat(parts, ignore_index=True)
    frame["decision"] = [
        ("differs, within bounds" if eq else "differs") if sig else ("equivalent" if eq else "inconclusive")
        for sig, eq in zip(frame["significant"], frame["equivalent"])]
    columns = ["model", "layer", "k", "arm_a", "arm_b", "n", "n_docs", "mean_a", "mean_b", "mean_diff", "ci_low",
               "ci_high", "cohens_d", "p_cluster", "p_holm", "significant", "scale", "sesoi", "sesoi_cap", "sesoi_rel",
               "tost_p", "tost_p_holm",
               "equivalent", "decision", "n_perm", "n_layers"]
    return frame[columns]


def margin_rule(arms: pd.DataFrame) -> str:
    """How the arms' equivalence margin was set (per layer and k, or one fixed margin for older tables)."""
    if "sesoi_rel" not in arms:
        return f"±{float(arms['sesoi'].iloc[0]):g} nats at every layer"
    return (f"min(±{float(arms['sesoi_cap'].iloc[0]):g} nats, {100 * float(arms['sesoi_rel'].iloc[0]):g}% of the "
            "layer's mean ΔL at that k over the orders), per layer and k (the scale is estimated from the same "
            "positions and treated as fixed)")
