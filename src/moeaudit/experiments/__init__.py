"""The paper's experiments and their extensions: audit (Definition 2.1), routing-weight control, rank validity,
progressive ablation, redistribution, ranking stability; records and their summaries.

Shared sampling rules: positions are sampled uniformly without replacement from the corpus's valid positions with a
seed; the same positions serve every metric of a layer; positions with fewer than two active experts are skipped;
ties in a metric are broken at random (seeded by the run's seed, the layer and the position); experts whose metric is
NaN are left out of its ranking (a position with fewer than two ranked experts is skipped for that metric); the
verification suite runs first and a failure stops the experiment.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
from torch import nn

from moeaudit.config import check_attribution
from moeaudit.experiments._arms import margin_rule
from moeaudit.experiments._attribution_control import attribution_vs_control
from moeaudit.experiments._decide import DECISIONS, decision_counts
from moeaudit.experiments._domains import add_domain_tables, domain_table
from moeaudit.experiments._records import RECORD_COLUMNS, to_frame
from moeaudit.experiments._run import (
    EXPERIMENTS,
    OPTIONAL_EXPERIMENTS,
    PAPER_METRICS,
    POOL,
    ROUTING_WEIGHT,
    ExperimentSettings,
    Progress,
    collect_progressive,
    collect_single,
)
from moeaudit.experiments._sampling import candidate_positions
from moeaudit.experiments._stability import ranking_stability
from moeaudit.experiments._states import CleanStates
from moeaudit.experiments._summary import summarize, summary_settings


@dataclass(frozen=True)
class ExperimentResult:
    """Records of one or more experiments, their cell tables, and the verification report that gated them."""

    records: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    verification: object | None = None
    metrics: pd.DataFrame | None = None
    stability: pd.DataFrame | None = field(default=None)


def _verified(model: nn.Module, sequences: Sequence, verification, seed: int):
    if verification is None:
        from moeaudit.intervene._verify import verify

        verification = verify(model, None, list(sequences)[:2], seed=seed)
    verification.raise_if_failed()
    return verification


def _metric_table(model, sequences, metric_table):
    if metric_table is None:
        from moeaudit.observation._observe import observe

        metric_table = observe(model, [getattr(s, "input_ids", s) for s in sequences])
    return metric_table


def run_experiments(model: nn.Module, sequences: Sequence, settings: ExperimentSettings = ExperimentSettings(), *,
                    experiments: Sequence[str] = EXPERIMENTS, metric_table: pd.DataFrame | None = None,
                    verification=None, progress: Progress | None = None,
                    on_layer: Callable[[str, int, pd.DataFrame], None] | None = None,
                    clean_cache_bytes: int | None = None) -> ExperimentResult:
    """Run the named experiments on ``sequences`` (one clean pass per sequence serves every layer and experiment,
    while the clean states fit in memory).

    Args:
        model: A transformers MoE causal LM.
        sequences: Unpadded token sequences (``CorpusSequence`` or 1-D tensors).
        settings: Layers, metrics, n, seed, scope, mode (see :class:`ExperimentSettings`).
        experiments: Any of ``audit``, ``control``, ``rank_validity``, ``progressive``, ``redistribution`` (the
            default: all five), and ``attribution`` (with ``control``: :func:`attribution_control`).
        metric_table: The ``observe`` table ranking the experts; computed on ``sequences`` when ``None``.
        verification (VerificationReport | None): A passed :class:`~moeaudit.intervene._verify.VerificationReport`; run here when ``None``.
        progress: Called with the number of positions finished.
        on_layer: Called with (``"single"`` or ``"progressive"``, layer, records) as each unit finishes.
        clean_cache_bytes: Bytes of clean passes kept for reuse across layers (``None``: half the free memory of
            the model's device; ``0``: none, one clean pass per sequence and layer). See
            :class:`moeaudit.experiments.CleanStates`.
    """
    from moeaudit.errors import ConfigError, did_you_mean

    valid = EXPERIMENTS + OPTIONAL_EXPERIMENTS
    for name in experiments:
        if name not in valid:
            raise ConfigError(f"unknown experiment {name!r}; valid: {', '.join(valid)}.{did_you_mean(name, valid)}")
    check_attribution(experiments, settings.scope)
    verification = _verified(model, sequences, verification, settings.seed)
    needs_metrics = "audit" in experiments or "rank_validity" in experiments
    metric_table = _metric_table(model, sequences, metric_table) if needs_metrics else metric_table
    layers = settings.check(model, metric_table if needs_metrics else None)
    parts = []
    single = [e for e in experiments if e != "progressive"]
    states = CleanStates(model, sequences, layers=layers, budget_bytes=clean_cache_bytes)
    for layer in layers:
        if single:
            frame = collect_single(model, sequences, metric_table if needs_metrics else None, settings, layer,
                                   experiments=single, progress=progress, states=states)
            parts.append(frame)
            if on_layer:
                on_layer("single", layer, frame)
        if "progressive" in experiments:
            frame = collect_progressive(model, sequences, settings, layer, progress=progress, states=states)
            parts.append(frame)
            if on_layer:
                on_layer("progressive", layer, frame)
    records = pd.concat(parts, ignore_index=True) if parts else to_frame([])
    return ExperimentResult(records, summarize(records, metrics=metric_table, seed=settings.seed), verification,
                            metric_table)


def audit(model, sequences, settings: ExperimentSettings = ExperimentSettings(), **kw) -> ExperimentResult:
    """Definition 2.1 per (layer, metric): ablate the highest- and lowest-ranked active expert at n positions."""
    return run_experiments(model, sequences, settings, experiments=("audit",), **kw)


def routing_control(model, sequences, settings: ExperimentSettings = ExperimentSettings(), **kw) -> ExperimentResult:
    """The audit with the per-token routing weight in place of the metric, plus Spearman(weight ratio, D)."""
    return run_experiments(model, sequences, settings, experiments=("control",), **kw)


def rank_validity(model, sequences, settings: ExperimentSettings = ExperimentSettings(), **kw) -> ExperimentResult:
    """Ablate every active expert; Spearman between metric rank and delta within each token, aggregated."""
    return run_experiments(model, sequences, settings, experiments=("rank_validity",), **kw)


def attribution_control(model, sequences, settings: ExperimentSettings = ExperimentSettings(),
                        **kw) -> ExperimentResult:
    """The routing-weight control and, at the same positions, the same comparison with each token's active experts
    ranked by their attribution estimate (:func:`moeaudit.attribute`, in ``settings.mode``), with the paired
    question of which ranking separates the costlier expert better (``tables["attribution_control"]``,
    ``tables["attribution_vs_control"]``; :mod:`moeaudit.experiments._attribution_control`). The ΔL are the
    single-expert pool's: no ablation beyond the control's."""
    return run_experiments(model, sequences, settings, experiments=("control", "attribution"), **kw)


def progressive(model, sequences, settings: ExperimentSettings = ExperimentSettings(), **kw) -> ExperimentResult:
    """Remove the active experts cumulatively, k = 1..K-1, in each order of ``settings.progressive_arms`` (highest
    or lowest routing weight first, seeded random) at the same positions; per arm mean, median, P95 of delta, and
    the paired comparison of the arms (``tables["progressive_arms"]``)."""
    return run_experiments(model, sequences, settings, experiments=("progressive",), **kw)


def redistribution(model, sequences, settings: ExperimentSettings = ExperimentSettings(), **kw) -> ExperimentResult:
    """Per expert: freed weight, gap norm, compensation, coverage; per layer the Spearman chains."""
    return run_experiments(model, sequences, settings, experiments=("redistribution",), **kw)


__all__ = [
    "CleanStates",
    "DECISIONS",
    "decision_counts",
    "margin_rule",
    "EXPERIMENTS",
    "OPTIONAL_EXPERIMENTS",
    "PAPER_METRICS",
    "POOL",
    "RECORD_COLUMNS",
    "ROUTING_WEIGHT",
    "ExperimentResult",
    "ExperimentSettings",
    "audit",
    "add_domain_tables",
    "attribution_control",
    "attribution_vs_control",
    "candidate_positions",
    "domain_table",
    "progressive",
    "rank_validity",
    "ranking_stability",
    "redistribution",
    "routing_control",
    "run_experiments",
    "summarize",
    "summary_settings",
]
