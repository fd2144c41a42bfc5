"""Paired statistics on lm-eval's per-item scores of pruned models (``lm_eval_answer.csv``), with the machinery of
the loss answer (:mod:`moeaudit.pruning._compare`) and the item as the unit of inference (pure: tables in, table out).

Per (task, metric) and item i, x_i(m) is the item's own value under pruned model m (0/1 for ``acc``; the item's
log-likelihood for metrics lm-eval aggregates as a perplexity), averaged over the folds' pruned models of the same
(criterion, fraction, seed, allocation, method) when there are several folds (every fold's model scores every item:
the task's items are not split). The score is the mean over items, :math:`S(m) = \\frac{1}{n}\\sum_i x_i(m)`.

Per (task, metric, criterion, fraction, allocation, method):

- **vs the unpruned model** and **vs the causal reference** (same fraction, allocation, method):
  :math:`\\delta = S(c) - S(\\text{ref})` from the paired item differences, with a percentile bootstrap interval over
  items, the paired t and the item sign-flip test (:func:`moeaudit.stats.clustered_difference` with one cluster
  per item). On binary items the sign-flip test is the exact McNemar test (items where both models agree contribute
  0 to every flip; the sum over discordant items is Binomial(n_discordant, 1/2) under the null), computed by Monte
  Carlo or exact enumeration. A decision (better / worse) needs both tests' Holm-corrected p below alpha; "better"
  follows the metric's direction (``higher_is_better``).
- **vs random**: :func:`moeaudit.pruning._random_ref.share_random_better` on the items (the share of random prunings
  of the same size whose score is at least as good, with an interval carrying seed and item uncertainty, and the
  test of pi = 1/2), Holm-corrected over the table's rows.

Holm's correction runs over the rows of the whole table, per family (vs unpruned, vs causal, vs random). Reference:
McNemar (1947), Psychometrika 12(2); Holm (1979), Scand. J. Statist. 6(2).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pandas as pd

from moeaudit.pruning._config import CAUSAL, NONE, RANDOM
from moeaudit.pruning._random_ref import share_random_better
from moeaudit.stats import clustered_difference, correct

LM_ANSWER_COLUMNS = ["task", "metric", "criterion", "fraction", "allocation", "method", "score", "higher_is_better",
                     "delta_unpruned", "delta_unpruned_low", "delta_unpruned_high", "p_unpruned_t",
                     "p_unpruned_signflip", "decision_unpruned", "delta_causal", "delta_causal_low",
                     "delta_causal_high", "p_causal_t", "p_causal_signflip", "decision_causal",
                     "share_random_better", "share_random_better_low", "share_random_better_high", "p_random",
                     "decision_random", "n_random", "n_items", "n_folds"]
_ARM = ["criterion", "fraction", "seed", "allocation", "method"]


def _pooled(part: pd.DataFrame) -> dict[tuple, np.ndarray]:
    """Per arm, the item values in item order averaged over folds (arms missing an item or a fold left out)."""
    items = np.sort(part["item"].unique())
    n_folds = part["fold"].nunique()
    out = {}
    for arm, rows in part.groupby(_ARM, dropna=False, sort=False):
        if rows["fold"].nunique() != n_folds:
            continue
        mean = rows.groupby("item")["value"].mean().reindex(items)
        if mean.notna().all():
            out[arm] = mean.to_numpy(dtype=np.float64)
    return out


def _paired(row: dict, name: str, a: np.ndarray, b: np.ndarray, *, n_perm: int, n_boot: int, seed: int) -> None:
    if np.array_equal(a, b):
        row.update({f"delta_{name}": 0.0, f"delta_{name}_low": 0.0, f"delta_{name}_high": 0.0,
                    f"p_{name}_t": 1.0, f"p_{name}_signflip": 1.0})
        return
    d = clustered_difference(a, b, np.arange(a.size), n_perm=n_perm, n_boot=n_boot, seed=seed)
    row.update({f"delta_{name}": d.estimate, f"delta_{name}_low": d.ci_low, f"delta_{name}_high": d.ci_high,
                f"p_{name}_t": d.p_t if np.isfinite(d.p_t) else 1.0, f"p_{name}_signflip": d.p_signflip})


def lm_eval_answer(items: pd.DataFrame, *, alpha: float = 0.05, n_perm: int = 10000, n_boot: int = 2000,
                   seed: int = 0) -> pd.DataFrame:
    """``lm_eval_answer.csv`` from the long per-item table of :func:`moeaudit.pruning._lmeval.score_units`
    (columns criterion, fraction, seed, fold, allocation, method, task, metric, item, value, higher_is_better):
    one row per (task, metric, criterion, fraction, allocation, method) (module docstring); ``random`` appears
    with its median seed's score and no comparison."""
    rows = []
    for (task, metric), part in items.groupby(["task", "metric"], sort=True):
        higher = bool(part["higher_is_better"].iloc[0])
        pooled = _pooled(part)
        n_items, n_folds = int(part["item"].nunique()), int(part["fold"].nunique())
        base = next((v for arm, v in pooled.items() if arm[0] == NONE), None)
        cells: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for (criterion, fraction, _seed, allocation, method), values in pooled.items():
            if criterion != NONE:
                cells[(fraction, allocation, method)][criterion].append(values)
        common = {"task": task, "metric": metric, "higher_is_better": higher, "n_items": n_items,
                  "n_folds": n_folds}
        if base is not None:
            rows.append({**common, "criterion": NONE, "fraction": 0.0, "score": float(base.mean())})
        for (fraction, allocation, method), arms in sorted(cells.items()):
            randoms = np.stack(arms[RANDOM]) if len(arms.get(RANDOM, [])) >= 2 else None
            causal = arms[CAUSAL][0] if CAUSAL in arms else None
            for criterion, values in ((c, v[0]) for c, v in arms.items() if c != RANDOM):
                row = {**common, "criterion": criterion, "fraction": fraction, "allocation": allocation,
                       "method": method, "score": float(values.mean())}
                if base is not None:
                    _paired(row, "unpruned", values, base, n_perm=n_perm, n_boot=n_boot, seed=seed)
                if causal is not None and criterion != CAUSAL:
                    _paired(row, "causal", values, causal, n_perm=n_perm, n_boot=n_boot, seed=seed)
                if randoms is not None:  # as losses: lower is better
                    sign = -1.0 if higher else 1.0
                    sb = share_random_better(sign * values, sign * randoms, np.arange(values.size),
                                             n_boot=n_boot, seed=seed)
                    row.update(share_random_better=sb.share, share_random_better_low=sb.low,
                               share_random_better_high=sb.high, p_random=sb.p, n_random=sb.n_seeds,
                               _below=sb.below_half)
                rows.append(row)
            if randoms is not None:
                rows.append({**common, "criterion": RANDOM, "fraction": fraction, "allocation": allocation,
                             "method": method, "score": float(np.median(randoms.mean(1))),
                             "n_random": randoms.shape[0]})
    return _decide(pd.DataFrame(rows, columns=[*LM_ANSWER_COLUMNS, "_below"]), alpha)


def _holm(p: np.ndarray, alpha: float) -> np.ndarray:
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = correct(p[ok], "holm", alpha).p_corrected
    return out


def _decide(table: pd.DataFrame, alpha: float) -> pd.DataFrame:
    higher = table["higher_is_better"].astype(bool).to_numpy()
    for name in ("unpruned", "causal"):
        pt = _holm(table[f"p_{name}_t"].to_numpy(float), alpha)
        pf = _holm(table[f"p_{name}_signflip"].to_numpy(float), alpha)
        table[f"p_{name}_t_holm"], table[f"p_{name}_signflip_holm"] = pt, pf
        good = np.where(higher, 1.0, -1.0) * table[f"delta_{name}"].to_numpy(float)
        table[f"decision_{name}"] = [
            "n/a" if not np.isfinite(g) else "inconclusive" if not max(a, b) < alpha or g == 0
            else "better" if g > 0 else "worse" for g, a, b in zip(good, pt, pf)]
    p_random = _holm(table["p_random"].to_numpy(float), alpha)
    table["p_random_holm"] = p_random
    below = table.pop("_below").to_numpy(float)
    table["decision_random"] = ["n/a" if not np.isfinite(p) else "inconclusive" if p >= alpha
                                else "better" if b > 0.5 else "worse" for p, b in zip(p_random, below)]
    extra = [c for c in table.columns if c not in LM_ANSWER_COLUMNS]
    return table[LM_ANSWER_COLUMNS + extra].reset_index(drop=True)


def answer_scores(answer: pd.DataFrame, lm_answer: pd.DataFrame) -> pd.DataFrame:
    """``answer.csv`` with, per lm-eval (task, metric), the pooled score ``lm_eval:<task>:<metric>`` and its
    decisions against the causal reference and random prunings (``...:decision_causal``, ``...:decision_random``)
    joined on (criterion, fraction, allocation, method)."""
    keys = ["criterion", "fraction", "allocation", "method"]
    out = answer.copy()
    for (task, metric), part in lm_answer[lm_answer["criterion"] != NONE].groupby(["task", "metric"]):
        name = f"lm_eval:{task}:{metric}"
        cols = part[[*keys, "score", "decision_causal", "decision_random"]].rename(
            columns={"score": name, "decision_causal": f"{name}:decision_causal",
                     "decision_random": f"{name}:decision_random"})
        out = out.merge(cols, on=keys, how="left")
    return out
