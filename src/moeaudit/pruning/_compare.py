"""The measured results of a prune-eval run: held-out mean loss and perplexity of every pruned model per fold, the
answer pooled over folds (each criterion against the random prunings and the causal reference, and which criteria
cannot be told apart), the folds' agreement, and per-layer loss increases.

Mean loss is token-weighted: the mean next-token cross-entropy over every predicted token of the evaluation split
(documents contribute in proportion to their length); perplexity is its exponential. Pooled over folds, every
document is evaluated once, by a pruned model whose criterion never saw it (cross-fitting): the per-token losses of
the folds are concatenated.

Per (criterion, fraction, allocation, method), pooled (``answer.csv``):

- **vs random**: :func:`moeaudit.pruning._random_ref.share_random_better` against the random prunings of the same
  fraction, allocation and method (estimand: P(a random pruning does at least as well); unit: seed and document);
  ``decision_random`` better / worse / inconclusive from its p, Holm-corrected over the table's rows.
- **vs causal**: δ = mean loss(criterion) − mean loss(causal reference of the same allocation and method), with a
  document-bootstrap interval, the cluster-robust t and the document sign-flip test (both Holm-corrected; a decision
  needs both). Unit of inference: the document.
- **group**: criteria sorted by mean loss; group 1 is the best and every criterion whose paired difference with it
  has a 95% cluster-robust interval (documents) including 0, group 2 starts at the best criterion left, and so on.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from moeaudit.pruning._config import CAUSAL, NONE, RANDOM
from moeaudit.pruning._random_ref import share_random_better
from moeaudit.pruning._units import KEY_COLUMNS, PruneUnit
from moeaudit.stats import clustered_difference, clustered_mean, correct, spearman

PRUNE_COLUMNS = [*KEY_COLUMNS, "n_tokens", "mean_loss", "perplexity"]
ANSWER_COLUMNS = ["criterion", "fraction", "allocation", "method", "mean_loss", "perplexity", "rank", "group",
                  "delta_causal", "delta_causal_low", "delta_causal_high", "p_causal_t", "p_causal_signflip",
                  "decision_causal", "share_random_better", "share_random_better_low", "share_random_better_high",
                  "p_random", "decision_random", "n_random", "n_tokens", "n_docs", "n_folds"]
BETTER, WORSE, INCONCLUSIVE = "better", "worse", "inconclusive"
Arm = tuple  # (criterion, fraction, seed, allocation, method, layer)


def loss_tables(units: Sequence[PruneUnit], losses: Mapping[str, np.ndarray]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``prune.csv`` (one row per pruned model and fold; the unpruned model as criterion ``none``) and
    ``prune_per_layer.csv`` (one layer at a time, with its ``layer``)."""
    rows, per_layer = [], []
    for u in units:
        loss = losses[u.loss_key]
        mean = float(loss.mean())
        row = [u.criterion, u.fraction, u.seed, u.fold, u.allocation, u.method, int(loss.size), mean,
               float(np.exp(mean))]
        (rows if u.layer is None else per_layer).append(row if u.layer is None else [*row[:6], u.layer, *row[6:]])
    return (pd.DataFrame(rows, columns=PRUNE_COLUMNS),
            pd.DataFrame(per_layer, columns=[*KEY_COLUMNS, "layer", *PRUNE_COLUMNS[6:]]))


def _arm(u: PruneUnit) -> Arm:
    return (u.criterion, u.fraction, u.seed, u.allocation, u.method, u.layer)


def pooled_losses(units: Sequence[PruneUnit], losses: Mapping[str, np.ndarray],
                  eval_docs: Mapping[int, np.ndarray]) -> tuple[dict[Arm, np.ndarray], np.ndarray]:
    """Per arm (a unit without its fold), the per-token losses of every fold concatenated in fold order, and the
    document id of each of those tokens. Arms missing a fold are left out."""
    folds = sorted(eval_docs)
    by_arm: dict[Arm, dict[int, PruneUnit]] = defaultdict(dict)
    for u in units:
        by_arm[_arm(u)][u.fold] = u
    docs = np.concatenate([eval_docs[f] for f in folds])
    return ({arm: np.concatenate([losses[per[f].loss_key] for f in folds]) for arm, per in by_arm.items()
             if all(f in per for f in folds)}, docs)


def _groups(names: list[str], pooled: Mapping[str, np.ndarray], docs: np.ndarray) -> dict[str, int]:
    left = sorted(names, key=lambda c: float(pooled[c].mean()))
    out, group = {}, 0
    while left:
        group += 1
        leader = left[0]
        same = [leader]
        for c in left[1:]:
            cm = clustered_mean(pooled[c] - pooled[leader], docs)
            if not cm.ci_low > 0:
                same.append(c)
        for c in same:
            out[c] = group
        left = [c for c in left if c not in same]
    return out


def answer_table(units: Sequence[PruneUnit], losses: Mapping[str, np.ndarray], eval_docs: Mapping[int, np.ndarray],
                 *, alpha: float = 0.05, n_perm: int = 10000, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """``answer.csv``: one row per (criterion, fraction, allocation, method) of the all-layer prunings, pooled
    over folds (module docstring); ``random`` appears with its median seed's mean loss and no comparison."""
    pooled, docs = pooled_losses([u for u in units if u.layer is None], losses, eval_docs)
    cells: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for (criterion, fraction, _seed, allocation, method, _), loss in pooled.items():
        if criterion != NONE:
            cells[(fraction, allocation, method)][criterion].append(loss)
    rows = []
    n_docs, n_folds = len(np.unique(docs)), len(eval_docs)
    for (fraction, allocation, method), arms in sorted(cells.items()):
        randoms = np.stack(arms[RANDOM]) if len(arms.get(RANDOM, [])) >= 2 else None
        causal = arms[CAUSAL][0] if CAUSAL in arms else None
        named = {c: v[0] for c, v in arms.items() if c != RANDOM}
        groups = _groups(list(named), named, docs)
        ranks = {c: i + 1 for i, c in enumerate(sorted(named, key=lambda c: float(named[c].mean())))}
        for criterion, loss in named.items():
            mean = float(loss.mean())
            row = {"criterion": criterion, "fraction": fraction, "allocation": allocation, "method": method,
                   "mean_loss": mean, "perplexity": float(np.exp(mean)), "rank": ranks[criterion],
                   "group": groups[criterion], "n_tokens": int(loss.size), "n_docs": n_docs, "n_folds": n_folds}
            if causal is not None and criterion != CAUSAL:
                d = clustered_difference(loss, causal, docs, n_perm=n_perm, n_boot=n_boot, seed=seed)
                row.update(delta_causal=d.estimate, delta_causal_low=d.ci_low, delta_causal_high=d.ci_high,
                           p_causal_t=d.p_t, p_causal_signflip=d.p_signflip)
            if randoms is not None:
                sb = share_random_better(loss, randoms, docs, n_boot=n_boot, seed=seed)
                row.update(share_random_better=sb.share, share_random_better_low=sb.low,
                           share_random_better_high=sb.high, p_random=sb.p, n_random=sb.n_seeds,
                           _below=sb.below_half)
            rows.append(row)
        if randoms is not None:
            means = randoms.mean(1)
            median = float(np.median(means))
            rows.append({"criterion": RANDOM, "fraction": fraction, "allocation": allocation, "method": method,
                         "mean_loss": median, "perplexity": float(np.exp(median)), "n_random": len(means),
                         "n_tokens": int(randoms.shape[1]), "n_docs": n_docs, "n_folds": n_folds})
    return _decide(pd.DataFrame(rows), alpha)


def _decide(table: pd.DataFrame, alpha: float) -> pd.DataFrame:
    for column in ("p_random", "p_causal_t", "p_causal_signflip"):
        if column not in table:
            table[column] = np.nan
        p = table[column].to_numpy(dtype=float)
        ok = np.isfinite(p)
        holm = np.full(p.shape, np.nan)
        if ok.any():
            holm[ok] = correct(p[ok], "holm", alpha).p_corrected
        table[f"{column}_holm"] = holm
    below = table.pop("_below").to_numpy(float) if "_below" in table else np.full(len(table), np.nan)
    table["decision_random"] = [
        "n/a" if not np.isfinite(p) else INCONCLUSIVE if p >= alpha else BETTER if b > 0.5 else WORSE
        for p, b in zip(table["p_random_holm"], below)]
    delta = table["delta_causal"].to_numpy(float) if "delta_causal" in table else np.full(len(table), np.nan)
    table["decision_causal"] = [
        "n/a" if not np.isfinite(d) else BETTER if max(pt, pf) < alpha and d < 0 else WORSE
        if max(pt, pf) < alpha and d > 0 else INCONCLUSIVE
        for d, pt, pf in zip(delta, table["p_causal_t_holm"], table["p_causal_signflip_holm"])]
    for column in ANSWER_COLUMNS:
        if column not in table:
            table[column] = np.nan
    extra = [c for c in table.columns if c not in ANSWER_COLUMNS]
    return table[ANSWER_COLUMNS + extra].sort_values(["fraction", "allocation", "method", "mean_loss"],
                                                     ignore_index=True)


def fold_agreement(prune: pd.DataFrame, answer: pd.DataFrame) -> pd.DataFrame:
    """Per (fraction, allocation, method): Spearman ρ between folds of the criteria's mean losses (mean over fold
    pairs), each fold's best criterion, and whether the pooled best criterion keeps its direction against random
    (its mean loss below the median random pruning's) and against the causal reference in every fold."""
    rows = []
    named = prune[~prune["criterion"].isin([NONE])]
    for (fraction, allocation, method), part in named.groupby(["fraction", "allocation", "method"]):
        folds = sorted(part["fold"].unique())
        per = {f: part[(part["fold"] == f) & (part["criterion"] != RANDOM)].set_index("criterion")["mean_loss"]
               for f in folds}
        rhos = [spearman(per[a].to_numpy(), per[b].reindex(per[a].index).to_numpy())[0]
                for i, a in enumerate(folds) for b in folds[i + 1:] if len(per[a]) >= 3]
        ans = answer[(answer["fraction"] == fraction) & (answer["allocation"] == allocation)
                     & (answer["method"] == method) & (answer["criterion"] != RANDOM)]
        best = str(ans.sort_values("mean_loss")["criterion"].iloc[0]) if len(ans) else None
        vs_random, vs_causal = [], []
        for f in folds:
            here = part[part["fold"] == f]
            rand = here[here["criterion"] == RANDOM]["mean_loss"]
            mine = here[here["criterion"] == best]["mean_loss"]
            causal = here[here["criterion"] == CAUSAL]["mean_loss"]
            if len(mine) and len(rand):
                vs_random.append(bool(mine.iloc[0] < rand.median()))
            if len(mine) and len(causal) and best != CAUSAL:
                vs_causal.append(float(np.sign(mine.iloc[0] - causal.iloc[0])))
        rows.append({"fraction": fraction, "allocation": allocation, "method": method, "n_folds": len(folds),
                     "spearman": float(np.mean(rhos)) if rhos else np.nan, "best": best,
                     "best_per_fold": ",".join(str(per[f].idxmin()) if len(per[f]) else "n/a" for f in folds),
                     "best_beats_random_median": ",".join("yes" if v else "no" for v in vs_random),
                     "holds_vs_random": bool(vs_random) and len(set(vs_random)) == 1,
                     "holds_vs_causal": (len(set(vs_causal)) == 1) if vs_causal else np.nan})
    return pd.DataFrame(rows)


def per_layer_effects(units: Sequence[PruneUnit], losses: Mapping[str, np.ndarray],
                      eval_docs: Mapping[int, np.ndarray]) -> pd.DataFrame:
    """Per (criterion, fraction, method, layer) of the one-layer prunings, pooled over folds: the loss increase over the
    unpruned model, token-weighted, with a document-clustered 95% interval (``random``: of the seeds' mean
    per-token loss, with the seeds' range ``seed_min`` / ``seed_max``)."""
    pooled, docs = pooled_losses(units, losses, eval_docs)
    base = next(v for arm, v in pooled.items() if arm[0] == NONE)
    groups: dict[tuple, list[np.ndarray]] = defaultdict(list)
    for (criterion, fraction, _, _, method, layer), loss in pooled.items():
        if layer is not None:
            groups[(criterion, fraction, method, layer)].append(loss - base)
    rows = []
    for (criterion, fraction, method, layer), arms in sorted(groups.items()):
        cm = clustered_mean(np.mean(arms, axis=0), docs)
        means = [float(a.mean()) for a in arms]
        rows.append({"criterion": criterion, "fraction": fraction, "method": method, "layer": layer,
                     "delta_loss": cm.estimate,
                     "ci_low": cm.ci_low, "ci_high": cm.ci_high, "seed_min": min(means), "seed_max": max(means),
                     "n_seeds": len(arms)})
    return pd.DataFrame(rows)


def allocation_table(units: Sequence[PruneUnit], losses: Mapping[str, np.ndarray],
                     eval_docs: Mapping[int, np.ndarray], *, n_perm: int = 10000, n_boot: int = 2000,
                     seed: int = 0) -> pd.DataFrame:
    """``allocation.csv``: per (criterion, fraction, method) and each non-uniform allocation, pooled over folds,
    δ = mean loss(allocation) − mean loss(uniform) at the same total number of removed experts, with a document
    bootstrap interval and the cluster-robust t / document sign-flip p (unit: the document). ``random`` is left
    out: its allocations are compared through the shares in ``answer.csv``, never through a mean of seeds."""
    pooled, docs = pooled_losses([u for u in units if u.layer is None], losses, eval_docs)
    arms: dict[tuple, list[np.ndarray]] = defaultdict(list)
    for (criterion, fraction, _, allocation, method, _), loss in pooled.items():
        if criterion not in (NONE, RANDOM):
            arms[(criterion, fraction, method, allocation)].append(loss)
    rows = []
    for (criterion, fraction, method, allocation), group in sorted(arms.items()):
        base = arms.get((criterion, fraction, method, "uniform"))
        if allocation == "uniform" or base is None:
            continue
        d = clustered_difference(group[0], base[0], docs, n_perm=n_perm, n_boot=n_boot, seed=seed)
        rows.append({"criterion": criterion, "fraction": fraction, "method": method, "allocation": allocation,
                     "mean_loss": float(group[0].mean()), "uniform_mean_loss": float(base[0].mean()),
                     "delta_uniform": d.estimate,
                     "delta_uniform_low": d.ci_low, "delta_uniform_high": d.ci_high, "p_t": d.p_t,
                     "p_signflip": d.p_signflip})
    return pd.DataFrame(rows)
