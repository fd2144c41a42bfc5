"""The paper's tables (Appendix A style) from the summary tables of one model."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from moeaudit.experiments import margin_rule
from moeaudit.report._document import Table
from moeaudit.report._figures import metric_label
from moeaudit.report._style import arm_label, arm_rank

ALPHA = 0.05


def fmt_d(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:+.3f}"


def fmt_p(value: float, mark: bool = True) -> str:
    """Three significant digits; ``*`` marks p < .05 (uncorrected)."""
    if value is None or math.isnan(value):
        return "n/a"
    text = f"{value:.3g}" if value >= 1e-3 else f"{value:.2e}"
    return text + ("*" if mark and value < ALPHA else "")


def fmt_p_flip(row, column: str) -> str:
    """A sign-flip p-value; at the smallest value its random draws can give, 1 / (n_perm + 1), shown as an upper
    bound ("≤")."""
    value, n_perm = row[column], row.get("n_perm", 0)
    text = fmt_p(value)
    if n_perm and not math.isnan(value) and value <= 1.0 / (n_perm + 1) * (1 + 1e-9):
        text = "≤" + text
    return text


def fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def fmt_ci(low: float, high: float) -> str:
    if any(v is None or math.isnan(v) for v in (low, high)):
        return "n/a"
    return f"[{low:+.3f}, {high:+.3f}]"


def fmt_nats(value: float) -> str:
    """Two significant digits with a sign: the typical D is often 1e-4 nats, the mean 1e-1."""
    if value is None or math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "+∞" if value > 0 else "−∞"
    return "0" if value == 0 else f"{value:+.2g}"


def fmt_d_ci(d: float, low: float, high: float) -> str:
    return "n/a" if d is None or math.isnan(d) else f"{d:+.3f} {fmt_ci(low, high)}"


def fmt_hl(r) -> str:
    if math.isnan(r["hl_estimate"]):
        return "n/a"
    return f"{fmt_nats(r['hl_estimate'])} [{fmt_nats(r['hl_low'])}, {fmt_nats(r['hl_high'])}]"


def fmt_bf(value: float) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if math.isinf(value) or value >= 1e4 or (0 < value < 1e-2):
        return "∞" if math.isinf(value) else f"{value:.1e}"
    return f"{value:.2f}"


#: How the ``decision`` column reads in the tables (see ``moeaudit.experiments._decide.DECISIONS``).
DECISION_LABELS: dict[str, str] = {
    "positive": "E[D] > 0",
    "positive_level_not_held": "p ≤ α but level not held",
    "below_half_ceiling": "< ½ of the ceiling",
    "not_shown": "E[D] > 0 not shown",
    "cannot_tell": "cannot tell (layer uninformative)",
    "untested": "untested",
}


def _decision(row) -> str:
    return DECISION_LABELS.get(str(row.get("decision", "")), str(row.get("decision", "")))


def _decision_note(table: pd.DataFrame, what: str, expert_level: bool = False) -> str:
    secondary = (" p_perm (random rankings of the layer's experts) is secondary, quoted, not a criterion; the claim "
                 "about a metric is the metric-level test.") if expert_level else ""
    anchored = ("; '< ½ of the ceiling' when the 95% upper bound of the cell's share of the causal ceiling is below "
                "½ (informative layers only); 'cannot tell' at a layer whose ceiling is within random rankings' band"
                ) if expert_level else ""
    return (f"Decision (Definition 2.1, E[D] > 0): 'E[D] > 0' when the one-sided document-level test of the mean "
            f"(p_mean>0, calibrated for skew) survives Holm over the model's {len(table)} {what} at α = 0.05 and its "
            "measured level on the cell's own skewed null holds .05 (level: rejection rate at .05 on 300 such "
            "nulls); 'level not held' when it rejects but the measured level's 95% interval lies above .05 (not "
            f"claimed){anchored}; else 'E[D] > 0 not shown' (not a test of absence). The typical token (% D>0, HL, "
            f"p_rank) is description, not a criterion.{secondary}")


_ESTIMANDS = ("D = ΔL(highest-ranked expert removed) − ΔL(lowest-ranked) per position. Two estimands: the mean "
              "(d = mean(D)/sd(D), BCa bootstrap interval over documents; p_mean: sign-flip test of E[D] = 0 "
              "flipping whole documents) and the typical token (% D>0; HL: Hodges–Lehmann estimate of the typical "
              "D in nats with the interval of the document-clustered signed-rank test; p_rank: that test). Unit "
              "of inference: the document. * p < .05 uncorrected. ")


def fmt_level(row) -> str:
    """The one-sided mean test's measured level at .05 on the cell's skewed null, flagged (!) where its 95%
    interval lies above .05."""
    level = _get(row, "mean_level")
    if not np.isfinite(level):
        return "n/a"
    return f"{level:.3f}" + (" (!)" if _get(row, "mean_level_low") > 0.05 else "")


def _get(row, column: str) -> float:
    """A column that older tables may lack (NaN then)."""
    return row[column] if column in row.index else math.nan


def _notes(table: pd.DataFrame) -> str:
    notes = table.attrs.get("notes") or []
    return (" " + " ".join(notes)) if notes else ""


def audit_table(audit: pd.DataFrame, model: str) -> Table | None:
    """Metric x layer cells: both estimands, the clustered tests, equivalence, the one-sided Bayes factor and the
    decision."""
    if audit is None or audit.empty:
        return None
    rows = []
    for _, r in audit.sort_values(["layer", "metric"], kind="stable").iterrows():
        rows.append([f"L{r['layer']}", metric_label(r["metric"]), str(int(r["n"])),
                     fmt_d_ci(r["cohens_d"], r["ci_low"], r["ci_high"]), fmt_p(_get(r, "p_mean_greater_holm")),
                     fmt_level(r), fmt_p_flip(r, "p_signrank_cluster"), fmt(r["pct_high_larger"], 1), fmt_hl(r),
                     fmt_p(_get(r, "p_perm")), fmt_ci(_get(r, "d_perm_low"), _get(r, "d_perm_high")),
                     fmt_d_ci(_get(r, "ceiling_share"), _get(r, "ceiling_share_low"), _get(r, "ceiling_share_high")),
                     _decision(r)])
    return Table(
        f"{model}: audit of the observational metrics (Definition 2.1)",
        ["layer", "metric", "n", "d [95% CI]", "p_mean>0 (Holm)", "level at .05", "p_rank", "% D>0",
         "HL, nats [95% CI]", "p_perm", "d, random rankings", "share of ceiling [95%]", "decision"], rows,
        notes=(_ESTIMANDS + _decision_note(audit, "audit cells", expert_level=True) + " p_perm: a metric is one "
               "ranking of a layer's experts, so the claim that it identifies important experts is tested against "
               "random rankings of the same experts: the share of at least 1000 random relabelings of the metric "
               "across the layer's experts (recomputed from the single-expert pool) whose |d| reaches the observed "
               "|d|, +1 correction (unit of inference: the expert labelling); 'd, random rankings' is the 2.5-97.5% "
               "range of d under those relabelings. p_mean and p_rank ask a narrower question: does this one "
               "ranking's D differ from zero at these positions. Share of ceiling: d / d of the cross-fitted causal "
               "ranking, with its document-bootstrap interval (n/a at layers whose ceiling is within random "
               "rankings' band). The two-sided p_mean (p_cluster), p_TOST, the one-sided Bayes factors BF0+, the "
               "paper's unclustered p_t and p_w and the sign test p_sign "
               "are in tables/audit.csv." + _notes(audit)),
        align_left=2)


def control_table(control: pd.DataFrame, model: str) -> Table | None:
    if control is None or control.empty:
        return None
    rows = []
    for _, r in control.sort_values("layer").iterrows():
        rows.append([f"L{r['layer']}", fmt(r["relative_depth"], 2), str(int(r["n"])),
                     fmt_d_ci(r["cohens_d"], r["ci_low"], r["ci_high"]), fmt_p(_get(r, "p_mean_greater_holm")),
                     fmt_level(r), fmt_p_flip(r, "p_signrank_cluster"), fmt(r["pct_high_larger"], 1), fmt_hl(r),
                     fmt(r["spearman_rho"]),
                     fmt_d_ci(_get(r, "d_ceiling"), _get(r, "d_ceiling_low"), _get(r, "d_ceiling_high")),
                     _decision(r)])
    return Table(
        f"{model}: routing-weight control (per-token router weight as the ranking)",
        ["layer", "depth", "n", "d [95% CI]", "p_mean>0 (Holm)", "level at .05", "p_rank", "% D>0",
         "HL, nats [95% CI]", "ρ(w_high/w_low, D)", "causal ceiling d [range]", "decision"],
        rows, notes=(_ESTIMANDS + _decision_note(control, "control layers") + " ρ: Spearman correlation of the "
                     "weight ratio of the two ablated experts with D (positions independent). Causal ceiling: d of "
                     "the static ranking of the layer's experts by their mean ΔL estimated on a random half of the "
                     "documents and scored on the other half (and the reverse), mean over 200 halvings; range: "
                     "2.5-97.5% over the halvings (the spread due to the halving, not a confidence interval). It is "
                     "what a corpus-level statistic could hope to reach at the layer (estimated from half the data, "
                     "so conservative). The control's p_perm (weights permuted within each token) is in "
                     "tables/control.csv." + _notes(control)))


def rank_validity_table(rank: pd.DataFrame, model: str) -> Table | None:
    if rank is None or rank.empty:
        return None
    rows = []
    for _, r in rank.sort_values(["layer", "metric"], kind="stable").iterrows():
        rows.append([f"L{r['layer']}", metric_label(r["metric"]), str(int(r["n_positions"])), fmt(r["mean_rho"]),
                     fmt(r["median_rho"]), fmt(r["pct_positive"], 1), fmt_p_flip(r, "p_cluster"),
                     fmt_p_flip(r, "p_sign"),
                     "yes" if bool(r["significant"]) else ""])
    alpha = rank["alpha_corrected"].iloc[0]
    return Table(f"{model}: rank validity (every active expert ablated; Spearman of metric and ΔL within a token)",
                 ["layer", "metric", "positions", "mean ρ", "median ρ", "% ρ>0", "p_mean", "p (sign)",
                  "Bonferroni"], rows,
                 notes=("ρ > 0: within a token, experts the metric ranks higher cost more when removed. p_mean: "
                        "test of mean ρ = 0, p (sign): of P(ρ > 0) = P(ρ < 0), both by flipping the signs of whole "
                        "documents (unit of inference: the document). Bonferroni: p_mean ≤ 0.05/"
                        f"{len(rank)} = {alpha:.4g}."),
                 align_left=2)


def _with_arm(progressive: pd.DataFrame) -> pd.DataFrame:
    """The table with an ``arm`` column (summaries from before the arms existed hold the highest arm only)."""
    return progressive if "arm" in progressive.columns else progressive.assign(arm="highest")


def progressive_table(progressive: pd.DataFrame, model: str) -> Table | None:
    """(Layer, arm) x k with mean / median / P95 of ΔL."""
    if progressive is None or progressive.empty:
        return None
    progressive = _with_arm(progressive)
    ks = sorted(progressive["k"].unique())
    progressive = progressive.assign(_order=progressive["arm"].map(arm_rank)).sort_values(["layer", "_order", "k"],
                                                                                          kind="stable")
    rows = []
    for (layer, arm), g in progressive.groupby(["layer", "arm"], sort=False):
        by_k = g.set_index("k")
        cells = []
        for k in ks:
            if k in by_k.index:
                r = by_k.loc[k]
                cells.append(f"{r['mean']:.3f} / {r['median']:.3f} / {r['p95']:.3f}")
            else:
                cells.append("")
        rows.append([f"L{layer}", arm_label(arm), str(int(g["n"].max())), *cells])
    return Table(f"{model}: progressive ablation, ΔL (nats) as mean / median / P95",
                 ["layer", "order", "n", *[f"k={k}" for k in ks]], rows,
                 notes="k: number of active experts removed together at one position, in the order named (by "
                       "routing weight, or a seeded random order per position); every order at the same "
                       "positions. A P95 far above the median marks a heavy upper tail: a few tokens carry much of "
                       "the mean.", align_left=2)


#: Above this many comparisons, the report lists only those that are not equivalent (all are in the CSV).
ARMS_ROWS_SHOWN = 24


def progressive_arms_table(arms: pd.DataFrame, model: str) -> Table | None:
    """Layer x k x pair of removal orders: the paired, document-level comparison and its decision."""
    if arms is None or arms.empty:
        return None
    rows = []
    shown = arms if len(arms) <= ARMS_ROWS_SHOWN else arms[arms["decision"] != "equivalent"]
    for _, r in shown.iterrows():
        rows.append([f"L{r['layer']}", str(int(r["k"])), f"{r['arm_a']} − {r['arm_b']}",
                     f"{int(r['n'])} / {int(r['n_docs'])}", fmt_d(r["mean_diff"]), fmt_ci(r["ci_low"], r["ci_high"]),
                     fmt_d(r["cohens_d"]), fmt_p(r["p_cluster"]), fmt_p(r["p_holm"], mark=False),
                     fmt_nats(_get(r, "sesoi")), fmt_p(r["tost_p_holm"], mark=False), r["decision"]])
    return Table(
        f"{model}: does the removal order matter? Paired comparison of the progressive arms",
        ["layer", "k", "D = ΔL of", "positions / docs", "mean D", "95% CI", "d", "p", "p (Holm)",
         "margin, nats", "p TOST (Holm)", "decision"], rows,
        notes=(f"D: ΔL with the first k experts of one order removed minus ΔL with those of the other, at the same "
               "position. Estimand: mean D over positions; unit of inference: the document (CI: cluster-robust "
               "CR1 t over documents; p: document-level sign-flip test of mean D = 0; * p < .05 uncorrected). "
               f"Equivalence: TOST of |mean D| < margin with the same cluster-robust standard error "
               f"(t, documents − 1 df). Both families are Holm-corrected over the model's {len(arms)} comparisons "
               f"at α = 0.05. Margin: {margin_rule(arms)}. decision: differs (the difference test rejects), "
               "equivalent (TOST rejects: |mean D| < margin shown), inconclusive (neither)."
               + (f" The {len(arms) - len(shown)} equivalent comparisons are not listed here; every comparison is in "
                  "tables/progressive_arms.csv." if len(shown) < len(arms) else "")),
        align_left=3)


def redistribution_table(layers: pd.DataFrame, model: str) -> Table | None:
    if layers is None or layers.empty:
        return None

    def rho(r, column: str) -> str:
        if f"{column}_low" not in r.index:
            return fmt(_get(r, column))
        return f"{fmt(r[column])} {fmt_ci(r[f'{column}_low'], r[f'{column}_high'])}"

    rows = []
    for _, r in layers.sort_values("layer").iterrows():
        rows.append([f"L{r['layer']}", str(int(r["n"])), fmt(r["mean_gap_norm"]), fmt(r["mean_final_gap_norm"]),
                     fmt(r["mean_propagation"], 2), fmt(r["mean_compensation_cos"]), rho(r, "rho_weight_gap"),
                     rho(r, "rho_weight_norm"), rho(r, "rho_gap_compensation"), rho(r, "rho_gap_numerator")])
    return Table(f"{model}: redistribution (what removing one expert takes out, and what the others supply)",
                 ["layer", "ablations", "gap norm", "final gap", "final/gap", "comp. cos", "ρ(weight, gap)",
                  "ρ(weight, ‖E(x)‖)", "ρ(gap, rel. comp.)", "ρ(gap, comp. numerator)"], rows,
                 notes="gap: norm of the removed contribution at the layer output; final gap: the displacement "
                       "that reaches the last layer; comp. cos: cosine of the removed contribution with the "
                       "remaining MoE output. ρ: Spearman over the layer's ablations (one per active expert and "
                       "position) with a 95% bootstrap interval resampling whole documents (unit: document; the "
                       "experts of a token and the tokens of a document move together). The paper's two "
                       "correlations are partly mechanical: gap = weight × ‖E(x)‖ (zero ablation), and relative "
                       "compensation = numerator / gap with numerator = ‖remaining‖ · max(cos, 0); ρ(weight, ‖E(x)‖) "
                       "and ρ(gap, numerator) show what is left without the shared factor.")


def stability_table(stability: pd.DataFrame | None, model: str) -> Table | None:
    if stability is None or stability.empty:
        return None
    if "tau_low" not in stability.columns:  # the one-split format of older runs
        rows = [[f"L{r['layer']}", metric_label(r["metric"]), str(int(r["n_experts"])), fmt(r["tau"]),
                 fmt_ci(r["ci_low"], r["ci_high"])] for _, r in stability.iterrows()]
        return Table(f"{model}: ranking stability (Kendall τ between the corpus's even and odd halves)",
                     ["layer", "metric", "experts", "τ", "95% CI over experts"], rows,
                     notes="Stored by an older moeaudit (one even/odd split); resume the run to replace it with "
                           "the distribution over random half-splits.", align_left=2)
    tags = [c.removeprefix("jaccard_") for c in stability.columns
            if c.startswith("jaccard_") and not c.endswith(("_low", "_high"))]
    rows = []
    for _, r in stability.sort_values(["layer", "metric"], kind="stable").iterrows():
        rows.append([f"L{r['layer']}", metric_label(r["metric"]), str(int(r["n_experts"])), fmt(r["tau"]),
                     fmt_ci(r["tau_low"], r["tau_high"]), fmt(r["reliability"]),
                     *[f"{fmt(r[f'jaccard_{t}'], 2)} ({int(r[f'm_{t}'])})" for t in tags]])
    n_splits = int(stability["n_splits"].max())
    return Table(f"{model}: ranking stability over {n_splits} random document half-splits",
                 ["layer", "metric", "experts", "median τ", "τ 2.5-97.5%", "reliability",
                  *[f"Jaccard bottom {t.replace('_', '/')}·E (m)" for t in tags]], rows,
                 notes="τ: Kendall τ_b between the metric's expert values on two random halves of the documents; "
                       "the range is over splits (its spread, not a confidence interval). Reliability: "
                       "Spearman–Brown step-up 2ρ̄/(1+ρ̄) of the mean split-half Spearman ρ̄, the expected rank "
                       "correlation of the metric on the whole corpus with the metric on another corpus of the same "
                       "size. Jaccard: overlap of the m lowest-ranked experts of the two halves (the set a pruning "
                       "rule removes), mean over splits. A metric that ranks experts differently on two halves of "
                       "one corpus cannot predict anything about them. Unit: document.", align_left=2)


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
        families = run.tables.get("families")
        row = [run.label]
        if audit is not None and len(audit):
            both = int(((audit["p_cluster"] < ALPHA) & (audit["p_signrank_cluster"] < ALPHA)
                        & (np.sign(audit["mean_diff"]) == np.sign(audit["w_diff"]))).sum())
            mde = families[families["family"] == "audit"]["mde_d"] if families is not None and len(families) \
                else pd.Series(dtype=float)
            row += [str(len(audit)), str(int(audit["significant"].sum())), str(both),
                    str(int((audit["decision"] == "below_half_ceiling").sum())), fmt(float(audit["cohens_d"].abs().max())),
                    fmt(float(mde.iloc[0])) if len(mde) else "n/a"]
        else:
            row += ["", "", "", "", "", ""]
        if control is not None and len(control):
            sig = control[control["significant"].astype(bool)]
            row += [", ".join(f"L{x}" for x in sig["layer"]) or "none",
                    fmt(float(control["cohens_d"].abs().max()))]
        else:
            row += ["", ""]
        rows.append(row)
    return Table("Headline numbers per model", ["model", "audit cells", "significant (rule)",
                                                "p < .05 on both, same direction (uncorrected)",
                                                "< ½ of the ceiling", "max |d|", "detectable d (80%)",
                                                "control: significant layers", "control: max |d|"], rows,
                 notes="Significant: E[D] > 0 by the one-sided document-level test of the mean, Holm over the "
                       "model's cells, at a measured level that holds .05 (the tables' decision 'E[D] > 0'). "
                       "Detectable d: the token-level tests' location shift at 80% power (normal D, independent "
                       "positions); the power of the metric-level test is in the validation section.")
