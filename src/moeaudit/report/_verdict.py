"""A plain-language verdict per model, generated from the summary tables (nothing in it is fixed text about a
result: every number and every conclusion is read off the tables)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from moeaudit.report._tables import metric_label


def _cell(r) -> str:
    return f"{metric_label(r['metric'])} at L{r['layer']} (d = {r['cohens_d']:+.3f}, p_t = {r['p_t']:.2g})"


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def audit_verdict(audit: pd.DataFrame) -> str | None:
    if audit is None or audit.empty:
        return None
    n = len(audit)
    sig = audit[audit["significant"].astype(bool)]
    unc = int(((audit["p_t"] < 0.05) & (audit["p_wilcoxon"] < 0.05)).sum())
    d = audit["cohens_d"].abs()
    top = audit.loc[d.idxmax()] if d.notna().any() else None
    alpha = audit["alpha_corrected"].iloc[0]
    half = float(np.nanmean((audit["ci_high"] - audit["ci_low"]) / 2))
    metrics = _join([metric_label(m) for m in dict.fromkeys(audit["metric"])])
    verb = "survives" if len(sig) == 1 else "survive"
    text = (f"**Observational metrics.** {len(sig)} of {n} metric × layer cells {verb} Bonferroni correction "
            f"(α = {alpha:.4g}, t-test and Wilcoxon agreeing)")
    text += f"; the largest effect is {_cell(top)}, and |d| ≤ {d.max():.3f} in every cell. " if top is not None \
        else ". "
    if sig.empty:
        text += (f"On this model and corpus, none of {metrics} tells which of a token's active experts costs more "
                 "when removed: a pruning or attribution ranking built on them rests on an assumption these data "
                 "do not support. ")
    else:
        right = sig[sig["cohens_d"] > 0]
        wrong = sig[sig["cohens_d"] < 0]
        if len(right):
            text += ("Where the metric points the right way (the higher-ranked expert costs more): "
                     f"{_join([_cell(r) for _, r in right.iterrows()])}. ")
        if len(wrong):
            text += ("Where it points the wrong way (the lower-ranked expert costs more): "
                     f"{_join([_cell(r) for _, r in wrong.iterrows()])}. ")
        text += f"The other {n - len(sig)} cells show no reliable effect. "
    text += (f"{unc} cell{'s' if unc != 1 else ''} reach{'es' if unc == 1 else ''} p < .05 on both tests "
             f"uncorrected, against about {0.05 * n:.1f} expected by chance. ")
    if not math.isnan(half):
        text += (f"The 95% intervals of d have a mean half-width of {half:.3f}: effects smaller than that cannot be "
                 "told from zero at this n.")
    return text


def control_verdict(control: pd.DataFrame, audit: pd.DataFrame | None) -> str | None:
    if control is None or control.empty:
        return None
    sig = control[control["significant"].astype(bool)]
    listed = _join([f"L{r['layer']} (d = {r['cohens_d']:+.3f}, p_t = {r['p_t']:.2g})" for _, r in sig.iterrows()])
    text = (f"**Routing-weight control.** Ranking the active experts by their per-token router weight gives "
            f"{len(sig)} significant layer{'s' if len(sig) != 1 else ''} of {len(control)}"
            f"{': ' + listed if listed else ''}. ")
    mean_c = float(control["cohens_d"].abs().mean())
    if audit is not None and not audit.empty:
        mean_a = float(audit["cohens_d"].abs().mean())
        better = "a stronger signal" if mean_c > mean_a else "not a stronger signal"
        text += (f"Its mean |d| is {mean_c:.3f} against {mean_a:.3f} for the observational metrics: the router's "
                 f"own per-token weight is {better} than the corpus-level statistics here. ")
    rho = control["spearman_rho"].dropna()
    if len(rho):
        text += (f"The Spearman correlation between the weight ratio of the two removed experts and D ranges from "
                 f"{rho.min():+.3f} to {rho.max():+.3f} over layers.")
    return text


def rank_verdict(rank: pd.DataFrame) -> str | None:
    if rank is None or rank.empty or rank["mean_rho"].isna().all():
        return None
    best = rank.loc[rank["mean_rho"].idxmax()]
    return (f"**Rank validity.** Within a token, the mean Spearman correlation between a metric's ranking of the "
            f"active experts and their ΔL ranges from {rank['mean_rho'].min():+.3f} to {rank['mean_rho'].max():+.3f} "
            f"(highest: {metric_label(best['metric'])} at L{best['layer']}); "
            f"{int((rank['p_t_z'] < 0.05).sum())} of {len(rank)} cells differ from zero at p < .05 uncorrected.")


def progressive_verdict(progressive: pd.DataFrame) -> str | None:
    if progressive is None or progressive.empty:
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
        text += (f"The heaviest upper tail is at L{heavy['layer']}: median {heavy['median']:+.3f} but P95 "
                 f"{heavy['p95']:+.3f}, so most tokens barely move while a few break.")
    else:
        text += "No layer shows a heavy upper tail (everywhere P95 ≤ 5 × max(|median|, 0.001) nats)."
    return text


def redistribution_verdict(layers: pd.DataFrame) -> str | None:
    if layers is None or layers.empty:
        return None
    lo, hi = layers["rho_weight_gap"].min(), layers["rho_weight_gap"].max()
    trend = "grows with" if lo > 0 else ("shrinks with" if hi < 0 else "does not consistently follow")
    return (f"**Redistribution.** The gap an expert's removal leaves {trend} its routing weight (Spearman "
            f"ρ from {lo:+.3f} to {hi:+.3f} over layers); "
            f"the remaining experts' output has a mean cosine of {layers['mean_compensation_cos'].mean():+.3f} with "
            f"the removed contribution, and ρ(gap, relative compensation) ranges from "
            f"{layers['rho_gap_compensation'].min():+.3f} to {layers['rho_gap_compensation'].max():+.3f}.")


def stability_verdict(stability: pd.DataFrame | None) -> str | None:
    if stability is None or stability.empty or stability["tau"].isna().all():
        return None
    by_metric = stability.groupby("metric", sort=False)["tau"].mean()
    parts = [f"{metric_label(m)} τ = {t:.2f}" for m, t in by_metric.items()]
    return (f"**Ranking stability.** Mean Kendall τ between the expert rankings of two corpus halves: "
            f"{_join(parts)}. Unstable rankings (τ near 0) cannot be valid ones.")


def verification_verdict(verification: dict | None) -> str:
    if not verification:
        return "**Verification.** No verification report is stored with this run."
    checks = verification.get("checks", [])
    failed = [c["name"] for c in checks if not c.get("passed")]
    if failed:
        return f"**Verification FAILED** ({', '.join(failed)}); the numbers below must not be trusted."
    return (f"**Verification.** All {len(checks)} checks passed ({', '.join(c['name'] for c in checks)}) in "
            f"{verification.get('dtype', '?')} before any data was collected.")


def verdict(tables: dict[str, pd.DataFrame], stability: pd.DataFrame | None, verification: dict | None) -> list[str]:
    """Paragraphs, most important first."""
    parts = [audit_verdict(tables.get("audit")), control_verdict(tables.get("control"), tables.get("audit")),
             rank_verdict(tables.get("rank_validity")), progressive_verdict(tables.get("progressive")),
             redistribution_verdict(tables.get("redistribution_layers")), stability_verdict(stability),
             verification_verdict(verification)]
    return [p for p in parts if p]
