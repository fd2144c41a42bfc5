"""The pruned models of a prune-eval run (one unit per fold x criterion x fraction x seed x allocation x method x
pruned layers), their per-token held-out losses, and the table of exactly which experts each removes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from moeaudit.errors import ConfigError, did_you_mean
from moeaudit.intervene._state import token_losses
from moeaudit.models._describe import model_device
from moeaudit.pruning._config import ATTRIBUTION, CAUSAL, CAUSAL_LOO, DELETE, NONE, RANDOM
from moeaudit.pruning._hook import pruned
from moeaudit.pruning._mean import mean_replaced
from moeaudit.pruning._plan import PruneGeometry, n_removed, plan_allocation, random_values
from moeaudit.pruning._super import protect

#: Key columns of ``prune.csv`` / ``pruned.parquet`` (one pruned model evaluated on one fold).
KEY_COLUMNS = ["criterion", "fraction", "seed", "fold", "allocation", "method"]


@dataclass(frozen=True)
class PruneUnit:
    """One pruned model.

    Attributes:
        criterion: An ``observe`` metric, ``random``, ``causal``, or ``none`` (the unpruned model).
        fraction: Share of each layer's experts removed (0 for ``none``).
        seed: Seed of the ranking's random part (the ``random`` draw, or the tie-break of other criteria).
        layer: The one pruned layer (``--per-layer``), or ``None`` when every pruned layer is pruned.
        removed: Pairs ``(layer, experts)``, the experts removed at each layer (original ids).
        fold: The cross-fitting fold whose calibration split ranked the experts and whose evaluation split
            measures the pruned model.
        allocation: ``uniform``, ``global`` or ``causal`` (how the removed experts spread over layers).
        method: ``delete`` (the router can no longer choose the removed experts) or ``mean`` (they keep their
            router slot and output their calibration mean, :func:`moeaudit.pruning.mean_replaced`); ``none`` for
            the unpruned model.
    """

    criterion: str
    fraction: float
    seed: int
    layer: int | None
    removed: tuple[tuple[int, tuple[int, ...]], ...]
    fold: int = 0
    allocation: str = "uniform"
    method: str = DELETE

    @property
    def removal(self) -> dict[int, tuple[int, ...]]:
        return dict(self.removed)

    @property
    def key(self) -> str:
        """Identity of the pruned model: units removing the same experts share one evaluation."""
        if not self.removed:
            return NONE
        text = json.dumps([[layer, list(experts)] for layer, experts in self.removed])
        digest = hashlib.sha256(text.encode()).hexdigest()[:20]
        return digest if self.method == DELETE else f"{digest}-{self.method}"  # delete keeps its former key

    @property
    def loss_key(self) -> str:
        """Identity of the pruned model on its fold's evaluation documents (``losses/<loss_key>.parquet``)."""
        return f"f{self.fold}-{self.key}"


def resolve_criteria(criteria: Sequence[str] | None) -> list[str]:
    """The criteria a run prunes by (``None``: every registered ``observe`` metric, then ``causal`` and ``random``).

    Raises:
        ConfigError: an unknown criterion (the valid ones and the closest match named).
    """
    from moeaudit.observation._observe import METRICS

    valid = [*METRICS, CAUSAL, RANDOM, CAUSAL_LOO, ATTRIBUTION]
    if criteria is None:
        return valid[:-2]
    for c in criteria:
        if c not in valid:
            raise ConfigError(f"criteria={','.join(criteria)}: {c!r} is not a criterion; valid: {', '.join(valid)}."
                              f"{did_you_mean(c, valid)}")
    return list(criteria)


def criterion_scores(criterion: str, layers: Sequence[int], *, metrics: pd.DataFrame | None,
                     importance: pd.DataFrame | None, geometry: PruneGeometry, seed: int,
                     attribution: pd.DataFrame | None = None) -> dict[int, np.ndarray]:
    """Layer -> [E] values ranking the experts (higher = more important; the lowest are removed)."""
    if criterion == RANDOM:
        return {layer: random_values(geometry, seed, layer) for layer in layers}
    table, column = ((importance, "removal_cost") if criterion == CAUSAL else (importance, "loo_cost")
                     if criterion == CAUSAL_LOO else (attribution, "attr_removal_cost")
                     if criterion == ATTRIBUTION else (metrics, criterion))
    out = {}
    for layer in layers:
        sub = table[table["layer"] == layer].sort_values("expert")
        if len(sub) != geometry.n_experts:
            raise ValueError(f"the {'importance map' if criterion in (CAUSAL, CAUSAL_LOO) else 'metric table'} has "
                             f"{len(sub)} experts at layer {layer}, expected {geometry.n_experts}.")
        out[layer] = sub[column].to_numpy(dtype=float)
    return out


def build_units(criteria: Sequence[str], fractions: Sequence[float], *, random_seeds: int, seed: int,
                geometry: PruneGeometry, layers: Sequence[int], metrics: pd.DataFrame | None,
                importance: pd.DataFrame | None, per_layer: bool, fold: int = 0,
                allocations: Sequence[str] = ("uniform",), methods: Sequence[str] = (DELETE,),
                attribution: pd.DataFrame | None = None,
                protected: Mapping[int, Sequence[int]] | None = None) -> list[PruneUnit]:
    """Every pruned model of one fold, the unpruned model first (method ``none``). ``importance`` carries
    ``removal_cost`` (the ``causal`` criterion and the ``causal`` allocation's per-layer counts) and, with
    ``reference="loo"``, ``loo_cost``. Each of ``methods`` removes the same experts; ``protected`` experts
    (layer -> ids, ``--protect-top``) are never removed."""
    units = [PruneUnit(NONE, 0.0, seed, None, (), fold, "uniform", NONE)]
    costs = None
    if "causal" in allocations:
        if importance is None:
            raise ValueError("allocation='causal' needs the importance map (its removal costs).")
        costs = criterion_scores(CAUSAL, layers, metrics=None, importance=importance, geometry=geometry, seed=seed)
    for fraction in fractions:
        for criterion in criteria:
            seeds = [seed + i for i in range(random_seeds)] if criterion == RANDOM else [seed]
            for s in seeds:
                scores = criterion_scores(criterion, layers, metrics=metrics, importance=importance,
                                          geometry=geometry, seed=s, attribution=attribution)
                if protected:
                    scores = protect(scores, {int(k): tuple(v) for k, v in protected.items()},
                                     n_removed(geometry, fraction))
                for allocation in allocations:
                    plan = plan_allocation(scores, fraction, geometry, seed=s, allocation=allocation, costs=costs)
                    for method in methods:
                        units.append(PruneUnit(criterion, float(fraction), s, None, tuple(sorted(plan.items())),
                                               fold, allocation, method))
                        if per_layer and allocation == "uniform":
                            units += [PruneUnit(criterion, float(fraction), s, layer, ((layer, plan[layer]),), fold,
                                                allocation, method) for layer in layers]
    return units


def pruned_table(units: Sequence[PruneUnit]) -> pd.DataFrame:
    """``pruned.parquet``: one row per (criterion, fraction, seed, fold, allocation, method, layer, expert)
    removed when every pruned layer is pruned (a ``--per-layer`` unit removes at its layer exactly the experts
    listed for that layer)."""
    rows = [(u.criterion, u.fraction, u.seed, u.fold, u.allocation, u.method, layer, e) for u in units
            if u.layer is None for layer, experts in u.removed for e in experts]
    frame = pd.DataFrame(rows, columns=[*KEY_COLUMNS, "layer", "expert"])
    return frame.astype({"fraction": "float64", "seed": "int64", "fold": "int64", "layer": "int64",
                         "expert": "int64"})


@torch.no_grad()
def sequence_losses(model: nn.Module, sequences: Sequence, removed: dict[int, tuple[int, ...]] | None = None, *,
                    progress: Callable[[int], None] | None = None, method: str = DELETE,
                    means=None) -> np.ndarray:
    """Next-token cross-entropy of every predicted token of every sequence (positions 0..T-2 predicting 1..T-1),
    concatenated in sequence order, float64 [sum of (T - 1)]: one plain forward per sequence, pruned in memory by
    :func:`moeaudit.pruning.pruned` when ``removed`` is given (``method="mean"``: mean-replaced by
    :func:`moeaudit.pruning.mean_replaced` with ``means``, an :class:`moeaudit.ExpertMeans`)."""
    device = model_device(model)
    out = []
    if not removed:
        context = nullcontext()
    elif method == "mean":
        context = mean_replaced(model, removed, means)
    else:
        context = pruned(model, removed)
    with context:
        for seq in sequences:
            ids = torch.as_tensor(getattr(seq, "input_ids", seq)).long().to(device)
            logits = model(input_ids=ids[None]).logits[0]
            out.append(token_losses(logits, ids).double().cpu().numpy())
            if progress is not None:
                progress(1)
    return np.concatenate(out) if out else np.zeros(0)


def loo_costs(model: nn.Module, sequences: Sequence, layers: Sequence[int], n_experts: int, *,
              progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """The exact single-removal cost of every expert of ``layers``: the mean loss over every predicted token of
    ``sequences`` with the expert removed alone (the router choosing among the rest, as in a pruned model) minus the
    unpruned model's. One row per (layer, expert): ``layer, expert, loo_cost``."""
    base = sequence_losses(model, sequences).mean()
    rows = []
    for layer in layers:
        for e in range(n_experts):
            rows.append((int(layer), e, float(sequence_losses(model, sequences, {layer: (e,)}).mean() - base)))
            if progress is not None:
                progress(1)
    return pd.DataFrame(rows, columns=["layer", "expert", "loo_cost"])
