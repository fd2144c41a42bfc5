"""The parts of a prune-eval run beyond deletion, as run machinery: mean replacement's constants, super experts
and their protection, and writing one or several pruned checkpoints (the pure parts, ``--save-pairs`` parsing and
``methods.csv``, are :mod:`moeaudit.pruning._extras`).

Files of the run directory these parts add::

    fold<k>/expert_means.parquet  c_e of every pruned layer's experts on fold k's calibration split (unpruned
                                  model; ``--method mean``)
    super_experts.csv      per fold, the experts whose single removal costs most on its calibration split
                           (``--protect-top K``: those K are kept in that fold's prunings)
    methods.csv            mean replacement against deletion of the same experts (``--method delete,mean``)
    sizes.csv              parameters and bytes removed per (fraction, method)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from moeaudit.errors import ConfigError
from moeaudit.pruning._extras import check_save_pairs, parse_save_pairs, save_directory


def save_plan(config, criteria: list[str], save_pruned, save_criterion: str | None, save_fraction: float | None,
              save_pairs) -> tuple[list[tuple[str, float]], str | None, float | None, Path | None]:
    """Check, before any work, the checkpoints a prune-eval is asked to write; returns the ``--save-pairs`` pairs,
    the (``--save-criterion``, ``--save-fraction``) of a single checkpoint (filled in when the run has one
    criterion and one fraction) and the ``--save-pruned`` directory resolved (a single checkpoint's must be new or
    empty: :func:`moeaudit.pruning._slice.check_save_target`).

    Raises:
        ConfigError: both kinds named, a pair the run cannot write, a missing criterion or fraction, no uniform
            allocation, or a model spread by ``device_map``.
        FileExistsError: a single checkpoint's directory is a file or not empty.
    """
    pairs = parse_save_pairs(save_pairs)
    if pairs and (save_criterion is not None or save_fraction is not None):
        raise ConfigError("--save-pairs and --save-criterion / --save-fraction both name checkpoints; use one.")
    check_save_pairs(pairs, None if save_pruned is None else Path(save_pruned), config, criteria)
    if save_pruned is not None and not pairs and (save_criterion is None or save_fraction is None):
        if len(criteria) == 1 and len(config.fractions) == 1:
            save_criterion, save_fraction = criteria[0], config.fractions[0]
        else:
            raise ConfigError("--save-pruned needs --save-criterion and --save-fraction: the run prunes by "
                              f"{len(criteria)} criteria at {len(config.fractions)} fractions.")
    if save_pruned is not None and "uniform" not in config.allocation:
        raise ConfigError(f"--save-pruned writes a standard checkpoint, whose config has one expert count for every "
                          f"layer, but allocation={','.join(config.allocation)} removes different numbers per "
                          "layer; add uniform to allocation= (the checkpoint is the uniform pruning; "
                          "pruned.parquet lists every other pruning's removed experts).")
    if save_pruned is not None and not pairs:
        from moeaudit.pruning._slice import check_save_target

        save_pruned = check_save_target(save_pruned)  # before any work, not after it
    elif save_pruned is not None:
        save_pruned = Path(save_pruned).expanduser().resolve()
    if save_pruned is not None and config.device_map is not None:
        raise ConfigError(f"--save-pruned slices the checkpoint from the loaded model, which needs it whole on one "
                          f"device, but device_map={config.device_map!r} spreads it (and may offload weights); run "
                          "without device_map= to write the pruned checkpoint (pruned.parquet lists the removed "
                          "experts of every pruned model).")
    return pairs, save_criterion, save_fraction, save_pruned


def check_save(config, criteria: list[str], geometry, layers, save_criterion, save_fraction) -> None:
    """Refuse a checkpoint (criterion, fraction) the run cannot write, once the model's layers are known."""
    if save_criterion not in criteria:
        raise ConfigError(f"--save-criterion {save_criterion!r} is not a criterion of this run; choose one of "
                          f"{', '.join(criteria)}.")
    if save_fraction not in config.fractions:
        raise ConfigError(f"--save-fraction {save_fraction} is not a fraction of this run; choose one of "
                          f"{', '.join(map(str, config.fractions))}.")
    if tuple(layers) != tuple(geometry.moe_layers):
        raise ConfigError("--save-pruned needs every MoE layer pruned (a checkpoint has one expert count for all "
                          "layers); leave layers= unset.")


def save_one(loaded, units, config, out, criterion: str, fraction: float, run_dir) -> Path:
    """``--save-pruned`` with one (criterion, fraction): the uniform pruning of fold 0, experts deleted."""
    from moeaudit.pruning._slice import save_pruned as save

    unit = next(u for u in units if u.criterion == criterion and u.fraction == fraction and u.layer is None
                and u.allocation == "uniform" and u.fold == 0 and u.method == "delete")
    provenance: dict[str, Any] = {"criterion": criterion, "fraction": fraction, "seed": unit.seed,
                                  "fold": 0, "allocation": "uniform", "method": unit.method,
                                  "source_model": config.model, "run_directory": str(run_dir.path)}
    return save(loaded.model, unit.removal, out, tokenizer=loaded.tokenizer, provenance=provenance)


def save_pairs(loaded, units, config, pairs: list[tuple[str, float]], root: Path, run_dir) -> list[Path]:
    """Write every pair's checkpoint (experts deleted; the uniform allocation as ranked on fold 0's calibration
    split); returns their directories."""
    from moeaudit.pruning._slice import save_pruned

    out = []
    for criterion, fraction in pairs:
        unit = next(u for u in units if u.criterion == criterion and u.fraction == fraction and u.layer is None
                    and u.method == "delete" and u.allocation == "uniform" and u.fold == 0)
        provenance: dict[str, Any] = {"criterion": criterion, "fraction": fraction, "seed": unit.seed, "fold": 0,
                                      "allocation": "uniform", "method": "delete",
                                      "source_model": config.model, "run_directory": str(run_dir.path)}
        out.append(save_pruned(loaded.model, unit.removal, save_directory(root, criterion, fraction),
                               tokenizer=loaded.tokenizer, provenance=provenance))
    return out


def calibration_means(loaded, run_dir, s, progress):
    """``--method mean``: c_e of every pruned layer on the calibration split (unpruned model), stored in
    ``expert_means.parquet`` and read back on resume."""
    from moeaudit.intervene import ExpertMeans, expert_means

    stored = run_dir.read_parquet("expert_means.parquet")
    if stored is not None:
        means = ExpertMeans.from_frame(stored)
        means.check(loaded.model, loaded.layers)
        return means
    progress.stage("expert means on the calibration split (method mean)", len(loaded.calibration))
    with s.timer("expert means"):
        means = expert_means(loaded.model, loaded.calibration, layers=list(loaded.layers),
                             progress=progress.advance)
    run_dir.write_parquet("expert_means.parquet", means.to_frame())
    return means


def super_expert_table(config, importance: pd.DataFrame | None, run_dir, layers) -> pd.DataFrame | None:
    """One fold's super experts: the top max(protect_top, 5) experts by single-removal cost on its calibration
    split (``None`` without a map); ``protected`` marks the top ``protect_top``. Written to the fold directory's
    ``super_experts.csv``; the run's ``super_experts.csv`` stacks the folds with a ``fold`` column."""
    from moeaudit.pruning._super import super_experts

    if importance is None:
        return None
    records = None if "removal_cost" in importance.columns else run_dir.read_records()
    table = super_experts(importance, max(config.protect_top, 5), records=records, layers=layers)
    table["protected"] = table["rank"] <= config.protect_top
    run_dir.write_text("super_experts.csv", table.to_csv(index=False))
    return table
