"""The single-expert pool as arrays, and the one vectorised rule every expert-level statistic shares: at each
position, ablate the highest- and the lowest-scored active expert and take D = ΔL_high − ΔL_low.

The pool (records with ``experiment == "pool"``) holds ΔL for *every* active expert at every sampled position of a
layer, so any ranking of the experts (a metric, a random relabelling of it, a ranking estimated from other
documents) can be evaluated without a new ablation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from moeaudit.experiments._run import POOL

# Score blocks are evaluated so that one [rows, positions, top_k] array stays ~32 MB.
_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Pool:
    """The single-expert pool of one (model, layer).

    Attributes:
        model: Model name of the records.
        layer: Decoder-layer index.
        seq_id: [P] document of each sampled position.
        position: [P] token position.
        experts: [P, K] int64 active experts (router order), -1 where a position has fewer than K.
        delta: [P, K] ΔL of ablating that expert alone, NaN at padding.
        weights: [P, K] the expert's routing weight at the position, NaN at padding.
    """

    model: str
    layer: int
    seq_id: np.ndarray
    position: np.ndarray
    experts: np.ndarray
    delta: np.ndarray
    weights: np.ndarray

    @property
    def n_positions(self) -> int:
        return int(self.seq_id.size)

    @property
    def active(self) -> np.ndarray:
        """[P, K] True where a real active expert sits."""
        return self.experts >= 0

    def subset(self, rows: np.ndarray) -> Pool:
        """The pool restricted to positions ``rows`` (indices or a boolean mask)."""
        return Pool(self.model, self.layer, self.seq_id[rows], self.position[rows], self.experts[rows],
                    self.delta[rows], self.weights[rows])


def pools(records: pd.DataFrame) -> dict[tuple[str, int], Pool]:
    """Every (model, layer)'s pool from a record table (empty when it holds no pool rows).

    Positions come in (seq_id, position) order and experts in the order of the record's ``active_experts``
    (the router's), so the arrays do not depend on the order the records were written in.
    """
    sub = records[records["experiment"] == POOL]
    out: dict[tuple[str, int], Pool] = {}
    for (model, layer), group in sub.groupby(["model", "layer"], sort=True):
        first = group.drop_duplicates(["seq_id", "position"]).sort_values(["seq_id", "position"])
        actives = [np.asarray(a, dtype=np.int64) for a in first["active_experts"]]
        weights = [np.asarray(w, dtype=float) for w in first["active_weights"]]
        k = max(len(a) for a in actives)
        n = len(actives)
        experts = np.full((n, k), -1, dtype=np.int64)
        w = np.full((n, k), np.nan)
        for i, (a, wt) in enumerate(zip(actives, weights)):
            experts[i, : len(a)] = a
            w[i, : len(a)] = wt
        row_of = pd.Series(np.arange(n), index=pd.MultiIndex.from_arrays([first["seq_id"], first["position"]]))
        rows = row_of.reindex(pd.MultiIndex.from_arrays([group["seq_id"], group["position"]])).to_numpy()
        ablated = np.array([int(e[0]) for e in group["ablated_experts"]], dtype=np.int64)
        cols = np.argmax(experts[rows] == ablated[:, None], axis=1)
        if not np.all(experts[rows, cols] == ablated):
            raise ValueError(f"pool records of layer {layer} ablate an expert that is not active at its position; "
                             "the record table is damaged (re-run the cell).")
        delta = np.full((n, k), np.nan)
        delta[rows, cols] = group["delta"].to_numpy(dtype=float)
        out[(str(model), int(layer))] = Pool(str(model), int(layer), first["seq_id"].to_numpy(np.int64),
                                             first["position"].to_numpy(np.int64), experts, delta, w)
    return out


def high_low_d(pool: Pool, scores: np.ndarray, *, per_position: bool = False) -> np.ndarray:
    r"""Cohen's d_z of D = ΔL(highest-scored) − ΔL(lowest-scored active expert), for many scorings at once.

    At each position only the active experts with a finite score and a finite ΔL compete; a position with fewer
    than two of them is left out of that scoring's D. Ties go to the first expert in router order (callers that
    need a random tie-break add a jitter smaller than the gap between distinct scores).

    Args:
        pool: The layer's pool.
        scores: [R, n_experts] one score per expert for each of R rankings (a static ranking), or
            [R, P, K] one score per active expert and position (a per-token ranking such as the routing weight).
        per_position: Also return D itself.

    Returns:
        [R] d_z = mean(D) / sd(D) (ddof = 1) over each scoring's valid positions; NaN where fewer than 3
        positions are valid or D has zero spread. With ``per_position``, ``(d, D)`` where D is [R, P] with NaN at
        left-out positions.
    """
    scores = np.asarray(scores, dtype=float)
    if scores.ndim not in (2, 3):
        raise ValueError(f"scores must be [R, n_experts] or [R, P, K], got shape {scores.shape}.")
    rows = scores.shape[0]
    p, k = pool.experts.shape
    block = max(1, _BLOCK_ELEMENTS // max(1, p * k))
    d_out = np.empty(rows)
    diff_out = np.empty((rows, p)) if per_position else None
    usable = pool.active & np.isfinite(pool.delta)
    all_usable = bool(usable.all()) and k >= 2
    safe_experts = np.where(pool.active, pool.experts, 0)
    for start in range(0, rows, block):
        chunk = scores[start:start + block]
        s = chunk[:, safe_experts] if chunk.ndim == 2 else chunk  # [r, P, K]
        delta = np.broadcast_to(pool.delta, s.shape)
        if all_usable and np.isfinite(chunk).all():  # the common case: no masking needed
            hi, lo = np.argmax(s, axis=2), np.argmin(s, axis=2)
            enough = None
        else:
            ok = usable[None] & np.isfinite(s)
            hi = np.argmax(np.where(ok, s, -np.inf), axis=2)
            lo = np.argmin(np.where(ok, s, np.inf), axis=2)
            enough = ok.sum(axis=2) >= 2
        diff = (np.take_along_axis(delta, hi[..., None], 2) - np.take_along_axis(delta, lo[..., None], 2))[..., 0]
        if enough is not None:
            diff = np.where(enough, diff, np.nan)
        d_out[start:start + block] = d_z_rows(diff)
        if per_position:
            diff_out[start:start + block] = diff
    return (d_out, diff_out) if per_position else d_out


def d_z_rows(diff: np.ndarray) -> np.ndarray:
    """Row-wise d_z = mean / sd (ddof = 1) over the finite entries; NaN for fewer than 3 of them or a D whose spread
    is below 1e-12 of its largest magnitude (floating-point noise would make d astronomically large)."""
    ok = np.isfinite(diff)
    n = ok.sum(axis=-1)
    x = np.where(ok, diff, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = x.sum(axis=-1) / n
        var = (np.where(ok, diff - mean[..., None], 0.0) ** 2).sum(axis=-1) / (n - 1)
        spread = np.where(ok, diff, -np.inf).max(axis=-1) - np.where(ok, diff, np.inf).min(axis=-1)
        scale = np.abs(np.where(ok, diff, 0.0)).max(axis=-1)
        return np.where((n >= 3) & (spread > 1e-12 * scale), mean / np.sqrt(var), np.nan)
