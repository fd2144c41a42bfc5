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
)


def collect_pool(model: nn.Module, sequences: Sequence, settings: ExperimentSettings, layer: int, *,
                 progress: Progress | None = None, states: CleanStates | None = None) -> pd.DataFrame:
    """The single-expert pool records of one layer: every active expert ablated alone at ``settings.n`` positions
    (``states``: clean passes shared with the other layers, see :class:`moeaudit.experiments.CleanStates`)."""
    return collect_single(model, sequences, None, settings, layer, experiments=(), progress=progress, states=states)


def importance_table(pool: pd.DataFrame, layers: Sequence[int], n_experts: int, *, ci: float = 0.95) -> pd.DataFrame:
    """Aggregate single-expert pool records into one row per (layer, expert) (see :data:`IMPORTANCE_COLUMNS`).

    Estimand of ``mean_delta``: the mean ΔL over the sampled positions at which the expert is routed (conditional
    on being routed; not weighted by how often it is). Unit of inference of its interval: the document (positions
    of one document are correlated), via :func:`moeaudit.stats.clustered_mean`. Experts with positions in one
    document only get no interval (NaN).
    """
    pool = pool[pool["experiment"] == POOL]
    expert = np.array([int(e[0]) for e in pool["ablated_experts"]], dtype=np.int64)
    frame = pd.DataFrame({"layer": pool["layer"].to_numpy(np.int64), "expert": expert,
                          "seq_id": pool["seq_id"].to_numpy(np.int64), "delta": pool["delta"].to_numpy(float)})
    groups = dict(iter(frame.groupby(["layer", "expert"], sort=True)))
    rows = []
    for layer in layers:
        for e in range(n_experts):
            part = groups.get((int(layer), e))
            if part is None or part.empty:
                rows.append((int(layer), e, 0, 0, np.nan, np.nan, np.nan, np.nan, np.nan, True))
                continue
            cm = clustered_mean(part["delta"].to_numpy(), part["seq_id"].to_numpy(), ci=ci)
            rows.append((int(layer), e, cm.n, cm.n_clusters, cm.estimate, cm.se, cm.ci_low, cm.ci_high,
                         float(np.mean(part["delta"].to_numpy() > 0)), False))
    table = pd.DataFrame(rows, columns=list(IMPORTANCE_COLUMNS))
    return table.astype({"layer": "int64", "expert": "int64", "n_routed": "int64", "n_docs": "int64",
                         "never_routed": "bool"})
