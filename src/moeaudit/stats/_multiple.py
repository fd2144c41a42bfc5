"""Multiple-comparison corrections and the t/Wilcoxon agreement rule."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeaudit.errors import did_you_mean

#: Multiple-comparison methods accepted by :func:`correct`.
CORRECTION_METHODS = ("bonferroni", "holm", "fdr_bh")


@dataclass(frozen=True)
class CorrectionResult:
    """Result of :func:`correct`.

    Attributes
    ----------
    reject : ndarray of bool, shape (m,)
        True where the null is rejected at family level ``alpha``; always False for a NaN p-value.
    p_corrected : ndarray of float, shape (m,)
        Adjusted p-values (NaN where the input was NaN).
    alpha_corrected : float
        alpha / m, the Bonferroni per-test threshold. For ``holm`` and ``fdr_bh`` it is only the threshold
        of their most stringent step; decide with ``reject``.
    method : str
    alpha : float
    m : int
        Family size, NaN p-values included.
    """

    reject: np.ndarray
    p_corrected: np.ndarray
    alpha_corrected: float
    method: str
    alpha: float
    m: int


def correct(pvalues, method: str = "bonferroni", alpha: float = 0.05) -> CorrectionResult:
    r"""Correct a family of m p-values for multiple comparisons.

    With p-values sorted ascending, p_(1) <= ... <= p_(m):

    * ``bonferroni``: :math:`\tilde p_i = \min(1, m p_i)`; reject when p_i <= alpha / m.
    * ``holm`` (Holm 1979, step-down, controls FWER):
      :math:`\tilde p_{(i)} = \max_{j \le i} \min(1, (m - j + 1) p_{(j)})`.
    * ``fdr_bh`` (Benjamini & Hochberg 1995, step-up, controls FDR for independent or PRDS tests):
      :math:`\tilde p_{(i)} = \min_{j \ge i} \min(1, m p_{(j)} / j)`.

    Computed by ``statsmodels.stats.multitest.multipletests``.

    NaN p-values (a degenerate cell) still count in m and are ranked as p = 1, which is the conservative
    choice for all three methods: the family size stays the one fixed in advance (0.05 / 20 for 20 cells
    even if one cell could not be tested). They come back as NaN in ``p_corrected`` and are never rejected.

    Parameters
    ----------
    pvalues : array_like, shape (m,)
        P-values in [0, 1], NaN allowed.
    method : {"bonferroni", "holm", "fdr_bh"}
    alpha : float
        Family-wise error rate (or false discovery rate for ``fdr_bh``), in (0, 1).

    Returns
    -------
    CorrectionResult

    Raises
    ------
    ValueError
        Unknown method (valid options and the closest match named), empty or non-1-D input, p-values
        outside [0, 1] or infinite, alpha outside (0, 1).

    References
    ----------
    Holm, S. (1979). A simple sequentially rejective multiple test procedure. Scand. J. Statist., 6, 65-70.
    Benjamini, Y., & Hochberg, Y. (1995). Controlling the false discovery rate: a practical and powerful
    approach to multiple testing. J. R. Statist. Soc. B, 57, 289-300.
    """
    if method not in CORRECTION_METHODS:
        raise ValueError(
            f"Unknown correction method {method!r}; valid options: {', '.join(CORRECTION_METHODS)}.{did_you_mean(method, CORRECTION_METHODS)}"
        )
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}.")
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"pvalues must be a non-empty 1-D array, got shape {p.shape}.")
    is_nan = np.isnan(p)
    bad = np.flatnonzero(~is_nan & ~((p >= 0) & (p <= 1)))
    if bad.size:
        raise ValueError(
            f"p-values must lie in [0, 1] (or be NaN); got {p[bad[:5]].tolist()} at index {bad[:5].tolist()}."
        )

    from statsmodels.stats.multitest import multipletests

    m = p.size
    reject, p_corr, _, _ = multipletests(np.where(is_nan, 1.0, p), alpha=alpha, method=method)
    reject = np.asarray(reject, dtype=bool) & ~is_nan
    p_corr = np.where(is_nan, np.nan, np.asarray(p_corr, dtype=float))
    return CorrectionResult(
        reject=reject, p_corrected=p_corr, alpha_corrected=alpha / m, method=method, alpha=alpha, m=m
    )


def significant_both(p_t, p_w, *, method: str = "bonferroni", alpha: float = 0.05) -> np.ndarray:
    """The paper's decision rule: a cell is significant only when its t-test and its Wilcoxon test both survive.

    Each family (t p-values, Wilcoxon p-values) is corrected separately by :func:`correct` with the same
    m = number of cells; the result is the element-wise AND of the two ``reject`` arrays. For Bonferroni
    this is ``(p_t <= alpha / m) & (p_w <= alpha / m)``; NaN in either p-value means not significant.

    Parameters
    ----------
    p_t, p_w : array_like, shape (m,)
        Paired t-test and Wilcoxon p-values, one per cell, in the same order.
    method, alpha
        As in :func:`correct`.

    Returns
    -------
    ndarray of bool, shape (m,)
    """
    p_t = np.asarray(p_t, dtype=float)
    p_w = np.asarray(p_w, dtype=float)
    if p_t.shape != p_w.shape:
        raise ValueError(f"p_t and p_w must have one p-value per cell each, got shapes {p_t.shape} and {p_w.shape}.")
    return correct(p_t, method, alpha).reject & correct(p_w, method, alpha).reject
