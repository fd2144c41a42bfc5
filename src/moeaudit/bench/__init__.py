"""The engine benchmark: ablations/second of the naive and fast engines at real model geometry, the floor, and the
fast engine's peak memory.

Run ``moeaudit bench`` (or ``python -m moeaudit.bench``); ``--help`` lists every option. ``--preset`` picks a
geometry: ``olmoe-1b-7b``, ``qwen1.5-moe-a2.7b`` and ``deepseek-v2-lite`` are the public config shapes of those
checkpoints with random weights (nothing is downloaded); ``olmoe-reduced`` (default) is OLMoE's layout at 1/8 width.
``--num-hidden-layers`` builds fewer layers at real width (what fits a CPU).

Importing this package is cheap (torch loads when a benchmark runs).
"""

from __future__ import annotations

from typing import Any

from moeaudit.bench._config import BENCH_PRESETS, BenchConfig

_LAZY = {"BenchResult": "_run", "LiveTensorBytes": "_peak", "PeakMemory": "_peak", "build_model": "_run",
         "format_result": "_run", "run_bench": "_run"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"moeaudit.bench.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'moeaudit.bench' has no attribute {name!r}")


__all__ = ["BENCH_PRESETS", "BenchConfig", "BenchResult", "LiveTensorBytes", "PeakMemory", "build_model",
           "format_result", "run_bench"]
