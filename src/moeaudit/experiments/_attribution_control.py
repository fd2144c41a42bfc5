"""The attribution control: Definition 2.1 within a token with the first-order attribution estimate of each active
expert's ΔL (:func:`moeaudit.attribute`, in the run's ablation mode) in place of the routing weight, and the paired
question "does the estimate pick the costlier active expert better than the router's weight does?".

No extra ablation: at every position of a layer's single-expert cell the pool already ablates every active expert
alone (experiment ``pool``), so the ΔL of the highest- and the lowest-estimate expert are the pool's exact ΔL. The
records (experiment :data:`ATTRIBUTION`, metric ``attribution_<mode>``, roles ``high`` / ``low``,
``metric_values`` = the estimates of the active experts in router order) sit at exactly the control's positions.

Estimands (per model x layer):

* ``tables["attribution_control"]``: like the routing-weight control, D_attr = ΔL(highest estimate) −
  ΔL(lowest estimate) per position; the same document-clustered paired tests and decision.
* ``tables["attribution_vs_control"]`` (:func:`attribution_vs_control`): δ = mean over positions of
  D_attr − D_control (D_control = ΔL(highest weight) − ΔL(lowest weight) at the same position), in nats; unit of
  inference: the document (two-sided sign-flip test of whole documents' summed differences, CR1 t, document
  bootstrap interval; :func:`moeaudit.stats.clustered_difference`). δ > 0: ranking by the estimate separates the
  costlier from the cheaper active expert by more nats than ranking by the weight.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch import nn

from moeaudit.intervene._attribution import estimates, own_loss_gradients
from moeaudit.intervene._state import clean_state
from moeaudit.stats import clustered_difference

#: Record experiment of the attribution control.
ATTRIBUTION = "attribution"
#: Columns of ``tables["attribution_vs_control"]``.
VS_CONTROL_COLUMNS: tuple[str, ...] = (
    "model", "layer", "mode", "n", "n_docs", "mean_d_attr", "mean_d_control", "attr_minus_control",
    "attr_minus_control_low", "attr_minus_control_high", "p_t", "p_signflip", "same_pair", "same_high",
    "answer")
#: Level of the paired test's answer sentence (one test per layer: Bonferroni over the model's layers).
ALPHA = 0.05


def attribution_metric(mode: str) -> str:
    """The record ``metric`` of the attribution control in ablation mode ``mode``."""
    return f"{ATTRIBUTION}_{mode}"


def token_estimates(model: nn.Module, state, input_ids: torch.Tensor, layer: int, mode: str,
                    positions) -> dict[int, np.ndarray]:
    """``{position: [top_k] float64}``: the attribution estimate ``g_t · δy_t`` of the expert in every routing slot
    at ``positions`` of ``layer`` (:func:`moeaudit.intervene._attribution.estimates`; own-loss gradients of those
    positions only), from ``state`` when it holds the clean keys/values, else from a fresh clean pass that keeps
    them."""
    positions = [int(p) for p in positions]
    if state is None or state.cache is None or layer not in state.moe:
        state = clean_state(model, input_ids, layers=[layer], keep_cache=True)
    grads = own_loss_gradients(model, state, [layer], positions=positions)
    values = estimates(model, state, layer, grads[layer], (mode,), positions=positions)[mode]
    return dict(zip(positions, values))


def _pairs(records: pd.DataFrame, experiment: str) -> pd.DataFrame:
    sub = records[records["experiment"] == experiment]
    pivot = sub.pivot_table(index=["model", "layer", "seq_id", "position"], columns="role", values="delta",
                            aggfunc="first")
    experts = sub.pivot_table(index=["model", "layer", "seq_id", "position"], columns="role",
                              values="ablated_experts", aggfunc=lambda s: int(s.iloc[0][0]))
    if not {"high", "low"} <= set(pivot.columns):
        return pd.DataFrame(columns=["d", "high_expert", "low_expert"])
    return pd.DataFrame({"d": pivot["high"] - pivot["low"], "high_expert": experts["high"],
                         "low_expert": experts["low"]})


def attribution_vs_control(records: pd.DataFrame, *, n_perm: int = 9999, n_boot: int = 2000,
                           seed: int | None = 0) -> pd.DataFrame:
    r"""Per (model, layer): does ranking a token's active experts by the attribution estimate pick the costlier one
    better than ranking them by routing weight?

    Estimand: :math:`\delta = \frac1N\sum_i (D^{attr}_i - D^{ctrl}_i)`, nats, over the N positions holding both
    the attribution and the control records (the same positions by construction), where
    :math:`D^{attr}_i = \Delta L_i(\arg\max_e \hat{\Delta L}_{i,e}) - \Delta L_i(\arg\min_e \hat{\Delta L}_{i,e})` and
    :math:`D^{ctrl}_i` the same with the routing weight. Unit of inference: the document
    (:func:`moeaudit.stats.clustered_difference`: two-sided sign-flip test ``p_signflip`` of whole documents,
    CR1 t ``p_t``, document-bootstrap interval). ``same_pair`` / ``same_high``: share of positions where both
    rankings pick the same (high, low) pair / the same high expert (there D_attr − D_control is 0).
    ``answer``: ``estimate``, ``weight`` (p_signflip below ALPHA / layers of the model, in that direction) or
    ``cannot tell``; it is a statement about these positions' mean nats, not about every token.

    Reference: Kramár et al. (2024), AtP*; the control is the seed paper's routing-weight control.
    """
    attr, ctrl = _pairs(records, ATTRIBUTION), _pairs(records, "control")
    modes = records[records["experiment"] == ATTRIBUTION].groupby(["model", "layer"])["mode"].first()
    joined = attr.join(ctrl, how="inner", suffixes=("_attr", "_control")).dropna(subset=["d_attr",
                                                                                             "d_control"])
    rows = []
    for (model, layer), part in joined.groupby(level=["model", "layer"], sort=True):
        docs = part.index.get_level_values("seq_id").to_numpy()
        a, c = part["d_attr"].to_numpy(float), part["d_control"].to_numpy(float)
        row = {"model": model, "layer": int(layer), "mode": modes.get((model, layer), ""), "n": len(part),
               "n_docs": int(np.unique(docs).size), "mean_d_attr": float(a.mean()),
               "mean_d_control": float(c.mean()),
               "same_pair": float(np.mean((part["high_expert_attr"] == part["high_expert_control"])
                                          & (part["low_expert_attr"] == part["low_expert_control"]))),
               "same_high": float(np.mean(part["high_expert_attr"] == part["high_expert_control"]))}
        if len(part) >= 2 and row["n_docs"] >= 2:
            diff = clustered_difference(a, c, docs, n_perm=n_perm, n_boot=n_boot,
                                        seed=None if seed is None else [int(seed), int(layer), 19])
            row.update(attr_minus_control=diff.estimate, attr_minus_control_low=diff.ci_low,
                       attr_minus_control_high=diff.ci_high, p_t=diff.p_t, p_signflip=diff.p_signflip)
        rows.append(row)
    table = pd.DataFrame(rows).reindex(columns=list(VS_CONTROL_COLUMNS))
    if table.empty:
        return table
    m = table.groupby("model")["layer"].transform("size").to_numpy()
    table["answer"] = [_answer(r, k) for r, k in zip(table.to_dict("records"), m)]
    return table


def _answer(row: dict, m_layers: int) -> str:
    p, est = row.get("p_signflip"), row.get("attr_minus_control")
    if p is None or est is None or not (math.isfinite(p) and math.isfinite(est)) or p >= ALPHA / m_layers:
        return "cannot tell"
    return "estimate" if est > 0 else "weight"


def answer_sentence(row: dict) -> str:
    """One sentence on a row of :func:`attribution_vs_control` that says no more than its test."""
    where = f"layer {row['layer']}"
    numbers = (f"mean D_attr − D_control = {row['attr_minus_control']:+.4f} nats "
               f"[{row['attr_minus_control_low']:+.4f}, {row['attr_minus_control_high']:+.4f}], "
               f"document sign-flip p = {row['p_signflip']:.3g}, {row['n']} positions in {row['n_docs']} documents")
    if not math.isfinite(row.get("p_signflip", math.nan)):
        return f"{where}: this run cannot tell whether the estimate or the weight picks the costlier expert " \
               f"({row['n']} positions in {row['n_docs']} documents)."
    if row["answer"] == "estimate":
        return f"{where}: on these positions, ranking by the attribution estimate separates the costlier from the " \
               f"cheaper active expert by more than ranking by routing weight ({numbers})."
    if row["answer"] == "weight":
        return f"{where}: on these positions, ranking by routing weight separates the costlier from the cheaper " \
               f"active expert by more than the attribution estimate ({numbers})."
    return f"{where}: this run cannot tell the estimate and the weight apart ({numbers})."
