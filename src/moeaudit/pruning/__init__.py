"""Pruning experts and measuring what it costs: which experts a criterion removes, in-memory pruning equal to a
sliced checkpoint, the causal importance map, and the ``prune-eval`` experiment."""

from moeaudit.pruning._hook import pruned
from moeaudit.pruning._plan import (
    CAUSAL,
    NONE,
    RANDOM,
    PruneGeometry,
    n_removed,
    plan_removal,
    prune_geometry,
    rank_experts,
    removal_masks,
)
from moeaudit.pruning._slice import PRUNING_FILE, save_pruned, slice_experts

__all__ = [
    "CAUSAL",
    "NONE",
    "PRUNING_FILE",
    "RANDOM",
    "PruneGeometry",
    "n_removed",
    "plan_removal",
    "prune_geometry",
    "pruned",
    "rank_experts",
    "removal_masks",
    "save_pruned",
    "slice_experts",
]
