"""The metric registry: a *criterion* is registered once with :func:`register_metric` and becomes one column of
:func:`moeaudit.observe`'s frame (see :mod:`moeaudit.observation._observe` for how the columns are computed).

Per-token criteria map a :class:`LayerBatch` (one MoE layer, one batch of real tokens) to a value per routed
(token, expert) pair, or per (token, expert) over all tokens, which ``observe`` reduces per expert by a streaming
mean, sum or standard deviation; weight-only criteria map ``(model, layer, experts)`` to one value per expert. The
built-in criteria (:mod:`moeaudit.observation._criteria`) go through the same registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch
from torch import nn

from moeaudit.errors import did_you_mean

REDUCTIONS = ("mean", "sum", "std")
OVER = ("routed", "all")


@dataclass(frozen=True)
class LayerBatch:
    """What a per-token criterion sees: one MoE layer over the T real tokens of one batch (padding removed).

    Attributes:
        layer: Decoder-layer index of the MoE layer.
        n_experts: Routed experts of the layer.
        token: [P] row (0..T-1) of each routed (token, expert) pair; P = T * top_k.
        expert: [P] int64 expert of each pair.
        weight: [P] float64 routing weight multiplying the expert's output (the router's returned weight, after
            the model's own renormalisation and routed scaling).
        output: [P, d_model] the expert's unweighted output on the pair's token.
        output_norm: [P] float64 L2 norm of ``output``.
        x: [T, d_model] input of the MoE block.
        logits: [T, n_experts] router pre-selection scores.
        router_probs: [T, n_experts] float32 router probability of every expert (see :func:`router_probabilities`).
        routed: [T, n_experts] float32, 1 where the expert is in the token's top-k.
        moe_change: [T] float64 ``1 - cos(h, h + m)``: h the residual stream entering the MoE sub-layer, m the
            whole MoE output (shared experts included).
        routed_change: [T] float64 ``1 - cos(h, h + r)``, r the routed experts' output only,
            ``sum_j g_j E_j(x)`` (EASY-EP's token contribution before its clamp at 0).

    The cosines are taken in float64: 1 - cos reaches ~5e-5 on the builtin model, where float32 cancellation
    would leave ~1e-3 relative error.
    """

    layer: int
    n_experts: int
    token: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor
    output: torch.Tensor
    output_norm: torch.Tensor
    x: torch.Tensor
    logits: torch.Tensor
    router_probs: torch.Tensor
    routed: torch.Tensor
    moe_change: torch.Tensor
    routed_change: torch.Tensor


@dataclass(frozen=True)
class Metric:
    """One registered criterion (exactly one of ``per_token`` / ``weight_only`` is set).

    Attributes:
        name: Column name (snake_case).
        doc: One line with the formula, shown by the CLI.
        per_token: ``LayerBatch -> Tensor``: [P] per routed pair (``over="routed"``) or [T, n_experts]
            (``over="all"``).
        weight_only: ``(model, layer, experts) -> array [len(experts)]``.
        reduce: ``mean``, ``sum`` or ``std`` (sample, ddof=1) of the per-token values, per expert.
        over: ``routed``: the values of the pairs routed to the expert; ``all``: every real token.
    """

    name: str
    doc: str
    per_token: Callable[[LayerBatch], torch.Tensor] | None = None
    weight_only: Callable[[nn.Module, int, Sequence[int]], np.ndarray] | None = None
    reduce: str = "mean"
    over: str = "routed"


_REGISTRY: dict[str, Metric] = {}
_DOCS: dict[str, str] = {}
METRICS = MappingProxyType(_DOCS)  # name -> doc of every registered criterion, in column order
_BUILTIN: set[str] = set()


def register_metric(name: str, *, doc: str, per_token: Callable[[LayerBatch], torch.Tensor] | None = None,
                    weight_only: Callable[[nn.Module, int, Sequence[int]], np.ndarray] | None = None,
                    reduce: str = "mean", over: str = "routed") -> Metric:
    """Register a criterion; it becomes a column of :func:`observe` (after those registered before it).

    Example::

        register_metric("max_weight_x_norm", doc="mean of w * ||E(x)||^2",
                        per_token=lambda b: b.weight * b.output_norm ** 2)
    """
    if (per_token is None) == (weight_only is None):
        raise ValueError(f"metric {name!r}: pass exactly one of per_token= or weight_only=.")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce={reduce!r} is not valid; choose one of {', '.join(REDUCTIONS)}.")
    if over not in OVER:
        raise ValueError(f"over={over!r} is not valid; choose one of {', '.join(OVER)}.")
    if name in _REGISTRY or name in ("layer", "expert", "routed_count"):
        raise ValueError(f"metric {name!r} is already registered (or is a base column); pick another name or "
                         "call unregister_metric first.")
    metric = Metric(name, doc, per_token, weight_only, reduce, over)
    _REGISTRY[name] = metric
    _DOCS[name] = doc
    return metric


def unregister_metric(name: str) -> None:
    """Remove a user-registered criterion (built-ins cannot be removed)."""
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in metric and cannot be unregistered.")
    if name not in _REGISTRY:
        raise ValueError(f"no metric {name!r} is registered.{did_you_mean(name, _REGISTRY)}")
    del _REGISTRY[name], _DOCS[name]


def registered(names: Iterable[str] | str | None = None) -> list[Metric]:
    """The registered criteria named, in column order (all of them when ``names`` is ``None``).

    Raises:
        ValueError: A name no criterion is registered under (the message lists the valid ones).
    """
    if names is None:
        return list(_REGISTRY.values())
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if name not in _REGISTRY:
            raise ValueError(f"unknown metric {name!r}; valid: {', '.join(_REGISTRY)}."
                             f"{did_you_mean(name, _REGISTRY)}")
    return [m for m in _REGISTRY.values() if m.name in names]


def register_builtins() -> tuple[str, ...]:
    """Register the built-in criteria (once, at import) and return their names in column order."""
    from moeaudit.observation._criteria import BUILTIN_CRITERIA

    for name, doc, kwargs in BUILTIN_CRITERIA:
        register_metric(name, doc=doc, **kwargs)
    names = tuple(name for name, _, _ in BUILTIN_CRITERIA)
    _BUILTIN.update(names)
    return names
