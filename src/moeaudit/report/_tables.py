"""The paper's tables (Appendix A style) from the summary tables of one model."""

from __future__ import annotations

import math

import pandas as pd

from moeaudit.report._document import Table
from moeaudit.report._figures import metric_label

ALPHA = 0.05


def fmt_d(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:+.3f}"


def fmt_p(value: float, mark: bool = True) -> str:
    """Three significant digits; ``*`` marks p < .05 (uncorrected)."""
    if value is None or math.isnan(value):
        return "n/a"
    text = f"{value:.3g}" if value >= 1e-3 else f"{value:.2e}"
    return text + ("*" if mark and value < ALPHA else "")


def fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def fmt_ci(low: float, high: float) -> str:
    if any(v is None or math.isnan(v) for v in (low, high)):
        return "n/a"
    return f"[{low:+.3f}, {high:+.3f}]"


def _sig(row) -> str:
    return "yes" if bool(row["significant"]) else ""


def audit_table(audit: pd.DataFrame, model: str) -> Table | None:
    """Metric x layer cells: d with its bootstrap CI, p_t, p_w, and Bonferroni significance."""
    if audit is None or audit.empty:
        return None
    rows = []
    for _, r in audit.sort_values(["layer", "metric"], kind="stable").iterrows():
        rows.append([f"L{r['layer']}", metric_label(r["metric"]), str(int(r["n"])), fmt_d(r["cohens_d"]),
                     fmt_ci(r["ci_low"], r["ci_high"]), fmt_p(r["p_t"]), fmt_p(r["p_wilcoxon"]),
                     fmt(r["pct_high_larger"], 1), fmt(r["bf01"], 2), _sig(r)])
    alpha = audit["alpha_corrected"].iloc[0]
    return Table(
        f"{model}: audit of the observational metrics (Definition 2.1)",
        ["layer", "metric", "n", "d", "95% CI of d", "p_t", "p_w", "% D>0", "BF01", "Bonferroni"], rows,
        notes=(f"D = ΔL(highest-ranked expert removed) − ΔL(lowest-ranked) per position; d = mean(D)/sd(D). "
               f"* p < .05 uncorrected. Bonferroni: α = 0.05/{len(audit)} = {alpha:.4g}, and the t-test and "
               "Wilcoxon must agree. BF01 > 1 favours no difference. CI: bootstrap over positions clustered by "
               "document."),
        align_left=2)


def control_table(control: pd.DataFrame, model: str) -> Table | None:
    if control is None or control.empty:
        return None
    rows = []
    for _, r in control.sort_values("layer").iterrows():
        rows.append([f"L{r['layer']}", fmt(r["relative_depth"], 2), str(int(r["n"])), fmt_d(r["cohens_d"]),
                     fmt_ci(r["ci_low"], r["ci_high"]), fmt_p(r["p_t"]), fmt_p(r["p_wilcoxon"]),
                     fmt(r["spearman_rho"]), fmt_p(r["spearman_p"]), _sig(r)])
    alpha = control["alpha_corrected"].iloc[0]
    return Table(
        f"{model}: routing-weight control (per-token router weight as the ranking)",
        ["layer", "depth", "n", "d", "95% CI of d", "p_t", "p_w", "ρ(w_high/w_low, D)", "p_ρ", "Bonferroni"],
        rows, notes=(f"Bonferroni over the model's control cells: α = 0.05/{len(control)} = {alpha:.4g}. "
                     "ρ: Spearman correlation of the weight ratio of the two ablated experts with D."))


def rank_validity_table(rank: pd.DataFrame, model: str) -> Table | None:
    if rank is None or rank.empty:
        return None
    rows = []
    for _, r in rank.sort_values(["layer", "metric"], kind="stable").iterrows():
        rows.append([f"L{r['layer']}", metric_label(r["metric"]), str(int(r["n_positions"])), fmt(r["mean_rho"]),
                     fmt(r["median_rho"]), fmt(r["pct_positive"], 1), fmt_p(r["p_sign"]), fmt(r["t_z"], 2),
                     fmt_p(r["p_t_z"])])
    return Table(f"{model}: rank validity (every active expert ablated; Spearman of metric and ΔL within a token)",
                 ["layer", "metric", "positions", "mean ρ", "median ρ", "% ρ>0", "p (sign)", "t (Fisher z)", "p_t"],
                 rows, notes="ρ > 0: within a token, experts the metric ranks higher cost more when removed.",
                 align_left=2)


def progressive_table(progressive: pd.DataFrame, model: str) -> Table | None:
    """Layer x k with mean / median / P95 of ΔL."""
    if progressive is None or progressive.empty:
        return None
    ks = sorted(progressive["k"].unique())
    rows = []
    for layer, g in progressive.groupby("layer", sort=True):
        by_k = g.set_index("k")
        cells = []
        for k in ks:
            if k in by_k.index:
                r = by_k.loc[k]
                cells.append(f"{r['mean']:.3f} / {r['median']:.3f} / {r['p95']:.3f}")
            else:
                cells.append("")
        rows.append([f"L{layer}", str(int(g["n"].max())), *cells])
    return Table(f"{model}: progressive ablation, ΔL (nats) as mean / median / P95",
                 ["layer", "n", *[f"k={k}" for k in ks]], rows,
                 notes="k: number of highest-weight active experts removed together at one position. "
                       "A P95 far above the median marks a heavy upper tail: most tokens barely move, a few break.")


def redistribution_table(layers: pd.DataFrame, model: str) -> Table | None:
    if layers is None or layers.empty:
        return None
    rows = []
    for _, r in layers.sort_values("layer").iterrows():
        rows.append([f"L{r['layer']}", str(int(r["n"])), fmt(r["mean_gap_norm"]), fmt(r["mean_final_gap_norm"]),
                     fmt(r["mean_propagation"], 2), fmt(r["mean_compensation_cos"]), fmt(r["rho_weight_gap"]),
                     fmt_p(r["p_weight_gap"]), fmt(r["rho_gap_compensation"]), fmt_p(r["p_gap_compensation"])])
    return Table(f"{model}: redistribution (what removing one expert takes out, and what the others supply)",
                 ["layer", "ablations", "gap norm", "final gap", "final/gap", "comp. cos", "ρ(weight, gap)", "p",
                  "ρ(gap, rel. comp.)", "p"], rows,
                 notes="gap: norm of the removed contribution at the layer output; final gap: the displacement "
                       "that reaches the last layer; comp. cos: cosine of the removed contribution with the "
                       "remaining MoE output.")


def stability_table(stability: pd.DataFrame | None, model: str) -> Table | None:
    if stability is None or stability.empty:
        return None
    rows = []
    for _, r in stability.sort_values(["layer", "metric"], kind="stable").iterrows():
        rows.append([f"L{r['layer']}", metric_label(r["metric"]), str(int(r["n_experts"])), fmt(r["tau"]),
                     fmt_ci(r["ci_low"], r["ci_high"]), fmt_p(r["p"], mark=False)])
    return Table(f"{model}: ranking stability (Kendall τ of each metric between the corpus's even and odd halves)",
                 ["layer", "metric", "experts", "τ", "95% CI", "p"], rows,
                 notes="A metric that ranks experts differently on two halves of one corpus cannot predict "
                       "anything about them. CI: bootstrap over experts.", align_left=2)


def runs_table(runs) -> Table:
    rows = []
    for run in runs:
        m, c = run.manifest, run.config
        sessions = m.get("sessions", [])
        last = sessions[-1] if sessions else {}
        wall = sum(sum(v for k, v in s.get("stages", {}).items() if k != "report") for s in sessions)
        rows.append([run.label, m.get("model", {}).get("family", "?"), c["model"],
                     ", ".join(f"L{x}" for x in run.layers), str(c["n"]), str(c["n_progressive"]),
                     f"{c['corpus']} ({m.get('corpus', {}).get('n_sequences', '?')} docs, ≤{c['max_length']} tok)",
                     f"{c['scope']}/{c['mode']}", last.get("dtype", c["dtype"]), last.get("device", c["device"]),
                     "passed" if run.verification and run.verification.get("passed") else
                     ("FAILED" if run.verification else "not run"),
                     f"{len(run.records):,}", f"{wall:.0f} s", m.get("status", "?")])
    return Table("Configuration and provenance of each run", ["model", "family", "checkpoint", "layers", "n", "n prog.", "corpus", "scope/mode",
                          "dtype", "device", "verification", "records", "compute time", "status"], rows, align_left=3)


def headline_table(runs) -> Table:
    """One row per model: the audit's and the control's headline numbers, side by side."""
    rows = []
    for run in runs:
        audit, control = run.tables.get("audit"), run.tables.get("control")
        row = [run.label]
        if audit is not None and len(audit):
            both = int(((audit["p_t"] < ALPHA) & (audit["p_wilcoxon"] < ALPHA)).sum())
            row += [str(len(audit)), str(int(audit["significant"].sum())), str(both),
                    fmt(float(audit["cohens_d"].abs().max()))]
        else:
            row += ["", "", "", ""]
        if control is not None and len(control):
            sig = control[control["significant"].astype(bool)]
            row += [", ".join(f"L{x}" for x in sig["layer"]) or "none",
                    fmt(float(control["cohens_d"].abs().max()))]
        else:
            row += ["", ""]
        rows.append(row)
    return Table("Headline numbers per model", ["model", "audit cells", "Bonferroni-significant",
                                                "p < .05 on both (uncorrected)", "max |d|",
                                                "control: significant layers", "control: max |d|"], rows)
