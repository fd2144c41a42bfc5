"""Where a run's cells are computed, and which: executors (local, Ray), shards, and merging sharded runs.

A run is a list of cells (one layer's single-expert pool, or one layer's progressive ablation) in a canonical
order. :class:`Execution` says how they are computed: in this process (``local``) or on Ray actors (``ray``), all of
them or one :class:`Shard` (cell ``j`` goes to shard ``j mod N``), and how many clean passes to keep for reuse. The
pipeline hands the pending cells to an executor, which returns each cell's records as it finishes; the pipeline
writes it atomically into the run directory, so resuming works the same whoever computed the cells.
:func:`merge_runs` combines the run directories of the shards of one run into one run directory.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from moeaudit.errors import ConfigError
from moeaudit.run.execution._local import CellExecutor, CellJob, CellResult, LocalExecutor, compute_cell
from moeaudit.run.execution._merge import merge_runs
from moeaudit.run.execution._spec import (
    EXECUTORS,
    Cell,
    Execution,
    Shard,
    canonical_cells,
    check_shard,
    parse_bytes,
)

if TYPE_CHECKING:
    from torch import nn


def check_executor(execution: Execution, config=None) -> None:
    """Refuse an executor whose package is missing, or that cannot honour ``config``, before anything is loaded.

    Ray actors each load the whole model on one device (one GPU each), so a configuration whose ``device_map``
    spreads the model over several devices is refused for Ray rather than silently loaded whole per actor.
    """
    if execution.executor == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError("--executor ray needs Ray, which is not installed here: pip install 'moeaudit[ray]' "
                          "(or 'ray>=2.40'), or run with --executor local.")
    if execution.executor == "ray" and getattr(config, "device_map", None) is not None:
        raise ConfigError(f"--executor ray loads the whole model on one device per actor, but device_map="
                          f"{config.device_map!r} spreads it over several; for a model that needs a device map, "
                          "run with --executor local, and split the work over machines with --shard I/N.")


def release_device_memory() -> None:
    """Give cached GPU memory back after the driver dropped its model (the workers load their own)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_executor(execution: Execution, *, config, model: nn.Module,
                  trust_remote_code: bool = False) -> CellExecutor:
    """The executor ``execution`` names (``model`` serves the local one; Ray actors load their own, running the
    checkpoint's code only when the caller allowed it: ``trust_remote_code`` is not configuration)."""
    check_executor(execution, config)
    if execution.executor == "ray":
        from moeaudit.run.execution._ray import RayExecutor

        return RayExecutor(config, actors=execution.ray_actors, max_retries=execution.max_retries,
                           clean_cache_bytes=execution.clean_cache_bytes, before_cell=execution.before_cell,
                           trust_remote_code=trust_remote_code)
    return LocalExecutor(model, clean_cache_bytes=execution.clean_cache_bytes, before_cell=execution.before_cell)


__all__ = [
    "EXECUTORS",
    "Cell",
    "CellExecutor",
    "CellJob",
    "CellResult",
    "Execution",
    "LocalExecutor",
    "Shard",
    "canonical_cells",
    "check_executor",
    "check_shard",
    "compute_cell",
    "make_executor",
    "merge_runs",
    "parse_bytes",
    "release_device_memory",
]
