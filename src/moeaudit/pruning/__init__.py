"""Pruning experts and measuring what it costs: which experts a criterion removes, in-memory pruning equal to a
sliced checkpoint, the causal importance map, and the ``prune-eval`` experiment."""

from moeaudit.pruning._config import MAP_PRESETS, PRUNE_PRESETS, MapConfig, PruneConfig
from moeaudit.pruning._hook import pruned
from moeaudit.pruning._importance import IMPORTANCE_COLUMNS, collect_pool, importance_table
from moeaudit.pruning._pipeline import MapResult, PruneResult, importance_map, prune_eval
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
from moeaudit.pruning._units import PruneUnit, build_units, sequence_losses

__all__ = [
    "CAUSAL",
    "IMPORTANCE_COLUMNS",
    "MAP_PRESETS",
    "NONE",
    "PRUNE_PRESETS",
    "PRUNING_FILE",
    "RANDOM",
    "MapConfig",
    "MapResult",
    "PruneConfig",
    "PruneGeometry",
    "PruneResult",
    "PruneUnit",
    "build_units",
    "collect_pool",
    "importance_map",
    "importance_table",
    "n_removed",
    "plan_removal",
    "prune_eval",
    "prune_geometry",
    "pruned",
    "rank_experts",
    "removal_masks",
    "save_pruned",
    "sequence_losses",
    "slice_experts",
]
