"""Input checks shared by the statistics (clear errors naming the bad input and the fix)."""

from __future__ import annotations

import numpy as np


def _finite_1d(name: str, values, *, min_n: int = 3) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}; flatten it or pass one cell at a time.")
    if arr.size < min_n:
        raise ValueError(f"{name} needs at least {min_n} values, got {arr.size}.")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        shown = ", ".join(str(i) for i in bad[:10]) + (", ..." if bad.size > 10 else "")
        raise ValueError(
            f"{name} has {bad.size} non-finite value(s) (NaN or inf) at index {shown}; "
            "drop those positions (from both arrays) before testing."
        )
    return arr


def _same_length(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same length, got {a.size} and {b.size}.")


def _check_ci(ci: float, n_boot: int) -> None:
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci!r}; e.g. 0.95 for a 95% interval.")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}.")


def _groups(clusters, n: int, *, min_clusters: int) -> tuple[np.ndarray, int]:
    """Cluster labels as integer codes 0..G-1 (one per position) and G; ``None`` gives every position its own."""
    if clusters is None:
        return np.arange(n), n
    labels = np.asarray(clusters)
    if labels.ndim != 1 or labels.size != n:
        raise ValueError(f"clusters must give one label per position: expected length {n}, got shape {labels.shape}.")
    if labels.dtype.kind == "f" and not np.all(np.isfinite(labels)):
        raise ValueError("clusters contains NaN or inf labels; give every position a cluster id.")
    _, groups = np.unique(labels, return_inverse=True)
    groups = groups.ravel()
    n_groups = int(groups.max()) + 1 if groups.size else 0
    if n_groups < min_clusters:
        have = "a single cluster" if n_groups == 1 else f"{n_groups} clusters"
        raise ValueError(f"clusters has {have}; this statistic needs at least {min_clusters} (or pass "
                         "clusters=None).")
    return groups, n_groups
