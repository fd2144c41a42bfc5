"""moeaudit: causal audits of Mixture-of-Experts language models.

Public API (imported lazily so that ``import moeaudit`` stays fast and pulls in neither torch nor matplotlib
until a name is used).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "Ablation": "moeaudit.intervene",
    "AblationResult": "moeaudit.intervene",
    "AttributeConfig": "moeaudit.run.attribution",
    "CorpusSequence": "moeaudit.corpus",
    "Execution": "moeaudit.run.execution",
    "ExpertMeans": "moeaudit.intervene",
    "ExperimentSettings": "moeaudit.experiments",
    "MapConfig": "moeaudit.pruning",
    "MoEDescription": "moeaudit.models",
    "PruneConfig": "moeaudit.pruning",
    "RunConfig": "moeaudit.config",
    "SequenceAblator": "moeaudit.intervene",
    "Shard": "moeaudit.run.execution",
    "ablate": "moeaudit.intervene",
    "attribute": "moeaudit.intervene",
    "attribution_run": "moeaudit.run.attribution",
    "describe": "moeaudit.models",
    "expert_means": "moeaudit.intervene",
    "importance_map": "moeaudit.run._prune",
    "load_corpus": "moeaudit.corpus",
    "load_model": "moeaudit.models",
    "load_run": "moeaudit.report",
    "mean_replaced": "moeaudit.pruning",
    "merge_runs": "moeaudit.run.execution",
    "moe_layers": "moeaudit.models",
    "observe": "moeaudit.observation._observe",
    "preset": "moeaudit.config",
    "prune_eval": "moeaudit.run._prune",
    "pruned": "moeaudit.pruning",
    "removed_size": "moeaudit.pruning",
    "run_audit": "moeaudit.run.pipeline",
    "run_experiments": "moeaudit.experiments",
    "slice_experts": "moeaudit.pruning",
    "summarize": "moeaudit.experiments",
    "valid_positions": "moeaudit.corpus",
    "validate": "moeaudit.run._validate",
    "verify": "moeaudit.intervene._verify",
    "write_report": "moeaudit.report",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moeaudit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
