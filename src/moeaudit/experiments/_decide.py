"""The decision of every cell of a family (one model's audit cells, its control layers, its rank-validity cells):
which test decides, what the outcome is called, and why.

One place decides: :func:`decide_family` (audit and control cells) and :func:`decide_rank_validity`.

**Definition 2.1 per cell** is E[D] > 0 (the higher-ranked expert costs more on average). One test decides it: the
one-sided document-level test of the mean ``p_mean_greater`` (:func:`moeaudit.stats.clustered_mean_test`), Holm
within the family (``p_mean_greater_holm``). That test's level is *measured* on each cell's own skewed null
(``mean_level`` with its exact binomial interval ``mean_level_low`` .. ``mean_level_high``, α = .05); a cell whose
measured level is shown above the nominal (``mean_level_low`` > α) is never labelled positive: it is
``positive_level_not_held`` and its reason says so. The expert-level permutation test ``p_perm`` (random rankings
of the same experts) is secondary: it is quoted in the reason, it does not gate the cell (the claim about a metric
is the pooled metric-level test, ``tables/metrics.csv``). The typical token (HL, % D > 0, the signed rank) is a
description with its intervals, never a criterion.

Absence is claimed only where a test shows it, anchored to what a static ranking can reach: ``below_half_ceiling``
when the cell's share of the causal ceiling has its 95 % upper bound below ½ (a one-sided test at .025 per cell,
uncorrected; only at informative layers, where the ceiling rises above the band of random rankings).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moeaudit import stats

ALPHA = 0.05
CORRECTION = "bonferroni"
#: Correction of the per-cell test of the mean within its family.
MEAN_CORRECTION = "holm"
#: The share of the causal ceiling below which a metric is "shown to capture less than half of it".
HALF_CEILING = 0.5

#: Outcomes of a paired cell (column ``decision``), strongest claim first.
DECISIONS: tuple[str, ...] = (
    "positive",  # E[D] > 0: p_mean_greater_holm <= α and the test's measured level on the cell's skewed null holds α
    "positive_level_not_held",  # p_mean_greater_holm <= α, but the measured level is shown above α: not labelled +
    "below_half_ceiling",  # not positive; the share of the ceiling's 95% upper bound < 1/2 (informative layer)
    "not_shown",  # E[D] > 0 not shown, and neither is a share of the ceiling below 1/2
    "cannot_tell",  # E[D] > 0 not shown at a layer whose ceiling is within random rankings' band (uninformative)
    "untested",  # no p-value (a non-finite ΔL, or fewer than three documents)
)

MEAN_TEST = "one-sided mean (p_mean_greater, Holm)"


def _col(frame: pd.DataFrame, name: str, default=np.nan) -> np.ndarray:
    return frame[name].to_numpy(dtype=float) if name in frame else np.full(len(frame), default, dtype=float)


def holm_mean(frame: pd.DataFrame, alpha: float = ALPHA) -> np.ndarray:
    """``p_mean_greater_holm``: Holm over the family's one-sided mean tests (NaN p-values stay NaN and out of m)."""
    p = _col(frame, "p_mean_greater")
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = stats.correct(p[ok], MEAN_CORRECTION, alpha).p_corrected
    return out


def level_not_held(frame: pd.DataFrame, alpha: float = ALPHA) -> np.ndarray:
    """True where the one-sided mean test's measured level on the cell's own skewed null is shown above ``alpha``
    (the exact binomial interval's lower end, ``mean_level_low``, above it). Without ``mean_level_low`` (a frame
    written before it existed) the point estimate's interval is not known and nothing is flagged."""
    low = _col(frame, "mean_level_low")
    return np.isfinite(low) & (low > alpha)


def _outcome(p_holm: float, alpha: float, not_held: bool, share_high: float, informative) -> str:
    if not np.isfinite(p_holm):
        return "untested"
    if p_holm <= alpha:
        return "positive_level_not_held" if not_held else "positive"
    if informative is True and np.isfinite(share_high) and share_high < HALF_CEILING:
        return "below_half_ceiling"
    return "cannot_tell" if informative is False else "not_shown"


def _reason(r, outcome: str, alpha: float) -> str:
    p, level = r.get("p_mean_greater_holm", np.nan), r.get("mean_level", np.nan)
    text = f"{MEAN_TEST}: p = {p:.2g}" if np.isfinite(p) else "no test of the mean"
    if np.isfinite(level):
        text += (f"; measured level {level:.3f} [{r.get('mean_level_low', np.nan):.3f}, "
                 f"{r.get('mean_level_high', np.nan):.3f}] at nominal {alpha:g}")
    text += {
        "positive": "; E[D] > 0",
        "positive_level_not_held": ("; rejects at the nominal level, but the test's measured level on this cell's "
                                    "skewed null is above it, so E[D] > 0 is not claimed"),
        "below_half_ceiling": (f"; share of the ceiling {r.get('ceiling_share', np.nan):.2f}, 95% upper bound "
                               f"{r.get('ceiling_share_high', np.nan):.2f} < {HALF_CEILING:g}"),
        "not_shown": "; E[D] > 0 not shown (which does not show its absence)",
        "cannot_tell": ("; E[D] > 0 not shown, and the layer's causal ceiling is within random rankings' band: this "
                        "run cannot tell a static ranking from a random one here"),
        "untested": "",
    }[outcome]
    if np.isfinite(r.get("p_perm", np.nan)):
        text += f"; secondary: p_perm = {r['p_perm']:.2g} (random rankings of the experts, two-sided)"
    return text


def decide_family(frame: pd.DataFrame, *, alpha: float = ALPHA, method: str = CORRECTION,
                  expert_level: bool = False) -> pd.DataFrame:
    """``frame`` (one family's paired cells) decided by Definition 2.1's one test (see the module docstring).

    Adds ``p_mean_greater_holm``, ``level_not_held``, ``alpha_corrected`` (α / m, the Bonferroni level the
    secondary ``p_perm`` and the paper's rule are read at), ``significant`` (decision == "positive"),
    ``direction`` (+1 where positive, else 0), ``equivalent`` (decision == "below_half_ceiling"), ``decision``
    (one of :data:`DECISIONS`), ``reason`` and ``significant_paper_rule`` (the paper's rule: unclustered t-test and
    Wilcoxon both survive ``method``, any direction; kept to compare with its published results).
    ``expert_level`` is accepted for the callers' symmetry: ``p_perm`` is quoted, never a criterion."""
    del expert_level
    frame = frame.copy()
    m = len(frame)
    frame["p_mean_greater_holm"] = holm_mean(frame, alpha)
    frame["level_not_held"] = level_not_held(frame, alpha)
    share_high = _col(frame, "ceiling_share_high")
    informative = (frame["layer_informative"].tolist() if "layer_informative" in frame else [None] * m)
    outcomes = [_outcome(frame["p_mean_greater_holm"].iloc[i], alpha, bool(frame["level_not_held"].iloc[i]),
                         share_high[i], None if pd.isna(informative[i]) else bool(informative[i]))
                for i in range(m)]
    frame["alpha_corrected"] = alpha / max(m, 1)
    frame["significant"] = [o == "positive" for o in outcomes]
    frame["significant_paper_rule"] = stats.significant_both(frame["p_t"].to_numpy(dtype=float),
                                                             frame["p_wilcoxon"].to_numpy(dtype=float),
                                                             method=method, alpha=alpha)
    frame["direction"] = [1 if o == "positive" else 0 for o in outcomes]
    frame["equivalent"] = [o == "below_half_ceiling" for o in outcomes]
    frame["decision"] = outcomes
    frame["reason"] = [_reason(r, o, alpha) for (_, r), o in zip(frame.iterrows(), outcomes)]
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


def decision_counts(frame: pd.DataFrame, family: str) -> str:
    """One line counting a family's cells by ``decision`` (the CLI prints it; the report's verdict quotes the same
    counts): ``audit decisions (of 32): 0 E[D] > 0, 2 rejected but level not held, ...``."""
    words = {"positive": "E[D] > 0", "positive_level_not_held": "rejected but level not held",
             "below_half_ceiling": "below half of the ceiling", "not_shown": "E[D] > 0 not shown",
             "cannot_tell": "cannot tell (uninformative layer)", "untested": "untested"}
    counts = frame["decision"].value_counts() if "decision" in frame else pd.Series(dtype=int)
    parts = [f"{int(counts.get(k, 0))} {words[k]}" for k in DECISIONS if counts.get(k, 0) or k == "positive"]
    return (f"{family} decisions (of {len(frame)}): " + ", ".join(parts)
            + " (one-sided document-level test of the mean, Holm, at its measured level)")
