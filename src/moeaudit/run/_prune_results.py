"""What :func:`moeaudit.importance_map` and :func:`moeaudit.prune_eval` produced (:mod:`moeaudit.run._prune`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass
class MapResult:
    """What :func:`importance_map` produced."""

    directory: Path
    importance: pd.DataFrame
    records: pd.DataFrame
    report: dict[str, Path] = field(default_factory=dict)


@dataclass
class PruneResult:
    """What :func:`prune_eval` produced (the tables are also files of the run directory)."""

    directory: Path
    prune: pd.DataFrame
    tests: pd.DataFrame  # answer.csv: pooled over folds, one row per (criterion, fraction, allocation, method)
    pruned: pd.DataFrame
    importance: pd.DataFrame | None
    per_layer: pd.DataFrame | None = None  # prune_per_layer.csv: one row per one-layer pruning
    per_layer_effects: pd.DataFrame | None = None  # per_layer.csv: loss increase per (criterion, fraction, layer)
    lm_eval: pd.DataFrame | None = None
    lm_eval_answer: pd.DataFrame | None = None  # lm_eval_answer.csv: paired item-level statistics per task metric
    report: dict[str, Path] = field(default_factory=dict)
    saved: Path | None = None
    agreement: pd.DataFrame | None = None  # fold_agreement.csv
    sizes: pd.DataFrame | None = None  # sizes.csv: parameters and bytes removed per (fraction, method)
    super_experts: pd.DataFrame | None = None  # super_experts.csv (per fold)
    saved_pairs: list[Path] = field(default_factory=list)  # checkpoints of --save-pairs
    methods: pd.DataFrame | None = None  # methods.csv: mean replacement against deletion


__all__ = ["MapResult", "PruneResult"]
