"""The pruned models of a prune-eval run (one unit per criterion x fraction x seed x pruned layers), their
per-token held-out losses, and the table of exactly which experts each removes."""

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
from moeaudit.pruning._config import CAUSAL, NONE, RANDOM
from moeaudit.pruning._hook import pruned
from moeaudit.pruning._mean import mean_replaced
from moeaudit.pruning._plan import PruneGeometry, n_removed, plan_removal, random_values
from moeaudit.pruning._super import protect


@dataclass(frozen=True)
class PruneUnit:
    """One pruned model.

    Attributes:
        criterion: An ``observe`` metric, ``random``, ``causal``, or ``none`` (the unpruned model).
        fraction: Share of each layer's experts removed (0 for ``none``).
        seed: Seed of the ranking's random part (the ``random`` draw, or the tie-break of other criteria).
        layer: The one pruned layer (``--per-layer``), or ``None`` when every pruned layer is pruned.
        removed: Pairs ``(layer, experts)``, the experts removed at each layer (original ids).
        method: ``delete`` (the router can no longer choose them) or ``mean`` (they keep their router slot and
            output their calibration mean, :func:`moeaudit.pruning.mean_replaced`); ``none`` for the unpruned model.
    """

    criterion: str
    fraction: float
    seed: int
    layer: int | None
    removed: tuple[tuple[int, tuple[int, ...]], ...]
    method: str = "delete"

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
        return digest if self.method == "delete" else f"{digest}-{self.method}"  # delete keeps its former key


def resolve_criteria(criteria: Sequence[str] | None) -> list[str]:
    """The criteria a run prunes by (``None``: every registered ``observe`` metric, then ``causal`` and ``random``).

    Raises:
        ConfigError: an unknown criterion (the valid ones and the closest match named).
    """
    from moeaudit._observe import METRICS

    valid = [*METRICS, CAUSAL, RANDOM]
    if criteria is None:
        return valid
    for c in criteria:
        if c not in valid:
            raise ConfigError(f"criteria={','.join(criteria)}: {c!r} is not a criterion; valid: {', '.join(valid)}."
                              f"{did_you_mean(c, valid)}")
    return list(criteria)


def criterion_scores(criterion: str, layers: Sequence[int], *, metrics: pd.DataFrame | None,
                     importance: pd.DataFrame | None, geometry: PruneGeometry, seed: int) -> dict[int, np.ndarray]:
    """Layer -> [E] values ranking the experts (higher = more important; the lowest are removed)."""
    if criterion == RANDOM:
        return {layer: random_values(geometry, seed, layer) for layer in layers}
    table, column = (importance, "mean_delta") if criterion == CAUSAL else (metrics, criterion)
    out = {}
    for layer in layers:
        sub = table[table["layer"] == layer].sort_values("expert")
        if len(sub) != geometry.n_experts:
            raise ValueError(f"the {'importance map' if criterion == CAUSAL else 'metric table'} has "
                             f"{len(sub)} experts at layer {layer}, expected {geometry.n_experts}.")
        out[layer] = sub[column].to_numpy(dtype=float)
    return out


def build_units(criteria: Sequence[str], fractions: Sequence[float], *, random_seeds: int, seed: int,
                geometry: PruneGeometry, layers: Sequence[int], metrics: pd.DataFrame | None,
                importance: pd.DataFrame | None, per_layer: bool, methods: Sequence[str] = ("delete",),
                protected: Mapping[int, Sequence[int]] | None = None) -> list[PruneUnit]:
    """Every pruned model of a run, the unpruned model first: every criterion, fraction and seed under each of
    ``methods`` (the same experts removed by each); ``protected`` experts (layer -> ids) are never removed."""
    units = [PruneUnit(NONE, 0.0, seed, None, (), NONE)]  # the unpruned model: no removal method
    for fraction in fractions:
        for criterion in criteria:
            seeds = [seed + i for i in range(random_seeds)] if criterion == RANDOM else [seed]
            for s in seeds:
                scores = criterion_scores(criterion, layers, metrics=metrics, importance=importance,
                                          geometry=geometry, seed=s)
                if protected:
                    scores = protect(scores, dict(protected), n_removed(geometry, fraction))
                plan = plan_removal(scores, fraction, geometry, seed=s)
                for method in methods:
                    units.append(PruneUnit(criterion, float(fraction), s, None, tuple(sorted(plan.items())), method))
                    if per_layer:
                        units += [PruneUnit(criterion, float(fraction), s, layer, ((layer, plan[layer]),), method)
                                  for layer in layers]
    return units


def pruned_table(units: Sequence[PruneUnit]) -> pd.DataFrame:
    """``pruned.parquet``: one row per (criterion, fraction, seed, method, layer, expert) removed when every pruned layer
    is pruned (a ``--per-layer`` unit removes at its layer exactly the experts listed for that layer)."""
    rows = [(u.criterion, u.fraction, u.seed, u.method, layer, e) for u in units if u.layer is None
            for layer, experts in u.removed for e in experts]
    frame = pd.DataFrame(rows, columns=["criterion", "fraction", "seed", "method", "layer", "expert"])
    return frame.astype({"fraction": "float64", "seed": "int64", "layer": "int64", "expert": "int64"})


@torch.no_grad()
def sequence_losses(model: nn.Module, sequences: Sequence, removed: dict[int, tuple[int, ...]] | None = None, *,
                    progress: Callable[[int], None] | None = None, method: str = "delete",
                    means=None) -> np.ndarray:
    """Next-token cross-entropy of every predicted token of every sequence (positions 0..T-2 predicting 1..T-1),
    concatenated in sequence order, float64 [sum of (T - 1)]: one plain forward per sequence, pruned in memory by
    :func:`moeaudit.pruning.pruned` when ``removed`` is given (``method="mean"``: mean-replaced by
    :func:`moeaudit.pruning.mean_replaced` with ``means``)."""
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
