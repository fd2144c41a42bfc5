"""Sections of the prune-eval report on what lies beyond deletion: mean replacement against deletion, the super
experts (and which were protected), and the parameters and bytes each pruning removes."""

from __future__ import annotations

import pandas as pd

from moeaudit.report._document import Block, Heading, Paragraph, Table
from moeaudit.report._style import metric_label
from moeaudit.report._tables import fmt, fmt_ci, fmt_p
from moeaudit.rundir import RunDirectory


def _csv(run_dir: RunDirectory, name: str) -> pd.DataFrame | None:
    path = run_dir.path / name
    try:
        return pd.read_csv(path) if path.is_file() else None
    except pd.errors.EmptyDataError:
        return None


def first_method(prune: pd.DataFrame | None, config: dict) -> str | None:
    """The method the report's main sections show: the run's first (``delete`` for runs before methods)."""
    methods = config.get("method") or ["delete"]
    return methods[0] if prune is not None and "method" in prune.columns else None


def only_method(table: pd.DataFrame | None, method: str | None) -> pd.DataFrame | None:
    """``table``'s rows of ``method`` (and the unpruned model's); unchanged without a method column."""
    if table is None or method is None or "method" not in table.columns:
        return table
    keep = (table["method"] == method) | (table.get("criterion") == "none")
    return table[keep].reset_index(drop=True)


def extra_blocks(run_dir: RunDirectory, label: str, alpha: float) -> list[Block]:
    blocks: list[Block] = []
    methods = _csv(run_dir, "methods.csv")
    if methods is not None and len(methods):
        rows = [[metric_label(r["criterion"]), f"{r['fraction']:g}", str(r.get("allocation", "uniform")),
                 fmt(r["loss_delete"]), fmt(r["loss_mean"]),
                 fmt(r["delta_mean"]), fmt_ci(r["ci_low"], r["ci_high"]), fmt_p(r["p_t_holm"], False),
                 fmt_p(r["p_signflip_holm"], False), str(r["decision"])] for _, r in methods.iterrows()]
        better = int((methods["decision"] == "mean better").sum())
        worse = int((methods["decision"] == "delete better").sum())
        blocks += [Heading("Mean replacement against deletion"), Paragraph(
            f"Replacing each removed expert by its calibration mean (it keeps its router slot; MoNE's constant) "
            f"instead of deleting it: lower held-out loss in {better} of {len(methods)} (criterion, fraction) "
            f"pairs, higher in {worse}, the rest inconclusive (both document-level tests, Holm, α = {alpha:g}; "
            f"pooled over the cross-fitting folds, c_e computed on each fold's calibration split)."),
            Table(f"{label}: mean replacement minus deletion of the same experts",
                  ["criterion", "f", "allocation", "loss delete", "loss mean", "δ", "95% CI", "p_t", "p_flip",
                   "decision"], rows, align_left=3, notes="δ = token-weighted mean loss (mean-replaced) − (deleted), nats; negative "
                  "favours mean replacement. random: the seeds' mean per-token loss under each method. Unit of "
                  "inference: the evaluation document. The main sections above show the run's first method.")]
    supers = _csv(run_dir, "super_experts.csv")
    if supers is not None and len(supers):
        has_fold = "fold" in supers.columns
        rows = [[*([str(int(r["fold"]))] if has_fold else []), str(int(r["rank"])), str(int(r["layer"])),
                 str(int(r["expert"])), fmt(r["removal_cost"]),
                 fmt(r["routed_share"]), fmt(r["mean_delta"]), "yes" if r["protected"] else ""]
                for _, r in supers.iterrows()]
        first = supers[supers["fold"] == supers["fold"].min()] if has_fold else supers
        n_protected = int(first["protected"].sum())
        blocks += [Heading("Super experts"), Paragraph(
            "The experts whose single removal costs most on the calibration split"
            + (" of fold " + str(int(first["fold"].iloc[0])) if has_fold else "") + ": "
            + ", ".join(f"L{int(r['layer'])} E{int(r['expert'])} ({float(r['removal_cost']):+.3g} nats)"
                        for _, r in first.head(3).iterrows())
            + (f". The top {n_protected} of each fold were protected from that fold's prunings (--protect-top)."
               if n_protected else ". None was protected (--protect-top 0).")),
            Table(f"{label}: experts by single-removal cost",
                  [*(["fold"] if has_fold else []), "rank", "layer", "expert", "removal cost", "routed share",
                   "mean ΔL when routed", "protected"],
                  rows, align_left=3 + has_fold, notes="removal cost: mean loss increase over every sampled calibration "
                  "position of the layer when the expert alone is removed (0 where it is not routed) = routed "
                  "share × mean ΔL when routed, from the importance map (its ablation mode).")]
    sizes = _csv(run_dir, "sizes.csv")
    if sizes is not None and len(sizes):
        rows = [[str(r["method"]), f"{r['fraction']:g}", str(int(r["experts_removed"])),
                 f"{int(r['params_removed']):,}", f"{int(r['bytes_removed']):,}",
                 f"{100 * float(r['share_params_removed']):.1f}%"] for _, r in sizes.iterrows()]
        blocks += [Heading("What pruning saves"), Table(
            f"{label}: parameters and bytes removed", ["method", "f", "experts removed", "parameters", "bytes",
                                                       "share of the model"], rows, align_left=2,
            notes="From the shapes of the tensors a sliced checkpoint drops (router rows and every expert-indexed "
                  "tensor of the fused experts); mean replacement keeps the router rows and adds one d_model "
                  "constant per replaced expert. Bytes in the run's dtype.")]
    return blocks
