"""Ranking stability: does a metric rank the experts of a layer the same way on random halves of the corpus?

One pass through the model collects per-document sufficient statistics (``observe(..., per_document=True)``);
every random half-split then aggregates them exactly, so hundreds of splits cost no more model time than one.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import pandas as pd
from torch import nn

#: Random document half-splits (the issue's floor is 100).
N_SPLITS = 200
#: Bottom-set fractions: pruning removes the m = floor(f * E + 1/2) lowest-ranked experts.
FRACTIONS: tuple[float, ...] = (0.125, 0.25, 0.5)
_Q = (0.025, 0.975)
_CHUNK = 32


def is_current(stability: pd.DataFrame | None) -> bool:
    """Whether a stored stability table has this version's columns (an older one-split table lacks ``tau_low``
    and is recomputed)."""
    return stability is not None and "tau_low" in stability.columns


def fraction_tag(f: float) -> str:
    """``0.125 -> "1_8"``: the column suffix of a bottom-set fraction."""
    frac = Fraction(f).limit_denominator(1000)
    return f"{frac.numerator}_{frac.denominator}"


def ranking_stability(model: nn.Module, sequences: Sequence, *, metrics: Sequence[str],
                      layers: Sequence[int] | None = None, n_splits: int = N_SPLITS, seed: int = 0,
                      fractions: Sequence[float] = FRACTIONS) -> pd.DataFrame:
    """Split-half stability of each metric's expert ranking over ``n_splits`` random document half-splits.

    See :func:`split_half_stability` for the statistics; this runs the one observation pass they need.
    """
    from moeaudit.observation._observe import observe

    ids = [getattr(s, "input_ids", s) for s in sequences]
    if len(ids) < 4:
        raise ValueError(f"ranking stability needs at least 4 sequences (two per half), got {len(ids)}; pass more "
                         "documents (n_docs).")
    doc_stats = observe(model, ids, layers=layers, metrics=list(dict.fromkeys(metrics)), per_document=True)
    return split_half_stability(doc_stats, metrics=metrics, n_splits=n_splits, seed=seed, fractions=fractions)


def split_half_stability(doc_stats, *, metrics: Sequence[str], n_splits: int = N_SPLITS, seed: int = 0,
                         fractions: Sequence[float] = FRACTIONS) -> pd.DataFrame:
    r"""Stability of expert rankings between random halves of the documents.

    Each split draws floor(D/2) of the D documents without replacement as half A (the rest are B) and computes
    each metric on both halves from the per-document statistics. Experts whose metric is undefined in either half
    (e.g. never routed) are left out of that split. Unit: the document (halves are sets of whole documents);
    the statistics describe the layer's E experts.

    * ``tau``, ``tau_low``, ``tau_high``: median and 2.5 / 97.5 % quantiles over splits of Kendall's τ_b between
      the halves' metric values (the distribution over splits, not a confidence interval; no test of τ = 0,
      which a ranking of the same corpus would pass trivially).
    * ``rho_split_half``: mean over splits of Spearman's ρ between the halves; ``reliability`` its Spearman–Brown
      step-up :math:`2\bar\rho / (1 + \bar\rho)`, the expected rank correlation between the metric on the whole
      corpus and on another corpus of the same size (Spearman 1910; Brown 1910).
    * ``m_<f>``, ``jaccard_<f>`` (mean), ``jaccard_<f>_low`` / ``_high`` (2.5 / 97.5 % over splits) for each
      fraction f (column tag ``1_8`` for 1/8): Jaccard index |A ∩ B| / |A ∪ B| of the m = ⌊f·E + ½⌋
      lowest-ranked experts of the two halves, the set a pruning rule would remove (ties broken at random).

    Returns:
        One row per (layer, metric): ``layer, metric, n_experts, n_splits, tau, tau_low, tau_high,
        rho_split_half, reliability`` and the bottom-set columns.

    References:
        Spearman, C. (1910). Correlation calculated from faulty data. Br. J. Psychol., 3, 271-295.
        Brown, W. (1910). Some experimental results in the correlation of mental abilities. Br. J. Psychol., 3,
        296-322.
    """
    n_docs = doc_stats.n_documents
    if n_docs < 4:
        raise ValueError(f"split-half stability needs at least 4 documents, got {n_docs}.")
    if n_splits < 1:
        raise ValueError(f"n_splits={n_splits}: use at least 1 (100 or more for a report).")
    rng = np.random.default_rng(seed)
    in_a = np.argsort(rng.random((n_splits, n_docs)), axis=1) < n_docs // 2
    n_experts = doc_stats.n_experts
    rows = []
    for metric in dict.fromkeys(metrics):
        a = doc_stats.values(metric, in_a)  # [S, L, E]
        b = doc_stats.values(metric, ~in_a)
        for li, layer in enumerate(doc_stats.layers):
            rows.append({"layer": int(layer), "metric": metric,
                         **_pair_stats(a[:, li], b[:, li], n_experts, fractions, rng)})
    return pd.DataFrame(rows).sort_values(["layer", "metric"], kind="stable").reset_index(drop=True)


def _pair_stats(a: np.ndarray, b: np.ndarray, n_experts: int, fractions, rng) -> dict:
    """Statistics of S paired scorings a, b [S, E] (NaN: expert left out of that split)."""
    ok = np.isfinite(a) & np.isfinite(b)
    tau = kendall_tau_b_rows(a, b)
    rho = spearman_rows(a, b)
    out: dict = {"n_experts": int(ok.sum(axis=1).min()), "n_splits": int(a.shape[0])}
    finite = tau[np.isfinite(tau)]
    out["tau"] = float(np.median(finite)) if finite.size else np.nan
    out["tau_low"], out["tau_high"] = (float(q) for q in np.quantile(finite, _Q)) if finite.size else (np.nan,) * 2
    rho_bar = float(np.nanmean(rho)) if np.isfinite(rho).any() else np.nan
    out["rho_split_half"] = rho_bar
    out["reliability"] = 2 * rho_bar / (1 + rho_bar) if np.isfinite(rho_bar) and rho_bar > -1 else np.nan
    for f in fractions:
        m = int(np.floor(f * n_experts + 0.5))  # round half up, as pruning's n_removed
        tag = fraction_tag(f)
        jac = bottom_jaccard(a, b, m, rng)
        good = jac[np.isfinite(jac)]
        out[f"m_{tag}"] = m
        out[f"jaccard_{tag}"] = float(good.mean()) if good.size else np.nan
        lo, hi = (float(q) for q in np.quantile(good, _Q)) if good.size else (np.nan, np.nan)
        out[f"jaccard_{tag}_low"], out[f"jaccard_{tag}_high"] = lo, hi
    return out


def kendall_tau_b_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Kendall τ_b of every row pair over the entries finite in both; NaN where a row has < 2 such entries or is
    constant. Pairwise sign matrices: Σ sign(a_j − a_k) sign(b_j − b_k) / sqrt(untied pairs of a × of b)."""
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = np.where(ok, a, np.nan), np.where(ok, b, np.nan)
    out = np.empty(a.shape[0])
    for s in range(0, a.shape[0], _CHUNK):
        x, y = a[s:s + _CHUNK], b[s:s + _CHUNK]
        with np.errstate(invalid="ignore"):
            sx = np.nan_to_num(np.sign(x[:, :, None] - x[:, None, :]))
            sy = np.nan_to_num(np.sign(y[:, :, None] - y[:, None, :]))
        num = (sx * sy).sum(axis=(1, 2))
        den = np.sqrt(np.abs(sx).sum(axis=(1, 2)) * np.abs(sy).sum(axis=(1, 2)))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[s:s + _CHUNK] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) along the last axis over finite entries; NaN stays NaN."""
    from scipy.stats import rankdata

    ranks = rankdata(np.where(np.isfinite(x), x, np.inf), axis=-1, method="average")
    return np.where(np.isfinite(x), ranks, np.nan)


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman ρ of every row pair over the entries finite in both (Pearson correlation of average ranks)."""
    ok = np.isfinite(a) & np.isfinite(b)
    ra, rb = _average_ranks(np.where(ok, a, np.nan)), _average_ranks(np.where(ok, b, np.nan))
    n = ok.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        da = np.where(ok, ra - np.nansum(ra, axis=1, keepdims=True) / n[:, None], 0.0)
        db = np.where(ok, rb - np.nansum(rb, axis=1, keepdims=True) / n[:, None], 0.0)
        sab, saa, sbb = (da * db).sum(axis=1), (da * da).sum(axis=1), (db * db).sum(axis=1)
        return np.where((saa > 0) & (sbb > 0) & (n >= 2), sab / np.sqrt(saa * sbb), np.nan)


def bottom_jaccard(a: np.ndarray, b: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """[S] Jaccard index of the m lowest-scored experts of a and of b (finite entries only; ties broken at
    random); NaN where fewer than m + 1 experts are finite or m < 1."""
    ok = np.isfinite(a) & np.isfinite(b)
    if m < 1:
        return np.full(a.shape[0], np.nan)

    def bottom(x: np.ndarray) -> np.ndarray:
        order = np.lexsort((rng.random(x.shape), np.where(ok, x, np.inf)), axis=-1)
        member = np.zeros(x.shape, dtype=bool)
        np.put_along_axis(member, order[:, :m], True, axis=1)
        return member

    sa, sb = bottom(a), bottom(b)
    inter, union = (sa & sb).sum(axis=1), (sa | sb).sum(axis=1)
    return np.where(ok.sum(axis=1) > m, inter / np.maximum(union, 1), np.nan)
