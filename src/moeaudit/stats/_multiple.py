"""Multiple-comparison corrections and the decision rule of a family of cells (every test rejects after
correction, and the directed tests agree in sign)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeaudit.errors import did_you_mean

CORRECTION_METHODS = ("bonferroni", "holm", "fdr_bh")
"""Multiple-comparison methods accepted by ``correct``."""


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


@dataclass(frozen=True)
class Criterion:
    """One test of a decision rule, evaluated on every cell of a family.

    Attributes
    ----------
    name : str
        How the verdict names the test (e.g. ``"mean (document sign-flip)"``).
    p : ndarray of float, shape (m,)
        Its p-value per cell (NaN: not testable, never rejected).
    direction : ndarray of float, shape (m,), optional
        Sign of its statistic per cell (+1, -1, 0); ``None`` for an undirected test.
    """

    name: str
    p: np.ndarray
    direction: np.ndarray | None = None


@dataclass(frozen=True)
class Decision:
    """Result of :func:`decide`, one entry per cell.

    Attributes
    ----------
    significant : ndarray of bool
        Every criterion rejects after correction and every directed criterion has the same nonzero sign.
    direction : ndarray of int
        That sign (+1 / -1) where significant, else 0.
    reason : ndarray of str
        Why the cell is (not) significant, naming the first test that fails, or the directions that disagree.
    alpha_corrected : float
        alpha / m (the Bonferroni per-test level).
    """

    significant: np.ndarray
    direction: np.ndarray
    reason: np.ndarray
    alpha_corrected: float


def _sign_word(x: float) -> str:
    return "+" if x > 0 else ("-" if x < 0 else "0")


def decide(criteria, *, method: str = "bonferroni", alpha: float = 0.05) -> Decision:
    """Decide every cell of a family: significant when each criterion's p-values, corrected over the family's m
    cells by :func:`correct`, reject, and all directed criteria point the same (nonzero) way.

    Each criterion is corrected separately with the same m; requiring every one of k tests to reject keeps the
    family-wise error rate at most alpha (an intersection-union test: each test alone already controls it).
    A cell whose tests reject in opposite directions is not significant: the mean and the typical token then
    disagree, which is a finding about the distribution of D, not an effect of known sign.

    Parameters
    ----------
    criteria : sequence of Criterion
        At least one; all with one p-value per cell, in the same order.
    method, alpha
        As in :func:`correct`.

    Returns
    -------
    Decision
    """
    criteria = list(criteria)
    if not criteria:
        raise ValueError("decide needs at least one Criterion.")
    m = np.asarray(criteria[0].p).size
    for c in criteria:
        if np.asarray(c.p).shape != (m,) or (c.direction is not None and np.asarray(c.direction).shape != (m,)):
            raise ValueError(f"criterion {c.name!r} must give one p-value (and direction) per cell; expected {m}.")
    rejects = [correct(np.asarray(c.p, dtype=float), method, alpha).reject for c in criteria]
    significant = np.zeros(m, dtype=bool)
    direction = np.zeros(m, dtype=int)
    reason = np.empty(m, dtype=object)
    for i in range(m):
        failed = [c for c, r in zip(criteria, rejects) if not r[i]]
        signs = {c.name: float(np.sign(c.direction[i])) for c in criteria if c.direction is not None}
        if failed:
            c = failed[0]
            p = float(np.asarray(c.p, dtype=float)[i])
            reason[i] = (f"{c.name}: p undefined" if np.isnan(p) else
                         f"{c.name}: p = {p:.2g} does not survive {method} correction (m = {m})")
        elif len(set(signs.values())) > 1 or 0.0 in signs.values():
            reason[i] = "directions disagree (" + ", ".join(f"{k} {_sign_word(v)}" for k, v in signs.items()) + ")"
        else:
            significant[i] = True
            direction[i] = int(next(iter(signs.values()), 1.0))
            reason[i] = f"every test survives {method} correction (m = {m}) in the same direction"
    return Decision(significant=significant, direction=direction, reason=reason, alpha_corrected=alpha / m)


def significant_both(p_t, p_w, *, sign_t=None, sign_w=None, method: str = "bonferroni",
                     alpha: float = 0.05) -> np.ndarray:
    """The paper's agreement rule: a cell is significant only when its mean test and its rank test both survive
    correction (each family corrected separately with the same m) and, when their directions are given, point
    the same way.

    For Bonferroni without directions this is ``(p_t <= alpha / m) & (p_w <= alpha / m)``; NaN in either p-value
    means not significant. :func:`decide` is the general form (any number of tests, with reasons).

    Parameters
    ----------
    p_t, p_w : array_like, shape (m,)
        Mean-test and rank-test p-values, one per cell, in the same order.
    sign_t, sign_w : array_like, shape (m,), optional
        Direction of each test's statistic (mean of D; W+ - W-). Both or neither.
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
    if (sign_t is None) != (sign_w is None):
        raise ValueError("give both sign_t and sign_w (the directions of the two tests), or neither.")
    crit = [Criterion("mean test", p_t, None if sign_t is None else np.asarray(sign_t, dtype=float)),
            Criterion("rank test", p_w, None if sign_w is None else np.asarray(sign_w, dtype=float))]
    return decide(crit, method=method, alpha=alpha).significant
