"""Spearman correlation with a cluster bootstrap interval (rows nested in clusters, e.g. tokens in documents)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as _sps

from moeaudit.stats._checks import _check_ci, _finite_1d, _same_length

_BLOCK_ELEMENTS = 1 << 21  # per block, over all the columns ranked


@dataclass(frozen=True)
class SpearmanCI:
    """Result of :func:`spearman_cluster_ci`."""

    n: int
    n_clusters: int
    rho: float
    ci_low: float
    ci_high: float


def _below(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """[C, n] for every cluster c and row i: #{j in c : v_j < v_i} + #{j in c : v_j = v_i} / 2."""
    out = np.empty((n_groups, values.size))
    for c in range(n_groups):
        members = np.sort(values[groups == c])
        left = np.searchsorted(members, values, side="left")
        right = np.searchsorted(members, values, side="right")
        out[c] = left + 0.5 * (right - left)
    return out


def cluster_weighted_spearman(x: np.ndarray, y: np.ndarray, groups: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[B] Spearman ρ of the samples that hold cluster c ``counts[b, c]`` times (each time with all its rows);
    exactly ``scipy.stats.spearmanr`` of the expanded samples. NaN where x or y is constant in a sample."""
    return _cluster_weighted_spearman_many({"x": x, "y": y}, [("x", "y")], groups, counts)[("x", "y")]


def _cluster_weighted_spearman_many(columns: dict[str, np.ndarray], pairs: list[tuple[str, str]],
                                    groups: np.ndarray, counts: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    """ρ of every pair over the resamples ``counts`` [B, C]; the ranks of each column are computed once.

    In a sample holding cluster c counts[b, c] times, the average rank of row i is
    Σ_c counts[b, c] · below_c(i) + 1/2, with below_c(i) the rows of cluster c under x_i plus half of those tied
    with it (row i itself included), so the ranks of all resamples are one matrix product per column."""
    counts = np.atleast_2d(np.asarray(counts, dtype=float))
    n_groups = counts.shape[1]
    names = list(dict.fromkeys(name for pair in pairs for name in pair))
    below = {name: _below(np.asarray(columns[name], dtype=float), groups, n_groups) for name in names}
    sizes = np.bincount(groups, minlength=n_groups).astype(float)
    out = {pair: np.empty(counts.shape[0]) for pair in pairs}
    n_rows = groups.size
    block = max(1, _BLOCK_ELEMENTS // max(1, n_rows * len(names)))
    for s in range(0, counts.shape[0], block):
        cb = counts[s:s + block]
        w = cb[:, groups]  # [b, n] copies of each row
        total = cb @ sizes
        ranks, weighted, mean, ss = {}, {}, {}, {}
        for name in names:
            ranks[name] = cb @ below[name] + 0.5
            weighted[name] = w * ranks[name]
            mean[name] = weighted[name].sum(axis=1) / total
            # centred sums (ranks are spread over 1..total: no harmful cancellation)
            ss[name] = np.einsum("ij,ij->i", weighted[name], ranks[name]) - total * mean[name] ** 2
        tiny = 1e-9 * total ** 3  # a constant sample has zero rank variance up to rounding
        for a, b in pairs:
            sab = np.einsum("ij,ij->i", weighted[a], ranks[b]) - total * mean[a] * mean[b]
            with np.errstate(invalid="ignore", divide="ignore"):
                out[(a, b)][s:s + block] = np.where((ss[a] > tiny) & (ss[b] > tiny), sab / np.sqrt(ss[a] * ss[b]),
                                                    np.nan)
    return {pair: np.clip(values, -1.0, 1.0) for pair, values in out.items()}


def spearman_cluster_ci(x, y, clusters, *, n_boot: int = 2000, ci: float = 0.95,
                        seed: int | None = 0) -> SpearmanCI:
    r"""Spearman's ρ of (x, y) with a percentile cluster-bootstrap interval.

    Estimand: the rank correlation of x and y over rows (e.g. one row per ablated expert and token). Unit of
    inference: the cluster (e.g. the document): each of ``n_boot`` resamples draws whole clusters with
    replacement, with all their rows, so rows that share a token or a document are never counted as independent
    evidence; ρ is recomputed on every resample with the ranks of the resample (average ranks for ties, the
    duplicated rows of a cluster drawn twice tying with each other), and the interval is its (1 − ci)/2 and
    (1 + ci)/2 quantiles (Davison & Hinkley 1997, section 3.8; Field & Welsh 2007). Resamples where x or y is
    constant are left out.

    Returns ``rho`` (``scipy.stats.spearmanr`` on all rows) and the interval; all NaN when x or y is constant.

    References
    ----------
    Davison, A. C., & Hinkley, D. V. (1997). Bootstrap Methods and their Application. Cambridge University Press.
    Field, C. A., & Welsh, A. H. (2007). Bootstrapping clustered data. J. R. Stat. Soc. B, 69(3), 369-390.
    """
    return spearman_cluster_cis({"x": x, "y": y}, [("x", "y")], clusters, n_boot=n_boot, ci=ci,
                                seed=seed)[("x", "y")]


def spearman_cluster_cis(columns: dict, pairs: list[tuple[str, str]], clusters, *, n_boot: int = 2000,
                         ci: float = 0.95, seed: int | None = 0) -> dict[tuple[str, str], SpearmanCI]:
    """:func:`spearman_cluster_ci` of several pairs of columns over the same rows and the same resamples (each
    column ranked once per resample): ``{(a, b): SpearmanCI}``."""
    arrays = {name: _finite_1d(name, values) for name, values in columns.items()}
    n = next(iter(arrays.values())).size
    for name, values in arrays.items():
        _same_length(name, values, "the other columns", np.empty(n))
    _check_ci(ci, n_boot)
    labels = np.asarray(clusters)
    if labels.shape != (n,):
        raise ValueError(f"clusters must give one label per row: expected length {n}, got shape {labels.shape}.")
    _, groups = np.unique(labels, return_inverse=True)
    groups = groups.ravel()
    n_clusters = int(groups.max()) + 1
    nan = float("nan")
    out: dict[tuple[str, str], SpearmanCI] = {}
    live = []
    for a, b in pairs:
        if np.ptp(arrays[a]) == 0 or np.ptp(arrays[b]) == 0:
            out[(a, b)] = SpearmanCI(n, n_clusters, nan, nan, nan)
        else:
            out[(a, b)] = SpearmanCI(n, n_clusters, float(_sps.spearmanr(arrays[a], arrays[b]).statistic), nan, nan)
            live.append((a, b))
    if n_clusters < 2 or not live:
        return out
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_clusters, size=(n_boot, n_clusters))
    counts = np.zeros((n_boot, n_clusters))
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
    boots = _cluster_weighted_spearman_many(arrays, live, groups, counts)
    for pair in live:
        boot = boots[pair][np.isfinite(boots[pair])]
        if boot.size:
            low, high = (float(q) for q in np.quantile(boot, [(1 - ci) / 2, (1 + ci) / 2]))
            out[pair] = SpearmanCI(n, n_clusters, out[pair].rho, low, high)
    return out
