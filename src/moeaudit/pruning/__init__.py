"""Pruning experts and measuring what it costs: which experts a criterion removes, in-memory pruning equal to a
sliced checkpoint, the causal importance map, and the ``prune-eval`` experiment.

The names are imported on first use (:pep:`562`), so the command line reads the configuration classes without
importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moeaudit.pruning._config import CAUSAL, MAP_PRESETS, NONE, PRUNE_PRESETS, RANDOM, MapConfig, PruneConfig
    from moeaudit.pruning._hook import pruned
    from moeaudit.pruning._importance import IMPORTANCE_COLUMNS, collect_pool, importance_table
    from moeaudit.pruning._plan import (
        PruneGeometry,
        n_removed,
        plan_removal,
        prune_geometry,
        rank_experts,
        removal_masks,
    )
    from moeaudit.pruning._slice import PRUNING_FILE, save_pruned, slice_experts
    from moeaudit.pruning._units import PruneUnit, build_units, sequence_losses
    from moeaudit.run._prune import MapResult, PruneResult, importance_map, prune_eval

#: Public name -> the private module defining it.
_EXPORTS: dict[str, str] = {
    "CAUSAL": "_config",
    "IMPORTANCE_COLUMNS": "_importance",
    "MAP_PRESETS": "_config",
    "MapConfig": "_config",
    "MapResult": "_pipeline",
    "NONE": "_config",
    "PRUNE_PRESETS": "_config",
    "PRUNING_FILE": "_slice",
    "PruneConfig": "_config",
    "PruneGeometry": "_plan",
    "PruneResult": "_pipeline",
    "PruneUnit": "_units",
    "RANDOM": "_config",
    "build_units": "_units",
    "collect_pool": "_importance",
    "importance_map": "_pipeline",
    "importance_table": "_importance",
    "n_removed": "_plan",
    "plan_removal": "_plan",
    "prune_eval": "_pipeline",
    "prune_geometry": "_plan",
    "pruned": "_hook",
    "rank_experts": "_plan",
    "removal_masks": "_plan",
    "save_pruned": "_slice",
    "sequence_losses": "_units",
    "slice_experts": "_slice",
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
