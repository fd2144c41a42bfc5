"""Which experts a pruning removes: the model's pruning geometry, how many experts a fraction removes, the seeded
ranking of experts by a criterion, group-balanced choice for group-limited routers, and the checks that keep an
in-memory pruning equal to a checkpoint with those experts deleted.

Rules (the same for every criterion):

- A fraction f removes m = floor(f * E + 1/2) experts at every pruned MoE layer (round half up, so the number does
  not depend on Python's round-half-to-even).
- Experts are ranked ascending by the criterion; higher means more important for every criterion, so the m lowest
  are removed. Ties are broken by a seeded random permutation (``numpy.random.default_rng([seed, layer, 0])``).
- A NaN value ranks below every number: it arises when the calibration sample never routes to the expert (a mean
  over no token, or a standard deviation over fewer than two), and an expert the calibration data does not use costs
  nothing to remove on data like it. The causal reference follows the same rule: experts never ablated in the
  importance map (never routed at its sampled positions) have no measured ΔL and are removed first.
- The ``random`` criterion draws its ranking from ``numpy.random.default_rng([seed, layer, 1])``: independent across
  layers and seeds.
- Group-limited routers (DeepSeek-V2 ``group_limited_greedy``, DeepSeek-V3): a checkpoint with experts deleted
  regroups the remaining ones contiguously (``view(n_group, E' / n_group)``), so only a pruning that removes the same
  number from every group keeps the routing rule. m is rounded to a multiple of n_group (m / n_group per group, round
  half up) and the m / n_group lowest-ranked experts of each group are removed.
- Allocation over layers, at the same total M = m x (pruned layers): ``uniform`` removes m at every layer;
  ``global`` ranks every pruned layer's experts together by the criterion's raw value (each criterion is the same
  quantity at every layer, so its unit is shared: the layers where it is smallest lose most, as in llm-compressor's
  ``ranking_scope="model"``) and removes the M lowest; ``causal`` takes per-layer counts from the calibration
  split's removal costs (the M cheapest experts over all layers, in nats) and lets the criterion choose which m_l
  experts of each layer go. A layer keeps at least top_k experts (the global order skips a full layer's experts);
  ties across layers are broken by a seeded permutation (``numpy.random.default_rng([seed, 2])``). Non-uniform
  allocations are refused for group-limited routers (a checkpoint needs the same count in every group and layer).
- Refused: a fraction that removes no expert, one that leaves fewer than top_k experts, and (group-limited) one that
  leaves a group with fewer experts than the rule needs (``topk_group * remaining_per_group >= top_k``, and two per
  group for DeepSeek-V3's top-2 group score). Shared experts are never pruned (they are not routed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from moeaudit.errors import ConfigError
from moeaudit.models import RoutingGroups, adapter_for, describe, router

Removal = Mapping[int, Sequence[int]]  # MoE layer -> experts removed there


@dataclass(frozen=True)
class PruneGeometry:
    """What pruning needs to know about a model.

    Attributes:
        family: Adapter family.
        moe_layers: Decoder layers with routed experts.
        n_experts: Routed experts per MoE layer (E).
        top_k: Experts chosen per token.
        groups: The router's expert groups when its rule is group-limited, else ``None``.
    """

    family: str
    moe_layers: tuple[int, ...]
    n_experts: int
    top_k: int
    groups: RoutingGroups | None

    @property
    def per_group(self) -> int:
        return self.n_experts // self.groups.n_group if self.groups else self.n_experts


def prune_geometry(model: nn.Module) -> PruneGeometry:
    """The :class:`PruneGeometry` of ``model`` (groups read from its first MoE layer's router)."""
    adapter = adapter_for(model)
    desc = describe(model)
    groups = adapter.routing_groups(router(model, desc.moe_layers[0], adapter)) if adapter.routing_groups else None
    if groups is not None and groups.n_group <= 1:
        groups = None
    return PruneGeometry(desc.family, desc.moe_layers, desc.n_experts, desc.top_k, groups)


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def n_removed(geometry: PruneGeometry, fraction: float) -> int:
    """m, the experts a fraction removes at each pruned layer (see the module docstring for the rules).

    Raises:
        ConfigError: the fraction removes nothing, leaves fewer than top_k experts, or breaks a routing group.
    """
    E, k, g = geometry.n_experts, geometry.top_k, geometry.groups
    if not 0 < fraction < 1:
        raise ConfigError(f"fractions={fraction}: not in (0, 1); give the share of each layer's experts to remove, "
                          "e.g. 0.25.")
    m = _half_up(fraction * E)
    if g is not None:
        m = _half_up(m / g.n_group) * g.n_group
    if m == 0:
        unit = f"{g.n_group} (one per routing group)" if g else "1"
        raise ConfigError(f"fractions={fraction} removes no expert of {E} (round({fraction} x {E}) = 0"
                          f"{' after rounding to whole groups' if g else ''}); the smallest pruning removes {unit}: "
                          f"use a fraction of at least {(g.n_group if g else 1) / E:.4g}.")
    if E - m < k:
        raise ConfigError(f"fractions={fraction} removes {m} of {E} experts, leaving {E - m} < top_k = {k}: the "
                          f"router could not choose {k} experts. Use a fraction of at most {(E - k) / E:.4g}.")
    if g is not None:
        remaining = geometry.per_group - m // g.n_group
        need = max(g.min_per_group, math.ceil(k / g.topk_group))
        if remaining < need:
            raise ConfigError(
                f"fractions={fraction} removes {m // g.n_group} of the {geometry.per_group} experts of each of the "
                f"{g.n_group} routing groups (group-balanced), leaving {remaining} per group; the group-limited rule "
                f"(top {g.topk_group} groups, top_k = {k}) needs at least {need} per group. Use a smaller fraction.")
    return m


def rank_experts(values: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Expert ids sorted ascending by ``values`` (NaN lowest), ties in the order of ``tiebreak`` (both [E])."""
    values = np.asarray(values, dtype=np.float64)
    keys = np.where(np.isnan(values), -np.inf, values)
    return np.lexsort((np.asarray(tiebreak), keys))


def layer_rng(seed: int, layer: int, stream: int) -> np.random.Generator:
    """The generator of one layer's ranking: stream 0 breaks ties, stream 1 is the ``random`` criterion."""
    return np.random.default_rng([int(seed), int(layer), int(stream)])


def choose_removed(values: np.ndarray, m: int, geometry: PruneGeometry, *, seed: int, layer: int) -> tuple[int, ...]:
    """The m lowest-ranked experts of one layer (group-balanced for group-limited routers), sorted by id."""
    tiebreak = layer_rng(seed, layer, 0).permutation(geometry.n_experts)
    order = rank_experts(values, tiebreak)
    if geometry.groups is None:
        return tuple(sorted(int(e) for e in order[:m]))
    per_group, size = m // geometry.groups.n_group, geometry.per_group
    chosen: list[int] = []
    for group in range(geometry.groups.n_group):
        members = [int(e) for e in order if e // size == group]  # ascending rank within the group
        chosen += members[:per_group]
    return tuple(sorted(chosen))


def random_values(geometry: PruneGeometry, seed: int, layer: int) -> np.ndarray:
    """Scores of the ``random`` criterion at one layer: a seeded uniform draw per expert."""
    return layer_rng(seed, layer, 1).random(geometry.n_experts)


def plan_removal(scores: Mapping[int, np.ndarray], fraction: float, geometry: PruneGeometry, *,
                 seed: int) -> dict[int, tuple[int, ...]]:
    """Per layer of ``scores`` (layer -> [E] criterion values), the experts a fraction removes."""
    m = n_removed(geometry, fraction)
    return {layer: choose_removed(values, m, geometry, seed=seed, layer=layer) for layer, values in scores.items()}


def global_lowest(values: Mapping[int, np.ndarray], total: int, geometry: PruneGeometry, *,
                  seed: int) -> dict[int, tuple[int, ...]]:
    """The ``total`` lowest (layer, expert) pairs of ``values`` (layer -> [E]) ranked together (NaN lowest, ties by
    a seeded permutation), keeping at least top_k experts in every layer; layer -> removed experts (sorted)."""
    if geometry.groups is not None:
        raise ConfigError("allocation=global / causal: the router is group-limited, so a pruning must remove the same "
                          "number of experts from every group and layer; use allocation=uniform.")
    layers = sorted(values)
    flat = np.concatenate([np.asarray(values[layer], dtype=np.float64) for layer in layers])
    pairs = [(layer, e) for layer in layers for e in range(geometry.n_experts)]
    cap = geometry.n_experts - geometry.top_k
    if total > cap * len(layers):
        raise ConfigError(f"removing {total} experts over {len(layers)} layers leaves fewer than top_k = "
                          f"{geometry.top_k} in some layer; use a smaller fraction.")
    tiebreak = np.random.default_rng([int(seed), 2]).permutation(len(pairs))
    order = rank_experts(flat, tiebreak)
    chosen: dict[int, list[int]] = {layer: [] for layer in layers}
    taken = 0
    for i in order:
        layer, e = pairs[int(i)]
        if taken == total:
            break
        if len(chosen[layer]) < cap:
            chosen[layer].append(e)
            taken += 1
    return {layer: tuple(sorted(chosen[layer])) for layer in layers}


def plan_allocation(scores: Mapping[int, np.ndarray], fraction: float, geometry: PruneGeometry, *, seed: int,
                    allocation: str = "uniform", costs: Mapping[int, np.ndarray] | None = None
                    ) -> dict[int, tuple[int, ...]]:
    """Per layer, the experts a fraction removes under ``allocation`` (module docstring); ``costs`` (layer -> [E]
    removal costs of the calibration split) sets the per-layer counts of ``causal``."""
    if allocation == "uniform":
        return plan_removal(scores, fraction, geometry, seed=seed)
    total = n_removed(geometry, fraction) * len(scores)
    if allocation == "global":
        return global_lowest(scores, total, geometry, seed=seed)
    if allocation == "causal":
        if costs is None:
            raise ValueError("allocation='causal' needs the removal costs of the calibration split.")
        counts = {layer: len(e) for layer, e in global_lowest(costs, total, geometry, seed=seed).items()}
        return {layer: choose_removed(values, counts[layer], geometry, seed=seed, layer=layer) if counts[layer]
                else () for layer, values in scores.items()}
    raise ValueError(f"allocation={allocation!r}; valid: uniform, global, causal.")


def removal_masks(geometry: PruneGeometry, removed: Removal) -> dict[int, torch.Tensor]:
    """Validate a removal and return layer -> bool [E] mask (True = removed).

    Raises:
        ValueError: a layer that is not an MoE layer, an expert id out of range, fewer than top_k experts left,
            or (group-limited routers) a removal that is not the same count in every group or leaves a group too
            small for the routing rule: no checkpoint with those experts deleted would compute the same.
    """
    E, k, g = geometry.n_experts, geometry.top_k, geometry.groups
    masks = {}
    for layer, experts in removed.items():
        layer = int(layer)
        if layer not in geometry.moe_layers:
            raise ValueError(f"layer {layer} is not an MoE layer; MoE layers: {list(geometry.moe_layers)}.")
        ids = sorted({int(e) for e in experts})
        bad = [e for e in ids if not 0 <= e < E]
        if bad:
            raise ValueError(f"experts {bad} at layer {layer} are out of range; experts are 0..{E - 1}.")
        if E - len(ids) < k:
            raise ValueError(f"removing {len(ids)} of {E} experts at layer {layer} leaves fewer than top_k = {k}.")
        if g is not None and ids:
            counts = np.bincount(np.asarray(ids) // geometry.per_group, minlength=g.n_group)
            need = max(g.min_per_group, math.ceil(k / g.topk_group))
            if len(set(counts.tolist())) > 1 or geometry.per_group - counts[0] < need:
                raise ValueError(
                    f"layer {layer}: the router is group-limited ({g.n_group} groups of {geometry.per_group}); a "
                    f"checkpoint with experts deleted regroups the rest contiguously, so a pruning must remove the "
                    f"same number from every group and leave at least {need} per group. This removal takes "
                    f"{counts.tolist()} per group.")
        mask = torch.zeros(E, dtype=torch.bool)
        mask[ids] = True
        masks[layer] = mask
    return masks
