"""The causal importance map: every active expert ablated singly at n positions per layer (the single-expert pool
of :func:`moeaudit.experiments._run.collect_single`), aggregated per (layer, expert)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from torch import nn

from moeaudit.experiments import POOL, CleanStates, ExperimentSettings
from moeaudit.experiments._run import Progress, collect_single
from moeaudit.stats import clustered_mean

#: Columns of ``importance.parquet``, one row per (layer, expert).
IMPORTANCE_COLUMNS: tuple[str, ...] = (
    "layer", "expert",
    "n_routed",  # sampled positions where the expert was active (and so ablated)
    "n_docs",  # documents those positions come from
    "mean_delta",  # mean ΔL over those positions (NaN when never routed)
    "se",  # document-clustered (CR1) standard error of mean_delta
    "ci_low", "ci_high",  # mean_delta -/+ t_{docs-1} se (95%)
    "share_hurts",  # share of those positions where removing the expert raised the loss (ΔL > 0)
    "never_routed",  # True when no sampled position routed the expert: no measured importance
    "n_positions",  # sampled positions of the layer (every one has top_k routed experts, each ablated alone)
    "routed_share",  # n_routed / n_positions: the share of calibration tokens routed to the expert
    "removal_cost",  # mean ΔL over all sampled positions, 0 where not routed (= routed_share x mean_delta)
    "removal_cost_low", "removal_cost_high",  # its 95% interval, clustered by document
)


def collect_pool(model: nn.Module, sequences: Sequence, settings: ExperimentSettings, layer: int, *,
                 progress: Progress | None = None, states: CleanStates | None = None) -> pd.DataFrame:
    """The single-expert pool records of one layer: every active expert ablated alone at ``settings.n`` positions
    (``states``: clean passes shared with the other layers, see :class:`moeaudit.experiments.CleanStates`)."""
    return collect_single(model, sequences, None, settings, layer, experiments=(), progress=progress, states=states)


def importance_table(pool: pd.DataFrame, layers: Sequence[int], n_experts: int, *, ci: float = 0.95) -> pd.DataFrame:
    r"""Aggregate single-expert pool records into one row per (layer, expert) (see :data:`IMPORTANCE_COLUMNS`).

    Estimand of ``mean_delta``: the mean ΔL over the sampled positions at which the expert is routed (conditional
    on being routed; not weighted by how often it is). Unit of inference of its interval: the document (positions
    of one document are correlated), via :func:`moeaudit.stats.clustered_mean`. Experts with positions in one
    document only get no interval (NaN).

    Estimand of ``removal_cost``: the expected loss increase per calibration token from removing the expert,

    .. math:: C_e = \frac{1}{N} \sum_{p=1}^{N} \Delta L_e(p)\, 1[e \text{ routed at } p]
              = \text{routed\_share}_e \times \text{mean\_delta}_e,

    over the N sampled positions of the layer (a uniform sample of the calibration split's valid positions, so
    C_e estimates the mean over all of them; ΔL at a position where e is not routed is exactly 0, since removing an
    expert there changes nothing at that layer). Its 95% interval is the CR1 t interval of that mean clustered by
    document. An expert never routed at a sampled position costs 0 and stays flagged ``never_routed``.
    """
    pool = pool[pool["experiment"] == POOL]
    expert = np.array([int(e[0]) for e in pool["ablated_experts"]], dtype=np.int64)
    frame = pd.DataFrame({"layer": pool["layer"].to_numpy(np.int64), "expert": expert,
                          "seq_id": pool["seq_id"].to_numpy(np.int64), "delta": pool["delta"].to_numpy(float)})
    frame["position"] = pool["position"].to_numpy(np.int64)
    groups = dict(iter(frame.groupby(["layer", "expert"], sort=True)))
    rows = []
    for layer in layers:
        at = frame[frame["layer"] == int(layer)]
        places = at[["seq_id", "position"]].drop_duplicates().sort_values(["seq_id", "position"])
        slot = {(s, p): i for i, (s, p) in enumerate(zip(places["seq_id"], places["position"]))}
        clusters = places["seq_id"].to_numpy()
        n_pos = len(places)
        for e in range(n_experts):
            part = groups.get((int(layer), e))
            if part is None or part.empty:
                zero = (0.0, 0.0, 0.0) if n_pos else (np.nan, np.nan, np.nan)
                rows.append((int(layer), e, 0, 0, np.nan, np.nan, np.nan, np.nan, np.nan, True, n_pos,
                             0.0 if n_pos else np.nan, *zero))
                continue
            cm = clustered_mean(part["delta"].to_numpy(), part["seq_id"].to_numpy(), ci=ci)
            spread = np.zeros(n_pos)
            spread[[slot[(s, p)] for s, p in zip(part["seq_id"], part["position"])]] = part["delta"].to_numpy()
            cost = clustered_mean(spread, clusters, ci=ci)
            rows.append((int(layer), e, cm.n, cm.n_clusters, cm.estimate, cm.se, cm.ci_low, cm.ci_high,
                         float(np.mean(part["delta"].to_numpy() > 0)), False, n_pos, cm.n / n_pos,
                         cost.estimate, cost.ci_low, cost.ci_high))
    table = pd.DataFrame(rows, columns=list(IMPORTANCE_COLUMNS))
    return table.astype({"layer": "int64", "expert": "int64", "n_routed": "int64", "n_docs": "int64",
                         "never_routed": "bool", "n_positions": "int64"})
