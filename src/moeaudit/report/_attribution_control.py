"""Report section of the attribution control (``experiments=`` with ``attribution``): per layer, Definition 2.1 with
each token's active experts ranked by the attribution estimate beside the routing-weight control, and the paired
comparison of the two rankings at the same positions (:mod:`moeaudit.experiments._attribution_control`)."""

from __future__ import annotations

import pandas as pd

from moeaudit.experiments._attribution_control import answer_sentence
from moeaudit.report._document import Block, Paragraph, Table
from moeaudit.report._tables import fmt, fmt_d_ci, fmt_nats, fmt_p


def attribution_control_blocks(tables: dict[str, pd.DataFrame], model: str) -> list[Block]:
    """The table (one row per layer) and one answer sentence per layer; nothing when the run has no attribution
    records."""
    vs = tables.get("attribution_vs_control")
    attr = tables.get("attribution_control")
    if vs is None or vs.empty or attr is None or attr.empty:
        return []
    control = tables.get("control", pd.DataFrame()).set_index("layer") if len(tables.get("control", [])) else None
    attr = attr.set_index("layer")
    rows = []
    for r in vs.sort_values("layer").to_dict("records"):
        layer = r["layer"]
        a = attr.loc[layer] if layer in attr.index else None
        c = control.loc[layer] if control is not None and layer in control.index else None
        rows.append([f"L{layer}", str(r["mode"]), str(int(r["n"])), str(int(r["n_docs"])),
                     fmt_d_ci(a["cohens_d"], a["ci_low"], a["ci_high"]) if a is not None else "—",
                     str(a["decision"]) if a is not None and "decision" in a else "—",
                     fmt_d_ci(c["cohens_d"], c["ci_low"], c["ci_high"]) if c is not None else "—",
                     fmt_nats(r["mean_d_attr"]), fmt_nats(r["mean_d_control"]),
                     f"{fmt_nats(r['attr_minus_control'])} [{fmt_nats(r['attr_minus_control_low'])}, "
                     f"{fmt_nats(r['attr_minus_control_high'])}]",
                     fmt_p(r["p_signflip"], mark=False), fmt(100 * r["same_high"], 1), str(r["answer"])])
    table = Table(
        f"{model}: attribution control (per-token attribution estimate as the ranking, beside the routing weight)",
        ["layer", "mode", "n", "docs", "d_attr [95% CI]", "decision", "d_control [95% CI]", "mean D_attr",
         "mean D_control", "D_attr − D_control, nats [95% CI]", "p_flip", "% same high", "better ranking"],
        rows,
        notes=("At the control's positions, the active experts are ranked by the first-order attribution estimate "
               "of their ΔL (g·δy, own-loss gradient, the run's ablation mode) and D_attr = ΔL(highest estimate) − "
               "ΔL(lowest estimate), with the exact ΔL of the single-expert pool (no extra ablation). d_attr and its "
               "decision: the routing-weight control's tests and rule. D_attr − D_control: mean over the same "
               "positions (estimand in nats; unit of inference the document: two-sided sign-flip test of whole "
               "documents, 95% document-bootstrap interval). Better ranking: the direction when p_flip < .05 / "
               "layers, else 'cannot tell'. It compares how far apart the two rankings' chosen experts are in ΔL on "
               "average at these positions, not which ranking is right at every token."))
    sentences = " ".join(answer_sentence(r) for r in vs.sort_values("layer").to_dict("records"))
    return [table, Paragraph(f"**Does the gradient pick the costlier active expert better than the router's "
                             f"weight?** {sentences}")]
