"""The decision of every cell of a family (one model's audit cells, its control layers, its rank-validity cells):
which tests it must pass, what the outcome is called, and why.

One place decides: :func:`cell_criteria` lists the tests of the rule and :func:`decide_family` applies them. Audit
cells carry one more criterion, the expert-level permutation test (``p_perm``): a claim about a *metric* is that it
ranks the layer's experts better than random rankings of the same experts would, which the token-level tests do
not test (where experts differ in importance, arbitrary rankings pass them far more often than α).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moeaudit import stats

ALPHA = 0.05
CORRECTION = "bonferroni"

#: Outcomes of a paired cell (column ``decision``), strongest claim first.
DECISIONS: tuple[str, ...] = (
    "positive",  # the rule holds, the higher-ranked expert costs more (E[D] > 0 and the typical D > 0)
    "negative",  # the rule holds in the other direction
    "not_beyond_random",  # both token-level tests survive in one direction, but random rankings do as well (p_perm)
    "directions_disagree",  # mean and signed-rank tests both survive correction but point opposite ways
    "typical_only",  # the signed-rank test survives, the mean test does not: a typical-token effect
    "mean_only",  # the mean test survives, the signed-rank test does not: a few tokens carry the mean
    "equivalent",  # no test survives, and TOST shows |d_z| < sesoi_d at the corrected level
    "inconclusive",  # none of the above: neither an effect nor its absence is shown
)

MEAN_TEST = "mean (document sign-flip)"
RANK_TEST = "signed rank (document sign-flip)"
EXPERT_TEST = "random expert rankings (p_perm)"


def cell_criteria(frame: pd.DataFrame, *, expert_level: bool = False) -> list[stats.Criterion]:
    """The tests every paired cell must pass, each corrected over the family: the document-clustered test of the
    mean of D and the document-clustered signed-rank test, directions given by mean(D) and W+ - W-; with
    ``expert_level`` (audit cells) and a ``p_perm`` column holding any value, also the expert-level permutation
    test, direction given by d."""
    criteria = [
        stats.Criterion(MEAN_TEST, frame["p_cluster"].to_numpy(dtype=float),
                        np.sign(frame["mean_diff"].to_numpy(dtype=float))),
        stats.Criterion(RANK_TEST, frame["p_signrank_cluster"].to_numpy(dtype=float),
                        np.sign(frame["w_diff"].to_numpy(dtype=float))),
    ]
    if expert_level and "p_perm" in frame and frame["p_perm"].notna().any():
        criteria.append(stats.Criterion(EXPERT_TEST, frame["p_perm"].to_numpy(dtype=float),
                                        np.sign(frame["cohens_d"].to_numpy(dtype=float))))
    return criteria


def _outcome(significant: bool, direction: int, mean_rej: bool, rank_rej: bool, equivalent: bool,
             same_way: bool = False) -> str:
    if significant:
        return "positive" if direction > 0 else "negative"
    if mean_rej and rank_rej:
        return "not_beyond_random" if same_way else "directions_disagree"
    if rank_rej:
        return "typical_only"
    if mean_rej:
        return "mean_only"
    return "equivalent" if equivalent else "inconclusive"


def decide_family(frame: pd.DataFrame, *, alpha: float = ALPHA, method: str = CORRECTION,
                  expert_level: bool = False) -> pd.DataFrame:
    """``frame`` (one family's paired cells) with ``alpha_corrected``, ``significant``, ``direction``,
    ``equivalent`` (TOST rejects at the corrected level), ``decision`` (one of :data:`DECISIONS`), ``reason`` and
    ``significant_paper_rule`` (the paper's rule: unclustered t-test and Wilcoxon both survive, any direction).
    ``expert_level``: claims about metrics, so ``p_perm`` is a criterion too (see :func:`cell_criteria`)."""
    frame = frame.copy()
    criteria = cell_criteria(frame, expert_level=expert_level)
    decision = stats.decide(criteria, method=method, alpha=alpha)
    rejects = {c.name: stats.correct(c.p, method, alpha).reject for c in criteria}
    equivalent = stats.correct(frame["tost_p"].to_numpy(dtype=float), method, alpha).reject
    outcomes, reasons = [], []
    for i in range(len(frame)):
        same_way = np.sign(frame["mean_diff"].iloc[i]) == np.sign(frame["w_diff"].iloc[i]) != 0
        outcome = _outcome(bool(decision.significant[i]), int(decision.direction[i]), bool(rejects[MEAN_TEST][i]),
                           bool(rejects[RANK_TEST][i]), bool(equivalent[i]), bool(same_way))
        reason = str(decision.reason[i])
        if outcome == "equivalent":
            reason += f"; TOST p = {frame['tost_p'].iloc[i]:.2g} shows |d| below the smallest effect of interest"
        outcomes.append(outcome)
        reasons.append(reason)
    frame["alpha_corrected"] = decision.alpha_corrected
    frame["significant"] = decision.significant
    # the paper's rule, kept to compare with its published results: t and Wilcoxon on positions, no direction
    frame["significant_paper_rule"] = stats.significant_both(frame["p_t"].to_numpy(dtype=float),
                                                             frame["p_wilcoxon"].to_numpy(dtype=float),
                                                             method=method, alpha=alpha)
    frame["direction"] = decision.direction
    frame["equivalent"] = equivalent
    frame["decision"] = outcomes
    frame["reason"] = reasons
    return frame


def decide_rank_validity(frame: pd.DataFrame, *, alpha: float = ALPHA, method: str = CORRECTION) -> pd.DataFrame:
    """Rank-validity cells of one model: significant when the document-clustered test of the mean per-token rho
    survives correction over the model's rank-validity cells and, for a static metric with a ``p_perm`` (the
    relabeling null of :mod:`moeaudit.experiments._rank_null`), so does that test."""
    frame = frame.copy()
    direction = np.sign(frame["mean_rho"].to_numpy(dtype=float))
    criteria = [stats.Criterion("mean rho (document sign-flip)", frame["p_cluster"].to_numpy(dtype=float), direction)]
    if "p_perm" in frame and frame["p_perm"].notna().any():
        # static metrics must also beat random relabelings of the metric (the audit's expert-level null); the
        # per-token routing weight has no static ranking to relabel, so this criterion does not apply to it
        static = frame["metric"] != "routing_weight"
        p_perm = np.where(static, frame["p_perm"].to_numpy(dtype=float), 0.0)
        criteria.append(stats.Criterion("random relabelings (p_perm)", p_perm, direction))
    decision = stats.decide(criteria, method=method, alpha=alpha)
    frame["alpha_corrected"] = decision.alpha_corrected
    frame["significant"] = decision.significant
    return frame
