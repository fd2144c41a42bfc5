"""The public surface: a sorted __all__ that resolves, and a light `import moeaudit`."""

from __future__ import annotations

import subprocess
import sys

import moeaudit

EXPECTED = [
    "Ablation", "AblationResult", "AttributeConfig", "CorpusSequence", "Execution", "ExperimentSettings", "ExpertMeans", "MapConfig",
    "MoEDescription", "PruneConfig", "RunConfig", "SequenceAblator", "Shard", "__version__", "ablate", "attribute", "attribution_run",
    "describe", "expert_means", "importance_map", "load_corpus", "load_model", "load_run", "mean_replaced", "merge_runs", "moe_layers",
    "observe", "preset", "prune_eval", "pruned", "removed_size", "run_audit", "run_experiments", "slice_experts", "summarize",
    "valid_positions", "validate", "verify",
    "write_report",
]


def test_all_is_sorted_and_complete():
    assert moeaudit.__all__ == sorted(moeaudit.__all__)
    assert moeaudit.__all__ == sorted(EXPECTED)


def test_every_export_resolves_to_a_function_or_class():
    for name in moeaudit.__all__:
        value = getattr(moeaudit, name)
        assert name == "__version__" or callable(value), name


def test_observe_and_verify_stay_functions_after_submodule_imports():
    code = ("import moeaudit.observation._observe, moeaudit.intervene._verify, moeaudit.run._validate, moeaudit; "
            "assert callable(moeaudit.observe) and callable(moeaudit.verify) and callable(moeaudit.validate)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_is_light():
    code = ("import sys, moeaudit; heavy = [m for m in ('torch', 'matplotlib', 'typer', 'transformers') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
