"""The answer-first part of the prune-eval report, rebuilt from ``answer.csv``, ``prune.csv``,
``fold_agreement.csv``, ``allocation.csv``, ``splits.json`` and ``importance.parquet``: one recommendation per
fraction, a verdict of at most ten sentences, the ranked tables, the splits' composition and the folds' agreement,
and the removal cost against the exact single-removal cost."""

from __future__ import annotations

import numpy as np
import pandas as pd

from moeaudit.report._document import Table
from moeaudit.report._prune_lmeval import downstream_clause
from moeaudit.report._style import metric_label
from moeaudit.report._tables import fmt, fmt_ci

RANDOM, CAUSAL, CAUSAL_LOO, NONE = "random", "causal", "causal_loo", "none"
KEYS = ["criterion", "fraction", "seed", "allocation", "method"]


def name(criterion: str) -> str:
    return {CAUSAL: "the causal reference (removal cost)", CAUSAL_LOO: "the exact single-removal cost"}.get(
        criterion, metric_label(criterion))


def pooled_prune(prune: pd.DataFrame) -> pd.DataFrame:
    """prune.csv pooled over folds: per (criterion, fraction, seed, allocation, method) the token-weighted mean
    loss of the folds (every document evaluated once) and its perplexity."""
    prune = prune.assign(_sum=prune["mean_loss"] * prune["n_tokens"])
    out = prune.groupby(KEYS, sort=False).agg(n_tokens=("n_tokens", "sum"), _sum=("_sum", "sum")).reset_index()
    out["mean_loss"] = out.pop("_sum") / out["n_tokens"]
    out["perplexity"] = np.exp(out["mean_loss"])
    return out


def primary_allocation(answer: pd.DataFrame) -> str:
    allocations = list(answer["allocation"].unique())
    return "uniform" if "uniform" in allocations else allocations[0]


def _pct(share: float) -> str:
    return f"{100 * share:.0f}%"


def recommendations(answer: pd.DataFrame, allocations: pd.DataFrame | None, alpha: float) -> list[str]:
    """One sentence per fraction (the primary allocation, method ``delete`` first): the best group of criteria,
    its δ against the causal reference, the share of random prunings it beats, and what another allocation saves."""
    out = []
    primary = primary_allocation(answer)
    for (fraction, method), part in answer[answer["allocation"] == primary].groupby(["fraction", "method"]):
        named = part[part["criterion"] != RANDOM].sort_values("mean_loss")
        if named.empty:
            continue
        top = named[named["group"] == named["group"].min()]
        best = top.iloc[0]
        who = " or ".join(name(c) for c in top["criterion"])
        text = f"At f = {fraction:g}: {who}"
        if len(top) > 1:
            text += f", indistinguishable (best {best['mean_loss']:.3f} nats)"
        else:
            text += f" ({best['mean_loss']:.3f} nats)"
        if np.isfinite(best.get("delta_causal", np.nan)):
            text += (f", δ = {best['delta_causal']:+.3f} [{best['delta_causal_low']:+.3f}, "
                     f"{best['delta_causal_high']:+.3f}] nats against the causal reference "
                     f"({best['decision_causal']})")
        if np.isfinite(best.get("share_random_better", np.nan)):
            beat, low, high = (1 - best["share_random_better"], 1 - best["share_random_better_high"],
                               1 - best["share_random_better_low"])
            text += (f", beating {_pct(beat)} [{_pct(low)}, {_pct(high)}] of {int(best['n_random'])} random "
                     f"prunings ({'better than random' if best['decision_random'] == 'better' else 'worse than random' if best['decision_random'] == 'worse' else 'inconclusive against random'})")
        if allocations is not None and len(allocations):
            alt = allocations[(allocations["criterion"] == best["criterion"]) & (allocations["fraction"] == fraction)
                              & (allocations["method"] == method)]
            for _, a in alt.iterrows():
                verb = "saves" if a["delta_uniform"] < 0 else "costs"
                sure = a["delta_uniform_high"] < 0 or a["delta_uniform_low"] > 0
                text += (f"; {a['allocation']} allocation {verb} {abs(a['delta_uniform']):.4f} nats over {primary} "
                         f"[{a['delta_uniform_low']:+.3f}, {a['delta_uniform_high']:+.3f}]"
                         + ("" if sure else ", interval includes 0"))
        text += downstream_clause(best)
        every = answer[(answer["fraction"] == fraction) & (answer["method"] == method)
                       & (answer["criterion"] != RANDOM)].sort_values("mean_loss")
        if len(every) and every.iloc[0]["allocation"] != primary:
            top_all = every.iloc[0]
            text += (f"; lowest over allocations: {name(top_all['criterion'])} with {top_all['allocation']} "
                     f"allocation ({top_all['mean_loss']:.3f} nats)")
        out.append(text + ".")
    return out


def verdict(answer: pd.DataFrame, agreement: pd.DataFrame | None, prune: pd.DataFrame, alpha: float) -> list[str]:
    """At most ten sentences: the unpruned loss, whether any criterion beats random where random prunings cost
    clearly more, whether the answer holds across folds, and what the tests can and cannot tell."""
    out = []
    base = prune[prune["criterion"] == NONE]
    if len(base):
        loss = float((base["mean_loss"] * base["n_tokens"]).sum() / base["n_tokens"].sum())
        out.append(f"Unpruned, the held-out mean loss is {loss:.3f} nats over {int(base['n_tokens'].sum()):,} "
                   f"predicted tokens ({base['fold'].nunique()} folds, every document evaluated once).")
    primary = answer[(answer["allocation"] == primary_allocation(answer)) & (answer["criterion"] != RANDOM)]
    if "decision_random" in primary:
        better = primary[primary["decision_random"] == "better"]
        per_f = ", ".join(f"{int((better['fraction'] == f).sum())} of {int((primary['fraction'] == f).sum())} at "
                          f"f = {f:g}" for f in sorted(primary["fraction"].unique()))
        out.append(f"Better than the median random pruning (Holm over {len(answer.dropna(subset=['p_random']))} "
                   f"rows, α = {alpha:g}): {per_f}.")
    if "decision_causal" in primary:
        over = primary[primary["decision_causal"] == "better"]
        out.append("Better than the causal reference: " + (", ".join(
            f"{name(r['criterion'])} at f = {r['fraction']:g}" for _, r in over.iterrows()) if len(over)
            else "no criterion") + ".")
    if agreement is not None and len(agreement) and agreement["n_folds"].max() > 1:
        mine = agreement[agreement["allocation"] == primary_allocation(answer)]
        def word(value) -> str:
            return "n/a" if not isinstance(value, (bool, np.bool_)) else "holds" if value else "does not hold"

        holds = [f"f = {r['fraction']:g}: against random {word(r['holds_vs_random'])}, against the causal "
                 f"reference {word(r['holds_vs_causal'])} (fold ρ = {fmt(r['spearman'])}, best per fold "
                 f"{r['best_per_fold']})" for _, r in mine.iterrows()]
        out.append("Across folds, the pooled best criterion's direction: " + "; ".join(holds) + ".")
    return out[:10]


def answer_tables(answer: pd.DataFrame, label: str) -> list[Table]:
    tables = []
    primary = primary_allocation(answer)
    cells = sorted(answer.groupby(["fraction", "allocation", "method"]),
                   key=lambda kv: (kv[0][1] != primary, kv[0][1], kv[0][0], kv[0][2]))
    for (fraction, allocation, method), part in cells:
        rows = []
        for _, r in part.sort_values("mean_loss").iterrows():
            random = r["criterion"] == RANDOM
            rows.append(["" if random else str(int(r["rank"])), "median random" if random else name(r["criterion"]),
                         "" if random else str(int(r["group"])), f"{r['mean_loss']:.3f}",
                         fmt(r["delta_causal"]), fmt_ci(r["delta_causal_low"], r["delta_causal_high"]),
                         fmt(r["share_random_better"]),
                         fmt_ci(r["share_random_better_low"], r["share_random_better_high"]),
                         str(r["decision_random"]) if not random else ""])
        tables.append(Table(
            f"{label}: f = {fraction:g}, {allocation} allocation, {method}",
            ["rank", "criterion", "group", "mean loss", "δ causal", "95% CI", "random ≤", "95% CI", "vs random"],
            rows, align_left=2,
            notes=("Pooled over folds (every document evaluated once, by criteria computed without it). group: "
                   "criteria whose paired difference with the group's best has a 95% document-clustered interval "
                   "including 0 cannot be told apart. δ causal: mean loss minus the causal reference's (document "
                   "bootstrap interval). random ≤: the share of random prunings of the same size and allocation "
                   "whose mean loss is at most the criterion's (estimand P(random does at least as well); interval "
                   "carries seed and document uncertainty); 'vs random' decides P < 1/2 (better) or > 1/2 (worse) "
                   "with Holm over every row of answer.csv.")))
    return tables


def splits_table(splits: dict, label: str) -> Table | None:
    folds = splits.get("folds")
    if not folds:
        return None
    rows = []
    for f in folds:
        comp = f.get("composition", {})
        for side in ("calibration", "evaluation"):
            counts = comp.get(side, {})
            rows.append([str(f["fold"]), side, str(len(f[side])), ", ".join(f"{k} {v}" for k, v in counts.items())])
    return Table(f"{label}: documents of each fold", ["fold", "split", "documents", "composition"], rows,
                 align_left=4, notes=(f"Documents shuffled with split_seed = {splits.get('split_seed')}, stratified "
                                      f"by {splits.get('stratified_by') or 'nothing (no label)'}, dealt into "
                                      f"{splits.get('n_folds')} folds; splits.json lists every document id."))


def agreement_table(agreement: pd.DataFrame, label: str) -> Table:
    rows = [[f"{r['fraction']:g}", r["allocation"], r["method"], fmt(r["spearman"]), str(r["best_per_fold"]),
             str(r["best_beats_random_median"]), "yes" if r["holds_vs_random"] else "no"]
            for _, r in agreement.iterrows()]
    return Table(f"{label}: agreement between folds", ["f", "allocation", "method", "ρ folds", "best per fold",
                                                       "pooled best < random median", "holds"], rows, align_left=3,
                 notes="ρ: Spearman correlation of the criteria's mean losses between folds (mean over fold pairs). "
                       "'pooled best < random median': per fold, whether the pooled best criterion's loss is below "
                       "the median random pruning's; 'holds' when every fold agrees.")


def reference_table(importance: pd.DataFrame, label: str) -> Table | None:
    """Removal cost (estimated from the importance map) and the conditional mean ΔL against the exact
    single-removal cost, per fold: Spearman ρ over every (layer, expert)."""
    if importance is None or "loo_cost" not in importance:
        return None
    from moeaudit.stats import spearman

    rows = []
    for fold, part in importance.groupby("fold" if "fold" in importance else np.zeros(len(importance))):
        rho_cost = spearman(part["removal_cost"].to_numpy(), part["loo_cost"].to_numpy())[0]
        ok = part["mean_delta"].notna()
        rho_mean = spearman(part.loc[ok, "mean_delta"].to_numpy(), part.loc[ok, "loo_cost"].to_numpy())[0]
        rows.append([str(int(fold)), str(len(part)), fmt(rho_cost), fmt(rho_mean),
                     str(int(part["never_routed"].sum()))])
    return Table(f"{label}: the causal reference against the exact single-removal cost",
                 ["fold", "experts", "ρ(removal cost, exact)", "ρ(mean ΔL when routed, exact)", "never routed"],
                 rows, notes="Exact single-removal cost: the calibration split's mean loss with the expert removed "
                             "alone minus the unpruned model's (loo.parquet). Spearman ρ over every (layer, expert).")
