"""A plain-language verdict per model, generated from the summary tables (nothing in it is fixed text about a
result: every number and every conclusion is read off the tables)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from moeaudit.experiments import DECISIONS, decision_counts, margin_rule
from moeaudit.report._style import arm_label
from moeaudit.report._tables import metric_label


def _p(r, column: str) -> str:
    """``p_x = 0.0014``, or ``p_x ≤ 0.0001`` at the smallest value the sign-flip draws can give."""
    name = {"p_cluster": "p_mean", "p_signrank_cluster": "p_rank"}.get(column, column)
    value, n_perm = r[column], r.get("n_perm", 0)
    if n_perm and value <= 1.0 / (n_perm + 1) * (1 + 1e-9):
        return f"{name} ≤ {value:.2g}"
    return f"{name} = {value:.2g}"


def _where(r) -> str:
    return f"{metric_label(r['metric'])} at L{r['layer']}" if "metric" in r.index else f"L{r['layer']}"


def _cell(r) -> str:
    return f"{_where(r)} (d = {r['cohens_d']:+.3f}, {_p(r, 'p_cluster')})"


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _pm(r) -> str:
    """The deciding test, its Holm p and its measured level at .05 with the level's 95% interval."""
    text = f"p_mean>0 (Holm) = {r['p_mean_greater_holm']:.2g}"
    if np.isfinite(r.get("mean_level", np.nan)):
        text += (f", measured level {r['mean_level']:.3f} [{r['mean_level_low']:.3f}, {r['mean_level_high']:.3f}]"
                 if np.isfinite(r.get("mean_level_low", np.nan)) else f", measured level {r['mean_level']:.3f}")
    return text


def _outcomes(table: pd.DataFrame, unit: str) -> str:
    """The sentences every paired family shares, one per outcome of Definition 2.1's one test (the one-sided
    document-level test of the mean, Holm), each naming that test or the estimate with its interval."""
    text = ""
    by = {k: table[table["decision"] == k] if "decision" in table else table.iloc[:0] for k in DECISIONS}
    if len(by["positive"]):
        text += ("E[D] > 0 (the higher-ranked expert costs more on average; one-sided document-level test of the "
                 "mean, Holm, at a measured level that holds .05) at "
                 + _join([f"{_where(r)} (d = {r['cohens_d']:+.3f}, {_pm(r)})" for _, r in by["positive"].iterrows()])
                 + ". ")
    if len(by["positive_level_not_held"]):
        text += ("The test of the mean rejects at the nominal level, but its measured level on the cell's own skewed "
                 "null is above .05, so E[D] > 0 is not claimed, at "
                 + _join([f"{_where(r)} (d = {r['cohens_d']:+.3f}, {_pm(r)})"
                          for _, r in by["positive_level_not_held"].iterrows()]) + ". ")
    if len(by["below_half_ceiling"]):
        text += ("Shown to capture less than half of the causal ceiling (95% upper bound of the share below ½) at "
                 + _join([f"{_where(r)} (share {r['ceiling_share']:+.2f} [{r['ceiling_share_low']:+.2f}, "
                          f"{r['ceiling_share_high']:+.2f}])" for _, r in by["below_half_ceiling"].iterrows()])
                 + ". ")
    if len(by["cannot_tell"]):
        layers = sorted(set(by["cannot_tell"]["layer"]))
        text += (f"At {_join([f'L{x}' for x in layers])} the causal ceiling does not rise above random rankings' "
                 f"band, so this run cannot tell a static ranking from a random one there "
                 f"({_plural(len(by['cannot_tell']), unit, unit + 's')} without E[D] > 0 shown). ")
    n_not = len(by["not_shown"])
    if n_not:
        rest = "the other " if n_not < len(table) else "all "
        text += (f"E[D] > 0 is not shown at {rest}{_plural(n_not, unit, unit + 's')} (a non-rejection, not a test "
                 "that the mean is zero). ")
    untested = table[table["p_cluster"].isna() & table["note"].astype(str).str.len().gt(0)] if "note" in table \
        else table.iloc[:0]
    for _, r in untested.iterrows():
        text += f"{_where(r)} was not tested: {r['note']}. "
    return text


def audit_verdict(audit: pd.DataFrame, families: pd.DataFrame | None = None) -> str | None:
    """Definition 2.1 per cell: the count the CLI prints, then one sentence per outcome (:func:`_outcomes`)."""
    del families  # the token-level tests' power is not the power of any decision (validate states that)
    if audit is None or audit.empty:
        return None
    n = len(audit)
    sig = audit[audit["significant"].astype(bool)]
    metrics = _join([metric_label(m) for m in dict.fromkeys(audit["metric"])])
    text = (f"**Observational metrics, cell by cell.** {len(sig)} of {n} metric × layer cells "
            f"{'shows' if len(sig) == 1 else 'show'} E[D] > 0 (Definition 2.1: the one-sided document-level test "
            f"of the mean, Holm over the {n} cells, at a measured level that holds .05; counts: "
            f"{decision_counts(audit, 'audit').split(': ', 1)[1].split(' (')[0]}). ")
    if sig.empty:
        text += (f"On this model and corpus, none of {metrics} is shown, cell by cell, to pick the costlier of a "
                 "token's active experts on average; the claim about a metric is the metric-level test pooled over "
                 "layers (the Answer). ")
    text += _outcomes(audit, "cell")
    bfs = [(r, int((audit[col] > 3).sum())) for r, col in (("0.707", "bf0plus"), ("0.5", "bf0plus_r05"),
                                                            ("0.2", "bf0plus_r02")) if col in audit]
    if bfs:
        text += ("The one-sided Bayes factor BF0+ exceeds 3 in " + _join([f"{k} of {n} cells at prior scale r = {r}"
                                                                         for r, k in bfs])
                 + ": evidence against positive effects of the prior's size (half-Cauchy of that scale on d; "
                   "positions treated as independent), not evidence that the effect is zero.")
    return text.rstrip()


def expert_level_verdict(audit: pd.DataFrame | None, control: pd.DataFrame | None) -> str | None:
    """What the expert-level null and the causal ceiling say (the decision's claims about metrics rest on p_perm)."""
    if audit is None or audit.empty or "p_perm" not in audit or audit["p_perm"].isna().all():
        return None
    alpha = float(audit["alpha_corrected"].iloc[0])
    n = int(audit["p_perm"].notna().sum())
    loose = int((audit["p_perm"] < 0.05).sum())
    token_level = audit[audit["decision"].isin(["positive", "positive_level_not_held"])] \
        if "decision" in audit else audit.iloc[:0]
    failed = token_level[~(token_level["p_perm"] <= alpha)]
    width = audit.assign(w=np.maximum(audit["d_perm_high"], -audit["d_perm_low"]))
    widest = width.loc[width["w"].idxmax()]
    text = ("**Against random rankings of the experts.** A metric is one ranking of a layer's experts, so the claim "
            "that it identifies important experts is tested against random rankings of the same experts (p_perm: "
            "one shared null per layer of at least 10,000 random relabelings of the metric across the layer's "
            "experts with a value, recomputed from the single-expert pool, no new ablation); the token-level tests "
            f"only ask whether this one ranking's D differs from zero. Random rankings alone give d in "
            f"[{widest['d_perm_low']:+.3f}, {widest['d_perm_high']:+.3f}] (95%) at L{widest['layer']}, where "
            "experts differ most in importance. "
            f"{int((audit['p_perm'] <= alpha).sum())} of {n} cells reach p_perm ≤ {alpha:.4g} and "
            f"{loose} p_perm < .05 uncorrected; of the {_plural(len(token_level), 'cell', 'cells')} whose "
            f"test of the mean rejects after Holm, {len(failed)} "
            f"{'is' if len(failed) == 1 else 'are'} not shown to beat random rankings"
            + (": " + _join([f"{_cell(r)}, p_perm = {r['p_perm']:.2g}" for _, r in failed.iterrows()]) if len(failed)
               else "") + ". ")
    table = control if control is not None and not control.empty and "d_ceiling" in control else audit
    ceiling = table.dropna(subset=["d_ceiling"]).groupby("layer")[["d_ceiling", "d_ceiling_low",
                                                                    "d_ceiling_high"]].first()
    if len(ceiling):
        best = ceiling["d_ceiling"].idxmax()
        flat = ceiling[ceiling["d_ceiling_low"] <= 0]
        text += (f"The causal ceiling, d of the experts ranked by their own mean ΔL on half of the documents and "
                 f"scored on the other half, ranges from {ceiling['d_ceiling'].min():+.3f} to "
                 f"{ceiling['d_ceiling'].max():+.3f} (highest at L{best}). ")
        if len(flat):
            text += (f"At {_join([f'L{x}' for x in flat.index])} its range over halvings reaches 0: even the experts' "
                     "own mean ΔL, estimated on half of the documents, does not reliably rank them on the other "
                     "half, so static per-expert rankings have little to find there at this sample size and a "
                     "metric's failure at those layers says little about the metric. (The ceiling is estimated from "
                     "half the data, so a metric may exceed it.)")
    return text.rstrip()


def control_verdict(control: pd.DataFrame, audit: pd.DataFrame | None,
                    families: pd.DataFrame | None = None) -> str | None:
    if control is None or control.empty:
        return None
    sig = control[control["significant"].astype(bool)]
    n = len(control)
    text = (f"**Routing-weight control.** Ranking the active experts by their per-token router weight gives "
            f"{len(sig)} of {_plural(n, 'layer', 'layers')} with E[D] > 0 (one-sided document-level test of the "
            f"mean, Holm over the {n} layers, at a measured level that holds .05). ")
    text += _outcomes(control, "layer")
    mean_c = float(control["cohens_d"].abs().mean())
    if audit is not None and not audit.empty:
        text += (f"Its mean |d| over layers is {mean_c:.3f}, against {float(audit['cohens_d'].abs().mean()):.3f} "
                 "over the observational-metric cells (a description; the two are not compared by a test). ")
    rho = control["spearman_rho"].dropna()
    if len(rho):
        text += (f"The Spearman correlation between the weight ratio of the two removed experts and D ranges from "
                 f"{rho.min():+.3f} to {rho.max():+.3f} over layers.")
    return text.rstrip()


def rank_verdict(rank: pd.DataFrame) -> str | None:
    if rank is None or rank.empty or rank["mean_rho"].isna().all():
        return None
    best = rank.loc[rank["mean_rho"].idxmax()]
    sig = rank[rank["significant"].astype(bool)]
    listed = _join([f"{metric_label(r['metric'])} at L{r['layer']} (mean ρ = {r['mean_rho']:+.3f})"
                    for _, r in sig.iterrows()])
    n = len(rank)
    unc = int((rank["p_cluster"] < 0.05).sum())
    return (f"**Rank validity.** Within a token, the mean Spearman correlation between a metric's ranking of the "
            f"active experts and their ΔL ranges from {rank['mean_rho'].min():+.3f} to {rank['mean_rho'].max():+.3f} "
            f"(highest: {metric_label(best['metric'])} at L{best['layer']}). {len(sig)} of {n} cells differ from "
            f"zero after Bonferroni correction (α = 0.05/{n} = {rank['alpha_corrected'].iloc[0]:.4g}; sign-flip test "
            f"of the mean ρ with documents as units){': ' + listed if listed else ''}; "
            f"{unc} at p < .05 uncorrected, against about {0.05 * n:.1f} expected by chance.")


def progressive_verdict(progressive: pd.DataFrame) -> str | None:
    """The paper's progressive sentence, on the highest-weight-first arm."""
    if progressive is None or progressive.empty:
        return None
    if "arm" in progressive.columns:
        progressive = progressive[progressive["arm"] == "highest"]
        if progressive.empty:
            return None
    last = progressive.loc[progressive.groupby("layer")["k"].idxmax()]
    worst = last.loc[last["mean"].idxmax()]
    mild = last.loc[last["mean"].idxmin()]
    tail = last.assign(gap=last["p95"] - last["median"])
    heavy = tail.loc[tail["gap"].idxmax()]
    text = (f"**Progressive ablation.** Removing all but one active expert (the {int(worst['k'])} highest-weight "
            f"ones together) changes the mean loss by {mild['mean']:+.3f} nats at L{mild['layer']} (the mildest "
            f"layer) up to {worst['mean']:+.3f} at L{worst['layer']}. ")
    if heavy["p95"] > 5 * max(abs(heavy["median"]), 1e-3):
        text += (f"The heaviest upper tail is at L{heavy['layer']}: half of the tokens change by at most "
                 f"{heavy['median']:+.3f} nats but 5% by {heavy['p95']:+.3f} or more, so a few tokens carry much of "
                 "the mean.")
    else:
        text += "No layer shows a heavy upper tail (everywhere P95 ≤ 5 × max(|median|, 0.001) nats)."
    return text


def _layers(layers) -> str:
    return ", ".join(f"L{int(x)}" for x in sorted(set(layers)))


def _difference(r) -> str:
    more = "more" if r["mean_diff"] > 0 else "less"
    return (f"{arm_label(r['arm_a'])} costs {more} than {arm_label(r['arm_b'])} at L{r['layer']}, k = {r['k']} "
            f"({r['mean_diff']:+.3f} nats, 95% CI [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}])")


def arms_verdict(arms: pd.DataFrame | None) -> str | None:
    """Whether the removal order of the progressive ablation matters, as far as the tests of the
    ``progressive_arms`` table support: equivalence only where TOST rejects, a difference only where the
    difference test rejects (both Holm-corrected), "inconclusive" otherwise."""
    if arms is None or arms.empty:
        return None
    n = len(arms)
    bound = "the margin" if "sesoi_rel" in arms else f"±{float(arms['sesoi'].iloc[0]):g} nats"
    within = arms["equivalent"].astype(bool)
    differs = arms["significant"].astype(bool) & ~within
    inconclusive = ~within & ~arms["significant"].astype(bool)
    # counted by the table's decision, as the CLI counts them: a comparison that differs and is equivalent within
    # the margin is "differs, within bounds", not "equivalent"
    bounded = arms["decision"] == "differs, within bounds" if "decision" in arms else within & ~within
    bounded_text = (f"{int(bounded.sum())} {'differs' if bounded.sum() == 1 else 'differ'} but "
                    f"{'stays' if bounded.sum() == 1 else 'stay'} within {bound}, ") if bounded.any() else ""
    orders = ", ".join(arm_label(a) for a in dict.fromkeys([*arms["arm_a"], *arms["arm_b"]]))
    text = (f"**Does the removal order matter?** Comparing the progressive ablation's removal orders ({orders}) "
            f"at the same positions: of {n} paired comparisons (layer × k × pair of orders; document-level "
            "sign-flip tests, Holm-corrected), "
            f"{int(differs.sum())} differ, {bounded_text}{int((within & ~bounded).sum())} are equivalent within "
            f"{bound} (TOST; margin {margin_rule(arms)}) and "
            f"{int(inconclusive.sum())} are inconclusive. ")
    if within.all():
        return text + (f"At every tested layer and depth the order does not matter beyond {bound} of mean "
                       "ΔL: for the average token, which active experts are removed makes no difference larger "
                       "than that (tails are not covered by this test; see P95 above).")
    settled = arms.groupby("layer")["equivalent"].all()
    if settled.any():
        text += (f"At {_layers(settled[settled].index)} the order does not matter beyond {bound} of mean "
                 "ΔL (every comparison there is equivalent). ")
    if differs.any():
        top = arms[differs].reindex(arms.loc[differs, "mean_diff"].abs().sort_values(ascending=False).index)
        text += (f"It matters at {_layers(top['layer'])}: "
                 f"{_join([_difference(r) for _, r in top.head(3).iterrows()])}"
                 f"{f' (and {len(top) - 3} more)' if len(top) > 3 else ''}. ")
    if inconclusive.any():
        text += (f"At {_layers(arms.loc[inconclusive, 'layer'])} some comparisons are inconclusive: neither a "
                 f"difference nor equivalence within {bound} is shown at this n, so no claim either way.")
    return text.rstrip()


def redistribution_verdict(layers: pd.DataFrame) -> str | None:
    if layers is None or layers.empty:
        return None
    lo, hi = layers["rho_weight_gap"].min(), layers["rho_weight_gap"].max()
    trend = "grows with" if lo > 0 else ("shrinks with" if hi < 0 else "does not consistently follow")
    text = (f"**Redistribution.** The gap an expert's removal leaves {trend} its routing weight (Spearman "
            f"ρ from {lo:+.3f} to {hi:+.3f} over layers); "
            f"the remaining experts' output has a mean cosine of {layers['mean_compensation_cos'].mean():+.3f} with "
            f"the removed contribution, and ρ(gap, relative compensation) ranges from "
            f"{layers['rho_gap_compensation'].min():+.3f} to {layers['rho_gap_compensation'].max():+.3f}.")
    if "rho_weight_norm" in layers and layers["rho_weight_norm"].notna().any():
        text += (f" Both are partly mechanical: the gap is weight × ‖E(x)‖, and ρ(weight, ‖E(x)‖) is only "
                 f"{layers['rho_weight_norm'].min():+.3f} to {layers['rho_weight_norm'].max():+.3f}; relative "
                 f"compensation divides by the gap, and ρ(gap, compensation numerator) is "
                 f"{layers['rho_gap_numerator'].min():+.3f} to {layers['rho_gap_numerator'].max():+.3f} "
                 "(intervals in the table, clustered by document).")
    return text


def stability_verdict(stability: pd.DataFrame | None) -> str | None:
    if stability is None or stability.empty or stability["tau"].isna().all() or "tau_low" not in stability:
        return None
    by_metric = stability.groupby("metric", sort=False).agg(tau=("tau", "median"), low=("tau_low", "min"),
                                                             rel=("reliability", "median"))
    parts = [f"{metric_label(m)} median τ = {r.tau:.2f} (lowest 2.5% point over layers {r.low:.2f}, "
             f"reliability {r.rel:.2f})" for m, r in by_metric.iterrows()]
    n_splits = int(stability["n_splits"].max())
    return (f"**Ranking stability.** Over {n_splits} random document half-splits, Kendall τ between the expert "
            f"rankings of the two halves: {_join(parts)}. Unstable rankings (τ near 0) cannot be valid ones; stable "
            "ones need not be.")


def verification_verdict(verification: dict | None) -> str:
    if not verification:
        return "**Verification.** No verification report is stored with this run."
    checks = verification.get("checks", [])
    failed = [c["name"] for c in checks if not c.get("passed")]
    if failed:
        return f"**Verification FAILED** ({', '.join(failed)}); the numbers below must not be trusted."
    return (f"**Verification.** All {len(checks)} checks passed ({', '.join(c['name'] for c in checks)}) in "
            f"{verification.get('dtype', '?')} before any data was collected.")


def verdict_parts(tables: dict[str, pd.DataFrame], stability: pd.DataFrame | None,
                  verification: dict | None) -> tuple[list[str], list[str]]:
    """``(main, more)``: the paragraphs ``report.md`` keeps (the cells' decisions, the control, the verification)
    and those ``report-details.md`` carries (random rankings and the ceiling, rank validity, the progressive
    ablation and its orders, redistribution, stability)."""
    main = [audit_verdict(tables.get("audit")), control_verdict(tables.get("control"), tables.get("audit")),
            verification_verdict(verification)]
    more = [expert_level_verdict(tables.get("audit"), tables.get("control")),
            rank_verdict(tables.get("rank_validity")), progressive_verdict(tables.get("progressive")),
            arms_verdict(tables.get("progressive_arms")),
            redistribution_verdict(tables.get("redistribution_layers")), stability_verdict(stability)]
    return [p for p in main if p], [p for p in more if p]


def verdict(tables: dict[str, pd.DataFrame], stability: pd.DataFrame | None, verification: dict | None) -> list[str]:
    """Every paragraph, most important first."""
    main, more = verdict_parts(tables, stability, verification)
    return main[:-1] + more + main[-1:] if main and main[-1].startswith("**Verification") else main + more
