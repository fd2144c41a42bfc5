"""Pruning experts and measuring what it costs: which experts a criterion removes, in-memory pruning equal to a
sliced checkpoint, the causal importance table, and the units prune-eval measures (its run, with
:func:`moeaudit.importance_map` and :func:`moeaudit.prune_eval`, lives in :mod:`moeaudit.run._prune`).

The names are imported on first use (:pep:`562`), so the command line reads the configuration classes without
importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moeaudit.pruning._config import CAUSAL, MAP_PRESETS, NONE, PRUNE_PRESETS, RANDOM, MapConfig, PruneConfig
    from moeaudit.pruning._extras import parse_save_pairs
    from moeaudit.pruning._hook import pruned
    from moeaudit.pruning._importance import IMPORTANCE_COLUMNS, collect_pool, importance_table
    from moeaudit.pruning._mean import METHODS, mean_replaced, unrouted_replaced
    from moeaudit.pruning._plan import (
        PruneGeometry,
        n_removed,
        plan_removal,
        prune_geometry,
        rank_experts,
        removal_masks,
    )
    from moeaudit.pruning._size import PrunedSize, removed_size, size_table
    from moeaudit.pruning._slice import PRUNING_FILE, save_pruned, slice_experts
    from moeaudit.pruning._super import protect, removal_costs, super_experts
    from moeaudit.pruning._units import PruneUnit, build_units, sequence_losses

#: Public name -> the private module defining it.
_EXPORTS: dict[str, str] = {
    "CAUSAL": "_config",
    "IMPORTANCE_COLUMNS": "_importance",
    "MAP_PRESETS": "_config",
    "METHODS": "_mean",
    "MapConfig": "_config",
    "NONE": "_config",
    "PRUNE_PRESETS": "_config",
    "PRUNING_FILE": "_slice",
    "PruneConfig": "_config",
    "PruneGeometry": "_plan",
    "PrunedSize": "_size",
    "PruneUnit": "_units",
    "RANDOM": "_config",
    "build_units": "_units",
    "collect_pool": "_importance",
    "importance_table": "_importance",
    "n_removed": "_plan",
    "mean_replaced": "_mean",
    "parse_save_pairs": "_extras",
    "plan_removal": "_plan",
    "protect": "_super",
    "prune_geometry": "_plan",
    "pruned": "_hook",
    "removal_costs": "_super",
    "removed_size": "_size",
    "rank_experts": "_plan",
    "removal_masks": "_plan",
    "save_pruned": "_slice",
    "sequence_losses": "_units",
    "size_table": "_size",
    "slice_experts": "_slice",
    "super_experts": "_super",
    "unrouted_replaced": "_mean",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CAUSAL",
    "IMPORTANCE_COLUMNS",
    "MAP_PRESETS",
    "METHODS",
    "NONE",
    "PRUNE_PRESETS",
    "PRUNING_FILE",
    "RANDOM",
    "MapConfig",
    "PruneConfig",
    "PruneGeometry",
    "PrunedSize",
    "PruneUnit",
    "build_units",
    "collect_pool",
    "importance_table",
    "mean_replaced",
    "n_removed",
    "parse_save_pairs",
    "plan_removal",
    "protect",
    "prune_geometry",
    "pruned",
    "rank_experts",
    "removal_costs",
    "removal_masks",
    "removed_size",
    "save_pruned",
    "sequence_losses",
    "size_table",
    "slice_experts",
    "super_experts",
    "unrouted_replaced",
]
