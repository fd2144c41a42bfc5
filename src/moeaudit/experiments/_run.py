"""Collecting ablation data: per layer, the single-expert pool (audit, control, rank validity, redistribution)
and the cumulative progressive ablations, each sequence's clean pass shared by all its ablations (and, through
:class:`~moeaudit.experiments._states.CleanStates`, by every cell of a run)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from moeaudit.config import PAPER_METRICS, PROGRESSIVE_ARMS, check_attribution
from moeaudit.errors import ConfigError, did_you_mean
from moeaudit.experiments._attribution_control import (
    ATTRIBUTION,
    attribution_metric,
    token_estimates,
)
from moeaudit.experiments._records import to_frame
from moeaudit.experiments._sampling import candidate_positions
from moeaudit.experiments._states import CleanStates, sequence_ids
from moeaudit.intervene import Ablation, ExpertMeans, SequenceAblator
from moeaudit.intervene._spec import MODES, SCOPES, check_choice
from moeaudit.models import describe, moe_block

#: The per-token quantity of the routing-weight control.
ROUTING_WEIGHT = "routing_weight"
EXPERIMENTS: tuple[str, ...] = ("audit", "control", "rank_validity", "progressive", "redistribution")
#: Experiments computed only when named (see :mod:`moeaudit.experiments._attribution_control`).
OPTIONAL_EXPERIMENTS: tuple[str, ...] = (ATTRIBUTION,)
#: Record experiment of the single-expert pool: every active expert ablated alone at every sampled position of a
#: layer, emitted whenever a single-expert experiment runs (it is the data of expert-level nulls, the causal
#: ceiling and the causal importance map; no extra ablation is needed, the experiments ablate these anyway).
POOL = "pool"

Progress = Callable[[int], None]


@dataclass(frozen=True)
class ExperimentSettings:
    """What every experiment shares.

    Attributes:
        layers: MoE layers to audit (``None``: all).
        metrics: Observational metrics (columns of the ``observe`` table) to audit.
        n: Positions per (layer, metric) cell.
        n_progressive: Positions per layer of the progressive ablation.
        progressive_arms: Removal orders of the progressive ablation (:data:`~moeaudit.config.PROGRESSIVE_ARMS`).
        seed: Seed of the position sampling and of the random tie-breaks between experts with equal metric
            values (per layer and position).
        scope: ``token`` (Definition 2.1) or ``sequence``.
        mode: ``zero``, ``renormalize``, ``reroute`` or ``mean``.
        min_context: Positions need at least this many tokens of context.
        model_name: Written into every record.
        means: The experts' mean outputs (:func:`moeaudit.expert_means`) that ``mode="mean"`` replaces them by;
            ignored by the other modes (data, not a setting: left out of comparisons and repr).
    """

    layers: tuple[int, ...] | None = None
    metrics: tuple[str, ...] = PAPER_METRICS
    n: int = 200
    n_progressive: int = 500
    progressive_arms: tuple[str, ...] = PROGRESSIVE_ARMS
    seed: int = 0
    scope: str = "token"
    mode: str = "zero"
    min_context: int = 1
    model_name: str = "model"
    means: ExpertMeans | None = field(default=None, compare=False, repr=False)
    #: One label per sequence of the run (index = seq_id), e.g. its domain: single-expert cells sample their
    #: positions stratified by it (:func:`~moeaudit.experiments.candidate_positions`); ``None``: uniform.
    strata: tuple[str, ...] | None = None

    def check(self, model: nn.Module, metric_table: pd.DataFrame | None = None) -> tuple[int, ...]:
        """Validate against ``model``; return the layers to audit."""
        check_choice("scope", self.scope, SCOPES)
        check_choice("mode", self.mode, MODES)
        if not self.progressive_arms:
            raise ConfigError(f"progressive_arms is empty; name at least one of {', '.join(PROGRESSIVE_ARMS)}.")
        for arm in self.progressive_arms:
            check_choice("progressive arm", arm, PROGRESSIVE_ARMS)
        if self.n < 3 or self.n_progressive < 1:
            raise ConfigError(f"n={self.n}, n_progressive={self.n_progressive}: a paired test needs n >= 3 "
                              "positions and the progressive ablation at least 1.")
        desc = describe(model)
        layers = tuple(desc.moe_layers) if self.layers is None else tuple(self.layers)
        bad = [layer for layer in layers if layer not in desc.moe_layers]
        if bad:
            raise ConfigError(f"layers {bad} are not MoE layers of this model; MoE layers: "
                              f"{', '.join(map(str, desc.moe_layers))}.")
        if self.mode == "mean":
            if self.means is None:
                raise ConfigError("mode='mean' needs the experts' mean outputs: pass ExperimentSettings(means="
                                  "moeaudit.expert_means(model, sequences)) computed on the sequences you ablate.")
            try:
                self.means.check(model, layers)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if metric_table is not None:
            for m in self.metrics:
                if m not in metric_table.columns or m in ("layer", "expert"):
                    valid = [c for c in metric_table.columns if c not in ("layer", "expert", "routed_count")]
                    raise ConfigError(f"metric {m!r} is not a column of the observe table; valid: "
                                      f"{', '.join(valid)}.{did_you_mean(m, valid)}")
        return layers


def _tie_keys(seed: int, layer: int, seq_id: int, position: int, n_active: int) -> list[float]:
    """Uniform random keys that break ties among a position's active experts: seeded by the run's seed, the layer
    and the position (so a resumed cell, or any subset of experiments, breaks every tie the same way), and
    independent of expert ids (ties broken by id would make low ids systematically "low")."""
    return np.random.default_rng([seed, layer, seq_id, position]).random(n_active).tolist()


def _rank(values: Sequence[float], tie_keys: Sequence[float]) -> list[int]:
    """Indices of the experts whose value is a number, sorted ascending by (value, tie key); experts whose
    value is NaN (or None) are left out of the ranking."""
    ranked = [i for i, v in enumerate(values) if v is not None and not math.isnan(v)]
    return sorted(ranked, key=lambda i: (values[i], tie_keys[i]))


def _states_for(model: nn.Module, sequences: Sequence, layer: int, states: CleanStates | None):
    """The cell's ids and clean-state provider: the run's shared one, or a private one that keeps nothing."""
    ids_list = sequence_ids(sequences)
    if states is None:
        return ids_list, CleanStates(model, ids_list, layers=[layer], budget_bytes=0)
    states.check_sequences(ids_list)
    if layer not in states.layers:
        raise ValueError(f"layer {layer} is not captured by the clean states (layers {states.layers}); build "
                         "CleanStates with every layer the run audits.")
    return ids_list, states


def _select_positions(states, layer, n, candidates, desc, progress, handle):
    """Walk the seeded candidate list, get each needed sequence's clean pass from ``states``, keep positions with
    >= 2 active experts, and call ``handle(ablator, seq_id, positions)`` per sequence until ``n`` positions are
    done."""
    taken = 0
    cursor = 0
    while taken < n and cursor < len(candidates):
        want = candidates[cursor: cursor + (n - taken)]
        cursor += len(want)
        by_seq: dict[int, list[int]] = defaultdict(list)
        for seq_id, pos in want.tolist():
            by_seq[seq_id].append(pos)
        for seq_id in sorted(by_seq):
            ablator = states.ablator(seq_id)
            weights = ablator.state.moe[layer].weights
            keep = [p for p in sorted(by_seq[seq_id]) if int((weights[p] != 0).sum()) >= 2]
            if keep:
                handle(ablator, seq_id, keep)
                taken += len(keep)
                if progress:
                    progress(len(keep))
    if taken == 0:
        raise ConfigError(f"no position of layer {layer} has at least two active experts (top_k={desc.top_k}); "
                          "the experiments compare experts within a token and need top_k >= 2.")
    return taken


def _active(ls, pos: int) -> tuple[list[int], list[float]]:
    experts = ls.indices[pos].tolist()
    weights = ls.weights[pos].float().tolist()
    keep = [i for i, w in enumerate(weights) if w != 0]
    return [experts[i] for i in keep], [weights[i] for i in keep]


def _base_row(settings, desc, layer, seq_id, pos, ids, active, weights, result) -> dict:
    return {
        "model": settings.model_name, "n_layers": desc.n_layers, "layer": layer, "seq_id": seq_id,
        "position": pos, "target_token": int(ids[pos + 1]), "active_experts": active, "active_weights": weights,
        "clean_loss": result.clean_loss, "ablated_loss": result.ablated_loss, "delta": result.delta_loss,
        "gap_norm": result.gap_norm, "final_gap_norm": result.final_gap_norm, "scope": settings.scope,
        "mode": settings.mode, "seed": settings.seed, "ablated_weight": result.removed_weight,
        "remaining_norm": math.nan, "compensation_cos": math.nan, "relative_compensation": math.nan,
        "output_norm": math.nan, "ablated_metric_value": math.nan,
    }


@torch.no_grad()
def collect_single(model: nn.Module, sequences: Sequence, metric_table: pd.DataFrame | None,
                   settings: ExperimentSettings, layer: int, *, experiments: Sequence[str] = EXPERIMENTS,
                   progress: Progress | None = None, states: CleanStates | None = None) -> pd.DataFrame:
    """Ablate every active expert singly at ``settings.n`` positions of ``layer``; emit the records of the audit,
    control, rank-validity and redistribution experiments (those named in ``experiments``), and always the
    single-expert pool (experiment :data:`POOL`: one row per position and active expert).

    ``states`` shares clean passes with the run's other cells (``sequences`` must be a prefix of its sequences);
    without it each sequence this cell touches gets its own clean pass."""
    check_attribution(experiments, settings.scope)
    desc = describe(model)
    ids_list, states = _states_for(model, sequences, layer, states)
    candidates = candidate_positions([len(i) for i in ids_list], settings.seed, settings.min_context,
                                     strata=None if settings.strata is None else settings.strata[: len(ids_list)])
    metrics = list(settings.metrics) if metric_table is not None else []
    table = metric_table.set_index(["layer", "expert"]) if metric_table is not None else None
    rows: list[dict] = []

    def handle(ablator: SequenceAblator, seq_id: int, positions: list[int]) -> None:
        ls = ablator.state.moe[layer]
        ids = ablator.input_ids
        plan = [(pos, e) for pos in positions for e in _active(ls, pos)[0]]
        results = ablator.run([Ablation(layer, pos, (e,), scope=settings.scope) for pos, e in plan], settings.mode,
                              means=settings.means)
        by_pos: dict[int, dict[int, object]] = defaultdict(dict)
        for (pos, e), r in zip(plan, results):
            by_pos[pos][e] = r
        contrib = _contributions(model, ls, layer, plan) if "redistribution" in experiments else {}
        attr = token_estimates(model, ablator.state, ids, layer, settings.mode, positions) \
            if ATTRIBUTION in experiments else None
        for pos in positions:
            active, weights = _active(ls, pos)
            res = by_pos[pos]
            ties = _tie_keys(settings.seed, layer, seq_id, pos, len(active))
            for i, e in enumerate(active):
                row = _base_row(settings, desc, layer, seq_id, pos, ids, active, weights, res[e])
                row.update(experiment=POOL, metric=ROUTING_WEIGHT, role="single", metric_values=list(weights),
                           ablated_experts=[e], ablated_metric_value=weights[i], k=1)
                rows.append(row)
            ranked_by = {ROUTING_WEIGHT: weights}
            if attr is not None:  # the estimate of each active expert (its routing slot), in router order
                slots = [i for i, w in enumerate(ls.weights[pos].float().tolist()) if w != 0]
                ranked_by[attribution_metric(settings.mode)] = [float(attr[pos][i]) for i in slots]
            for m in metrics:
                ranked_by[m] = [float(table.at[(layer, e), m]) for e in active]
            for m, values in ranked_by.items():
                order = _rank(values, ties)
                if len(order) < 2:  # fewer than two experts with a value: nothing to compare at this position
                    continue
                low, high = order[0], order[-1]
                exp_name = "control" if m == ROUTING_WEIGHT else ATTRIBUTION if m == attribution_metric(
                    settings.mode) else "audit"
                if exp_name in experiments:
                    for role, i in (("high", high), ("low", low)):
                        row = _base_row(settings, desc, layer, seq_id, pos, ids, active, weights, res[active[i]])
                        row.update(experiment=exp_name, metric=m, role=role, metric_values=list(values),
                                   ablated_experts=[active[i]], ablated_metric_value=values[i], k=1)
                        rows.append(row)
                if "rank_validity" in experiments and exp_name != ATTRIBUTION:
                    for i in order:
                        e = active[i]
                        row = _base_row(settings, desc, layer, seq_id, pos, ids, active, weights, res[e])
                        row.update(experiment="rank_validity", metric=m, role="single", metric_values=list(values),
                                   ablated_experts=[e], ablated_metric_value=values[i], k=1)
                        rows.append(row)
            if "redistribution" in experiments:
                for e in active:
                    row = _base_row(settings, desc, layer, seq_id, pos, ids, active, weights, res[e])
                    remaining, cos, output_norm = contrib[(pos, e)]
                    gap = row["gap_norm"]
                    row.update(experiment="redistribution", metric=ROUTING_WEIGHT, role="single",
                               metric_values=list(weights), ablated_experts=[e],
                               ablated_metric_value=weights[active.index(e)], k=1, remaining_norm=remaining,
                               compensation_cos=cos, output_norm=output_norm,
                               relative_compensation=remaining * max(cos, 0.0) / gap if gap > 0 else math.nan)
                    rows.append(row)

    _select_positions(states, layer, settings.n, candidates, desc, progress, handle)
    return to_frame(rows)


def _contributions(model, ls, layer, plan) -> dict:
    """Per (position, expert): ||MoE output - w_e E_e(x)||, cos(w_e E_e(x), MoE output - w_e E_e(x)) and
    ||E_e(x)||."""
    if not plan:
        return {}
    pos = torch.tensor([p for p, _ in plan])
    exp = torch.tensor([e for _, e in plan])
    ones = torch.ones(len(plan), 1, dtype=ls.weights.dtype, device=ls.x.device)
    outputs = moe_block(model, layer).experts(ls.x[pos], exp[:, None].to(ls.x.device), ones).float()
    weight = torch.stack([ls.weights[p].float()[ls.indices[p] == e].sum() for p, e in plan])
    removed = outputs * weight[:, None]
    remaining = ls.moe_out[pos].float() - removed
    cos = torch.nn.functional.cosine_similarity(removed, remaining, dim=-1)
    return {key: (float(r), float(c), float(o))
            for key, r, c, o in zip(plan, remaining.norm(dim=-1), cos, outputs.norm(dim=-1))}


def removal_order(arm: str, active: Sequence[int], weights: Sequence[float], ties: Sequence[float],
                  seed: Sequence[int]) -> list[int]:
    """The order in which ``arm`` removes a position's active experts.

    ``highest``: by routing weight, highest first (ties broken by the run's random tie keys ``ties``, as in every
    experiment); ``lowest``: exactly the reverse; ``random``: a permutation drawn from
    ``numpy.random.default_rng([*seed, 1])``, where ``seed`` names the position (run seed, layer, sequence,
    position; the trailing 1 keeps it apart from the tie keys' stream), so the order does not depend on what else
    is computed or resumed.
    """
    ascending = [active[i] for i in _rank(weights, ties)]
    if arm == "highest":
        return ascending[::-1]
    if arm == "lowest":
        return ascending
    if arm == "random":
        return [active[i] for i in np.random.default_rng([*seed, 1]).permutation(len(active))]
    check_choice("progressive arm", arm, PROGRESSIVE_ARMS)
    raise AssertionError  # unreachable: check_choice raised


def progressive_role(arm: str, k: int) -> str:
    """Record role of the progressive ablation removing the first ``k`` experts of ``arm``'s order."""
    return f"{arm}:{k}"


@torch.no_grad()
def collect_progressive(model: nn.Module, sequences: Sequence, settings: ExperimentSettings, layer: int, *,
                        progress: Progress | None = None, states: CleanStates | None = None) -> pd.DataFrame:
    """At ``settings.n_progressive`` positions remove the active experts cumulatively, k = 1..K-1, in the order of
    every arm of ``settings.progressive_arms`` (the same positions for every arm). A set of experts two arms
    remove alike at a position is ablated once and recorded under each arm (``states``: as in
    :func:`collect_single`)."""
    desc = describe(model)
    ids_list, states = _states_for(model, sequences, layer, states)
    candidates = candidate_positions([len(i) for i in ids_list], settings.seed, settings.min_context)
    rows: list[dict] = []

    def handle(ablator: SequenceAblator, seq_id: int, positions: list[int]) -> None:
        ls = ablator.state.moe[layer]
        plan, unique, ablations = [], {}, []
        for pos in positions:
            active, weights = _active(ls, pos)
            ties = _tie_keys(settings.seed, layer, seq_id, pos, len(active))
            for arm in settings.progressive_arms:
                order = removal_order(arm, active, weights, ties, (settings.seed, layer, seq_id, pos))
                for k in range(1, len(active)):
                    experts = tuple(order[:k])
                    key = (pos, frozenset(experts))
                    if key not in unique:
                        unique[key] = len(ablations)
                        ablations.append(Ablation(layer, pos, experts, scope=settings.scope))
                    plan.append((pos, arm, k, experts, unique[key]))
        results = ablator.run(ablations, settings.mode, means=settings.means)
        for pos, arm, k, experts, index in plan:
            active, weights = _active(ls, pos)
            row = _base_row(settings, desc, layer, seq_id, pos, ablator.input_ids, active, weights, results[index])
            row.update(experiment="progressive", metric=ROUTING_WEIGHT, role=progressive_role(arm, k),
                       metric_values=list(weights), ablated_experts=list(experts), k=k)
            rows.append(row)

    _select_positions(states, layer, settings.n_progressive, candidates, desc, progress, handle)
    return to_frame(rows)


def metric_values_for(metric_table: pd.DataFrame, layer: int, metric: str) -> np.ndarray:
    """The metric of every expert of ``layer`` (ordered by expert id)."""
    sub = metric_table[metric_table["layer"] == layer].sort_values("expert")
    return sub[metric].to_numpy(dtype=float)
