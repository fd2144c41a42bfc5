"""Reports of ``moeaudit map`` and ``moeaudit prune-eval``, rebuilt from the files of their run directories: the
importance map, perplexity against fraction per criterion, the paired tests and a verdict whose every sentence is
one test's decision (or a plain description of a measured number)."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from moeaudit.errors import RunDirectoryError
from moeaudit.report import _prune_figures as F
from moeaudit.report._document import Block, Heading, Paragraph, Table, figure_block, write_document
from moeaudit.report._prune_extra import extra_blocks, first_method, only_method
from moeaudit.report._style import metric_label
from moeaudit.report._tables import fmt, fmt_ci
from moeaudit.rundir import RunDirectory

RANDOM, CAUSAL, NONE = "random", "causal", "none"


def _label(manifest: dict) -> str:
    from moeaudit.config import model_label

    config = manifest.get("config", {})
    return model_label(str(config.get("model", "model")), config.get("name"))


def _read_csv(run_dir: RunDirectory, name: str) -> pd.DataFrame | None:
    """A stored table, or ``None``; one edited or damaged outside moeaudit (it does not parse, or a numeric column
    holds text) is refused naming the file, the cell and the fix."""
    path = run_dir.path / name
    try:
        table = pd.read_csv(path) if path.is_file() else None
    except pd.errors.EmptyDataError:  # a table with no rows (e.g. no criterion besides random)
        return None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise _damaged_table(path, str(exc).strip().splitlines()[0][:120]) from None
    for column in [] if table is None else [c for c in table.columns if table[c].dtype.kind == "O"]:
        values = table[column].dropna()
        numbers = pd.to_numeric(values, errors="coerce")
        numeric = numbers.notna().mean() >= 0.5 or _NUMERIC.match(str(column))
        if numeric and numbers.isna().any():  # a numeric column with text in it
            row = int(numbers.index[numbers.isna()][0])
            raise _damaged_table(path, f"column {column!r}, row {row + 2}: {values[row]!r} is not a number")
    return table


#: Columns the prune-eval tables always write as numbers (a hand edit can leave a single row's text in them).
_NUMERIC = re.compile(r"^(fraction|mean_|median_|delta|loss|ppl|perplexity|p_|ci_|se_|n_|d_|seed)")


def _damaged_table(path, problem: str) -> RunDirectoryError:
    return RunDirectoryError(f"{str(path)!r} is damaged ({problem}); it was edited or truncated outside moeaudit. "
                             "Delete it and run the same prune-eval command again to rewrite it.")


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

def _results_table(pooled: pd.DataFrame, label: str, allocation: str) -> Table:
    prune = pooled[pooled["allocation"].isin([allocation]) | (pooled["criterion"] == NONE)]
    fractions = sorted(prune.loc[prune["criterion"] != NONE, "fraction"].unique())
    rows = []
    for criterion, part in prune[prune["criterion"] != NONE].groupby("criterion", sort=False):
        cells = []
        for f in fractions:
            g = part[part["fraction"] == f]
            if g.empty:
                cells.append("n/a")
            elif criterion == RANDOM:
                q = g["perplexity"].quantile([0.05, 0.5, 0.95]).to_numpy()
                cells.append(f"{q[1]:.2f} [{q[0]:.2f}, {q[2]:.2f}]")
            else:
                cells.append(f"{g['perplexity'].iloc[0]:.2f}")
        rows.append([metric_label(criterion), *cells])
    base = prune[prune["criterion"] == NONE]
    note = f"Unpruned: {base['perplexity'].iloc[0]:.2f}. " if len(base) else ""
    return Table(f"{label}: held-out perplexity after pruning ({allocation} allocation)",
                 ["criterion", *[f"f = {f:g}" for f in fractions]], rows,
                 notes=note + "exp(token-weighted mean next-token loss over every evaluated token, pooled over "
                 "folds). random: median [5%, 95% quantile] over seeds.")


def write_prune_report(path: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """``report.md`` / ``report.html`` / ``figures/`` of a ``moeaudit prune-eval`` directory (into ``out``, default
    the directory itself): the answer first (recommendations, verdict, ranked tables, figure), details below."""
    from moeaudit.report import _prune_answer as A

    run_dir = RunDirectory(path)
    manifest = run_dir.manifest()
    config = manifest.get("config", {})
    label = _label(manifest)
    alpha = float(config.get("alpha", 0.05))
    prune, answer = _read_csv(run_dir, "prune.csv"), _read_csv(run_dir, "answer.csv")
    agreement, allocations = _read_csv(run_dir, "fold_agreement.csv"), _read_csv(run_dir, "allocation.csv")
    shown = first_method(prune, config)  # several removal methods: the answer sections show the first
    prune, answer, agreement, allocations = (only_method(t, shown) for t in (prune, answer, agreement, allocations))
    splits = run_dir.read_json("splits.json") or {}
    pruning = manifest.get("pruning", {})
    ev = splits.get("evaluation", {})
    groups = pruning.get("group_balanced")
    group_text = (f" The router is group-limited ({groups['n_group']} groups, top {groups['topk_group']} groups per "
                  "token), so every group loses the same number of experts (group-balanced pruning)."
                  if groups else "")
    removed = ", ".join(f"f = {float(f):g}: {m}" for f, m in pruning.get("removed_per_layer", {}).items())
    pooled = A.pooled_prune(prune)
    primary = A.primary_allocation(answer)
    blocks: list[Block] = [_generated(run_dir), Paragraph(
        "Which criterion should prune this model's experts, at which fraction? Every pruned model was evaluated "
        f"in memory on held-out documents ({ev.get('n_docs', '?')} documents of `{ev.get('source', '?')}`, "
        f"{ev.get('n_predicted_tokens', 0):,} predicted tokens, {splits.get('n_folds', 1)} cross-fitting folds: "
        "each document evaluated once, by criteria computed on the other folds). Experts removed per pruned layer "
        f"(uniform allocation; other allocations remove the same total): {removed}.{group_text}")]
    blocks += [Heading("Recommendation"), *[Paragraph(p) for p in A.recommendations(answer, allocations, alpha)]]
    blocks += [Heading("Verdict"), Paragraph(" ".join(A.verdict(answer, agreement, prune, alpha)))]
    fig = F.answer_figure(answer, pooled, label, primary)
    if fig is not None:
        blocks.append(figure_block("answer", "Held-out mean loss of every criterion (95% interval: the causal "
                                   "reference's loss plus the interval of δ against it), criteria sorted; grey bands: "
                                   "the random prunings' 5–95% and 25–75% quantiles, dashed: their median; dotted: "
                                   "unpruned.", fig))
    blocks += [Heading("Ranked criteria"), *A.answer_tables(answer, label)]
    if allocations is not None and len(allocations):
        rows = [[metric_label(r["criterion"]), f"{r['fraction']:g}", r["allocation"], f"{r['mean_loss']:.3f}",
                 f"{r['uniform_mean_loss']:.3f}", fmt(r["delta_uniform"]),
                 fmt_ci(r["delta_uniform_low"], r["delta_uniform_high"])] for _, r in allocations.iterrows()]
        blocks += [Heading("Allocations at equal budget"), Table(
            f"{label}: allocation against uniform at the same number of removed experts",
            ["criterion", "f", "allocation", "mean loss", "uniform", "δ", "95% CI"], rows, align_left=3,
            notes="global: one ranking of every layer's experts by the criterion's raw value (each criterion is the "
                  "same quantity at every layer, so layers where it is small lose most); causal: per-layer counts "
                  "from the calibration split's removal costs (the cheapest experts over all layers), the "
                  "criterion choosing within each layer. δ: mean loss minus the uniform allocation's, pooled over "
                  "folds, document bootstrap interval; random prunings under each allocation: the shares in the ranked tables.")]
    table = A.splits_table(splits, label)
    blocks += [Heading("Splits and folds")] + ([table] if table is not None else [])
    if agreement is not None and len(agreement):
        blocks.append(A.agreement_table(agreement, label))
    fig = F.perplexity_curves(pooled[pooled["allocation"].isin([primary]) | (pooled["criterion"] == NONE)], label)
    if fig is not None:
        blocks += [Heading("Perplexity against fraction"), figure_block(
            "perplexity", "Held-out perplexity (pooled over folds) against the fraction of experts removed per layer, "
            "one panel per criterion; grey: random pruning (range and mean of the seeds); black: the causal "
            "reference; dotted: unpruned.", fig), _results_table(pooled, label, primary)]
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
        lm_answer = _read_csv(run_dir, "lm_eval_answer.csv")
        if lm_answer is not None and not lm_answer.empty:
            from moeaudit.report._prune_lmeval import lm_answer_table

            blocks.append(lm_answer_table(lm_answer, label))
    blocks += extra_blocks(run_dir, label, alpha)
    importance = run_dir.read_parquet("importance.parquet")
    if importance is not None:
        first = importance[importance["fold"] == importance["fold"].min()] if "fold" in importance else importance
        reference = A.reference_table(importance, label)
        blocks += [Heading("Causal importance map (calibration split of fold "
                           f"{int(first['fold'].iloc[0]) if 'fold' in first else 0})"),
                   *([reference] if reference is not None else []), *_importance_blocks(first, config, label)]
    blocks += [Heading("How to read this report"), Paragraph(
        "Each criterion ranks every layer's experts on a fold's calibration documents (higher = more important); at "
        "a fraction f the uniform allocation removes the m = floor(f·E + ½) lowest-ranked experts of each layer, so "
        "the router chooses among the rest exactly as a checkpoint without them would. `random` ranks experts by a "
        "seeded random draw (one pruned model per seed); `causal` by each expert's removal cost, the expected loss "
        "increase per calibration token when it is removed alone (routed share × mean ΔL when routed). A criterion "
        "is **better than random** when the share of random prunings that do at least as well is credibly below "
        "one half (it beats the median random pruning), a statement about the distribution of random prunings, "
        "not their mean. 'Inconclusive' never means 'equal'.")]
    return write_document(f"moeaudit prune-eval: {label}", blocks, out or run_dir.path)


def _lm_table(lm: pd.DataFrame, label: str) -> Table:
    lm = lm[lm["allocation"] == "uniform"] if "allocation" in lm else lm
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
