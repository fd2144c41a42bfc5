"""Reports of ``moeaudit map`` and ``moeaudit prune-eval``, rebuilt from the files of their run directories: the
importance map, perplexity against fraction per criterion, the paired tests and a verdict whose every sentence is
one test's decision (or a plain description of a measured number)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from moeaudit.report import _prune_figures as F
from moeaudit.report._document import Block, Heading, Paragraph, Table, figure_block, write_document
from moeaudit.report._prune_extra import extra_blocks, first_method, only_method
from moeaudit.report._style import metric_label
from moeaudit.report._tables import fmt, fmt_ci, fmt_p
from moeaudit.rundir import RunDirectory

RANDOM, CAUSAL, NONE = "random", "causal", "none"


def _label(manifest: dict) -> str:
    from moeaudit.config import model_label

    config = manifest.get("config", {})
    return model_label(str(config.get("model", "model")), config.get("name"))


def _read_csv(run_dir: RunDirectory, name: str) -> pd.DataFrame | None:
    path = run_dir.path / name
    try:
        return pd.read_csv(path) if path.is_file() else None
    except pd.errors.EmptyDataError:  # a table with no rows (e.g. no criterion besides random)
        return None


def _generated(run_dir: RunDirectory) -> Paragraph:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return Paragraph(f"Generated {now} from `{run_dir.path}`.")


def _importance_blocks(importance: pd.DataFrame, config: dict, label: str) -> list[Block]:
    rows = []
    for layer, part in importance.groupby("layer", sort=True):
        routed = part[~part["never_routed"]]
        top = routed.sort_values("mean_delta", ascending=False).head(1)
        above = int((routed["ci_low"] > 0).sum())
        rows.append([f"L{layer}", str(int(part["n_routed"].sum())),
                     str(int(part["never_routed"].sum())), str(above),
                     f"{int(top['expert'].iloc[0])} ({fmt(float(top['mean_delta'].iloc[0]))})" if len(top) else "n/a",
                     fmt(float(routed["mean_delta"].min())) if len(routed) else "n/a",
                     fmt(float(routed["share_hurts"].mean())) if len(routed) else "n/a"])
    table = Table(f"{label}: causal importance per layer",
                  ["layer", "ablations", "never routed", "CI above 0", "most important (mean ΔL)",
                   "lowest mean ΔL", "mean share ΔL > 0"], rows,
                  notes=(f"Every active expert removed alone ({config.get('mode', '?')} mode, {config.get('scope', '?')}"
                         f" scope) at {config.get('n', '?')} sampled positions per layer. mean ΔL: mean over the "
                         "positions routing the expert; CI: 95%, clustered by document (CR1, t with documents − 1 "
                         "df). 'CI above 0': experts whose removal raises the loss with the interval excluding 0 "
                         "(uncorrected). Never routed: no sampled position chose the expert, so it has no measured "
                         "importance. Per-expert values: importance.parquet."))
    fig = F.importance_heatmap(importance, label)
    blocks: list[Block] = [table]
    if fig is not None:
        blocks.append(figure_block("importance", "Causal importance map: mean ΔL when each expert is removed alone "
                                   "(top; red raises the loss) and the share of positions where it does (bottom); "
                                   "× marks experts never routed at a sampled position.", fig))
    return blocks


def write_map_report(path: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """``report.md`` / ``report.html`` / ``figures/`` of a ``moeaudit map`` directory (into ``out``, default the
    directory itself)."""
    run_dir = RunDirectory(path)
    manifest = run_dir.manifest()
    label = _label(manifest)
    importance = run_dir.read_parquet("importance.parquet")
    config = manifest.get("config", {})
    never = int(importance["never_routed"].sum())
    blocks: list[Block] = [_generated(run_dir), Paragraph(
        f"Which experts matter, measured causally: at {config.get('n')} sampled positions per layer of the "
        f"{config.get('n_docs')} calibration documents of `{config.get('corpus')}`, every routed expert was removed "
        f"alone and the change of the next-token loss recorded. {len(importance)} (layer, expert) pairs; {never} "
        "were never routed at a sampled position.")]
    blocks += [Heading("Importance"), *_importance_blocks(importance, config, label)]
    blocks += [Heading("How to read this report"), Paragraph(
        "ΔL is the change of the next-token cross-entropy at a sampled position when one routed expert is removed "
        f"there ({config.get('mode')} mode: "
        + ("the router chooses again among the remaining experts, as in a pruned model" if config.get("mode") ==
           "reroute" else "its weighted output is set to zero" if config.get("mode") == "zero" else
           "the remaining weights are rescaled to the original sum")
        + "). An expert's mean ΔL averages over the positions that route it, so it is conditional on being chosen; "
        "how often that happens is its n routed. `moeaudit prune-eval` ranks experts by this mean ΔL as its causal "
        "reference.")]
    return write_document(f"moeaudit map: {label}", blocks, out or run_dir.path)


# ---- prune-eval --------------------------------------------------------------------------------------------------

def _fractions_text(fractions: list[float], all_fractions: list[float]) -> str:
    fractions, every = sorted(fractions), sorted(all_fractions)
    if fractions == every:
        return "every fraction" if len(every) > 1 else f"f = {every[0]:g}"
    if len(fractions) > 1 and fractions == [f for f in every if f <= fractions[-1]]:
        return f"f ≤ {fractions[-1]:g}"
    if len(fractions) > 1 and fractions == [f for f in every if f >= fractions[0]]:
        return f"f ≥ {fractions[0]:g}"
    return "f = " + ", ".join(f"{f:g}" for f in fractions)


def _clause(part: pd.DataFrame, decision_col: str, delta_col: str, all_fractions: list[float],
            what: str) -> list[str]:
    out = []
    decided = set()
    for decision, word in (("better", "better than"), ("worse", "worse than")):
        hit = part[part[decision_col] == decision].sort_values("fraction")
        if len(hit):
            decided |= set(hit["fraction"])
            deltas = ", ".join(f"{d:+.3f}" for d in hit[delta_col])
            out.append(f"{word} {what} at {_fractions_text(list(hit['fraction']), all_fractions)} "
                       f"(δ = {deltas} nats)")
        if decision_col == "vs_random" and "vs_random_docs" in part:
            docs = part[(part["vs_random_docs"] == decision) & (part[decision_col] != decision)]
            if len(docs):
                decided |= set(docs["fraction"])
                deltas = ", ".join(f"{d:+.3f}" for d in docs[delta_col])
                out.append(f"{word} the mean of these random prunings at "
                           f"{_fractions_text(list(docs['fraction']), all_fractions)} (δ = {deltas} nats) but not "
                           "outside their spread (seed-level test inconclusive)")
    rest = part[~part["fraction"].isin(decided) & (part[decision_col] != "n/a")]
    if len(rest):
        out.append(f"inconclusive against {what} at {_fractions_text(list(rest['fraction']), all_fractions)}")
    return out


def _names(criteria: list[str]) -> str:
    names = [f"**{metric_label(c)}**" if c != CAUSAL else "the causal reference" for c in criteria]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def prune_verdict(prune: pd.DataFrame, tests: pd.DataFrame, alpha: float) -> list[str]:
    """Plain-language sentences, each one a test's decision or a description of measured mean losses; criteria
    with the same decisions share a sentence."""
    out = []
    base = prune[prune["criterion"] == NONE]
    fractions = sorted(prune.loc[prune["criterion"] != NONE, "fraction"].unique())
    if len(base):
        b = base.iloc[0]
        out.append(f"Unpruned, the model's held-out mean loss is {b['mean_loss']:.3f} nats (perplexity "
                   f"{b['perplexity']:.2f}) over {int(b['n_tokens']):,} predicted tokens.")
    random = prune[prune["criterion"] == RANDOM]
    if len(random):
        desc = "; ".join(f"f = {f:g}: {g['mean_loss'].mean():.3f} nats (seeds {g['mean_loss'].min():.3f}–"
                         f"{g['mean_loss'].max():.3f})" for f, g in random.groupby("fraction"))
        out.append(f"Random pruning ({random['seed'].nunique()} seeds) measured {desc}.")
    pruned = prune[~prune["criterion"].isin([NONE, RANDOM])]
    if len(pruned):
        best = [f"f = {f:g}: {metric_label(g.loc[g['mean_loss'].idxmin(), 'criterion'])} "
                f"({g['mean_loss'].min():.3f} nats)" for f, g in pruned.groupby("fraction")]
        out.append("Lowest held-out loss among the criteria: " + "; ".join(best) + ".")
    if tests is None or tests.empty:
        return out
    sentences: dict[str, list[str]] = {}
    for criterion, part in tests.groupby("criterion", sort=False):
        clauses = []
        if "vs_random" in part:
            clauses += _clause(part, "vs_random", "delta_random", fractions, "random")
        if "vs_causal" in part and criterion != CAUSAL:
            clauses += _clause(part, "vs_causal", "delta_causal", fractions, "the causal reference")
        if clauses:
            sentences.setdefault("; ".join(clauses), []).append(criterion)
    for tail, criteria in sentences.items():
        verb = "is" if len(criteria) == 1 else "are"
        text = f"{_names(criteria)} {verb} {tail}."
        out.append(text[0].upper() + text[1:])
    if "vs_random" in tests:
        beat = [c for c, p in tests.groupby("criterion", sort=False)
                if c != CAUSAL and (p["vs_random"] == "better").all()]
        out.append(f"Better than random at every fraction: {_names(beat) if beat else 'no criterion'}.")
    if "vs_causal" in tests:
        over = list(pd.unique(tests.loc[tests["vs_causal"] == "better", "criterion"]))
        out.append("Better than the causal reference at some fraction: "
                   f"{_names(over) if over else 'no criterion'}.")
    out.append(f"Claims hold at a family-wise α = {alpha:g} (Holm over criteria × fractions); 'better than random' "
               "needs the document-level tests (cluster-robust t and sign-flip) and the seed-level test to agree, so "
               "'inconclusive' also covers a criterion inside the spread of random prunings, which few seeds "
               "estimate poorly.")
    return out


def _results_table(prune: pd.DataFrame, label: str) -> Table:
    fractions = sorted(prune.loc[prune["criterion"] != NONE, "fraction"].unique())
    rows = []
    for criterion, part in prune[prune["criterion"] != NONE].groupby("criterion", sort=False):
        cells = []
        for f in fractions:
            g = part[part["fraction"] == f]
            if g.empty:
                cells.append("n/a")
            elif criterion == RANDOM:
                cells.append(f"{g['perplexity'].mean():.2f} ± {g['perplexity'].std(ddof=1):.2f}")
            else:
                cells.append(f"{g['perplexity'].iloc[0]:.2f}")
        rows.append([metric_label(criterion), *cells])
    base = prune[prune["criterion"] == NONE]
    note = f"Unpruned: {base['perplexity'].iloc[0]:.2f}. " if len(base) else ""
    return Table(f"{label}: held-out perplexity after pruning", ["criterion", *[f"f = {f:g}" for f in fractions]],
                 rows, notes=note + "exp(token-weighted mean next-token loss over every predicted token of the "
                 "evaluation split). random: mean ± sd over seeds.")


def _tests_table(tests: pd.DataFrame, label: str, alpha: float) -> Table:
    rows = []
    for _, r in tests.iterrows():
        rows.append([metric_label(r["criterion"]), f"{r['fraction']:g}", fmt(r.get("delta_random", np.nan)),
                     fmt_ci(r.get("ci_low_random", np.nan), r.get("ci_high_random", np.nan)),
                     fmt_p(r.get("p_t_random_holm", np.nan), False), fmt_p(r.get("p_signflip_random_holm", np.nan),
                                                                           False),
                     fmt_p(r.get("p_seed_holm", np.nan), False), str(r.get("vs_random", "n/a")),
                     fmt(r.get("delta_causal", np.nan)),
                     fmt_ci(r.get("ci_low_causal", np.nan), r.get("ci_high_causal", np.nan)),
                     fmt_p(r.get("p_t_causal_holm", np.nan), False),
                     fmt_p(r.get("p_signflip_causal_holm", np.nan), False), str(r.get("vs_causal", "n/a"))])
    return Table(
        f"{label}: paired tests against random pruning and the causal reference",
        ["criterion", "f", "δ random", "95% CI", "p_t", "p_flip", "p_seed", "vs random", "δ causal", "95% CI",
         "p_t", "p_flip", "vs causal"], rows, align_left=2,
        notes=("δ: token-weighted mean loss of the criterion's pruned model minus that of the random seeds' mean "
               "(δ random) or of the causal reference (δ causal), in nats; negative is better. Unit of inference: "
               "the document (p_t: cluster-robust t, documents − 1 df; p_flip: document sign-flip permutation; CI: "
               "document bootstrap) and, for p_seed, the random seed (the criterion's mean loss against the seeds' "
               f"as one more draw, t with seeds − 1 df). p-values Holm-corrected over the table's rows; a decision "
               f"needs every p of its side below α = {alpha:g}."))


def write_prune_report(path: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """``report.md`` / ``report.html`` / ``figures/`` of a ``moeaudit prune-eval`` directory (into ``out``, default
    the directory itself)."""
    run_dir = RunDirectory(path)
    manifest = run_dir.manifest()
    config = manifest.get("config", {})
    label = _label(manifest)
    alpha = float(config.get("alpha", 0.05))
    prune, tests = _read_csv(run_dir, "prune.csv"), _read_csv(run_dir, "tests.csv")
    shown = first_method(prune, config)  # several removal methods: the main sections show the first
    prune, tests = only_method(prune, shown), only_method(tests, shown)
    splits = run_dir.read_json("splits.json") or {}
    pruning = manifest.get("pruning", {})
    cal, ev = splits.get("calibration", {}), splits.get("evaluation", {})
    groups = pruning.get("group_balanced")
    group_text = (f" The router is group-limited ({groups['n_group']} groups, top {groups['topk_group']} groups per "
                  "token), so every group loses the same number of experts (group-balanced pruning)."
                  if groups else "")
    removed = ", ".join(f"f = {float(f):g}: {m}" for f, m in pruning.get("removed_per_layer", {}).items())
    blocks: list[Block] = [_generated(run_dir), Paragraph(
        "Does pruning experts by a criterion beat pruning at random, and how far is it from pruning by measured "
        f"causal importance? Criteria were computed on {cal.get('n_docs', '?')} calibration documents of "
        f"`{cal.get('source', '?')}` ({cal.get('n_tokens', 0):,} tokens); every pruned model was evaluated in memory "
        f"on {ev.get('n_docs', '?')} disjoint documents of `{ev.get('source', '?')}` "
        f"({ev.get('n_predicted_tokens', 0):,} predicted tokens). Experts removed per pruned layer: {removed}."
        f"{group_text}")]
    blocks += [Heading("Verdict"), *[Paragraph(p) for p in prune_verdict(prune, tests, alpha)]]
    fig = F.perplexity_curves(prune, label)
    if fig is not None:
        blocks += [Heading("Perplexity against fraction"), figure_block(
            "perplexity", "Held-out perplexity against the fraction of experts removed per layer, one panel per "
            "criterion; grey: random pruning (range and mean of the seeds); black: the causal reference; dotted: "
            "unpruned.", fig)]
    blocks += [Heading("Results"), _results_table(prune, label)]
    if tests is not None and not tests.empty:
        blocks.append(_tests_table(tests, label, alpha))
    effects = only_method(_read_csv(run_dir, "per_layer.csv"), shown)
    if effects is not None:
        fig = F.per_layer_curves(effects, label)
        blocks += [Heading("Pruning one layer at a time")]
        if fig is not None:
            blocks.append(figure_block("per_layer", "Loss increase over the unpruned model when only one layer is "
                                       "pruned (token-weighted mean, nats), per fraction.", fig))
    lm = _read_csv(run_dir, "lm_eval.csv")
    if lm is not None and not lm.empty:
        blocks += [Heading("Downstream tasks (lm-evaluation-harness)"), _lm_table(lm, label)]
    blocks += extra_blocks(run_dir, label, alpha)
    importance = run_dir.read_parquet("importance.parquet")
    if importance is not None:
        blocks += [Heading("Causal importance map (calibration split)"),
                   *_importance_blocks(importance, config, label)]
    blocks += [Heading("How to read this report"), Paragraph(
        "Each criterion ranks every layer's experts on the calibration documents (higher = more important); at a "
        "fraction f the m = floor(f·E + ½) lowest-ranked experts of each layer are removed, so the router chooses among "
        "the rest exactly as a checkpoint without them would. `random` ranks experts by a seeded random draw (one pruned "
        "model per seed: the band); `causal` by the mean loss increase measured when each expert is removed alone "
        "(the importance map). Every pruned model's next-token loss is measured on held-out documents. A criterion "
        "is **better than random** only when it beats the random seeds' mean on these documents (document-level "
        "tests) and lies outside the spread of the random seeds (seed-level test); 'better than the mean of these "
        "random prunings … but not outside their spread' means the first holds and the second could not be shown "
        "with this many seeds. 'Inconclusive' never means 'equal'.")]
    return write_document(f"moeaudit prune-eval: {label}", blocks, out or run_dir.path)


def _lm_table(lm: pd.DataFrame, label: str) -> Table:
    agg = (lm.groupby(["task", "metric", "criterion", "fraction"], sort=False)["value"]
           .agg(["mean", "count"]).reset_index())
    rows = [[r["task"], r["metric"], metric_label(r["criterion"]), f"{r['fraction']:g}",
             f"{r['mean']:.4g}" + (f" (mean of {int(r['count'])} seeds)" if r["count"] > 1 else "")]
            for _, r in agg.iterrows()]
    return Table(f"{label}: lm-evaluation-harness scores of every pruned model",
                 ["task", "metric", "criterion", "f", "value"], rows, align_left=3,
                 notes="Each pruned model scored in memory through lm-eval's Hugging Face wrapper; per-seed values "
                       "and standard errors in lm_eval.csv.")


#: The report writer of each run-directory kind this module owns (``manifest["tool"]``).
REPORTERS = {"moeaudit map": write_map_report, "moeaudit prune-eval": write_prune_report}
