"""Expert ablation: semantics (:class:`Ablation`, modes, scopes), the naive reference engine, the fast engine, and
attribution (first-order estimates of every ablation from one backward pass)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moeaudit.intervene._attribution import (
    ATTRIBUTION_COLUMNS,
    attribute,
    attribution_importance,
    own_loss_gradients,
)
from moeaudit.intervene._fast import DEFAULT_MAX_QUERY_TOKENS, OutOfMemoryEvenForOneToken, run_fast
from moeaudit.intervene._means import MEAN_COLUMNS, ExpertMeans, expert_means, replace_with_means
from moeaudit.intervene._memory import (
    ChunkGeometry,
    QueryBudget,
    auto_query_tokens,
    chunk_geometry,
    chunk_memory_bytes,
    free_memory_bytes,
)
from moeaudit.intervene._naive import run_naive
from moeaudit.intervene._routing import apply_mode, dense_weights, override_routing
from moeaudit.intervene._spec import (
    ENGINES,
    MODES,
    SCOPES,
    Ablation,
    AblationResult,
    check_ablation,
    check_choice,
    check_input_ids,
    check_layers,
    check_max_query_tokens,
    check_routed,
)
from moeaudit.intervene._state import CleanState, MoELayerState, clean_state
from moeaudit.models import describe


class SequenceAblator:
    """All ablations of one sequence: the clean pass runs once, then :meth:`run` as often as needed.

    Args:
        model: A transformers MoE causal LM (on one device, or spread over several with a device map).
        input_ids: [T] one unpadded sequence.
        engine: ``fast`` (default) or ``naive``.
        layers: MoE layers to prepare (default: all). Dense layers, out-of-range and negative indices are refused.
        max_query_tokens: Fast engine: hard cap on query tokens per chunk (peak memory grows with it, see
            :func:`moeaudit.intervene.chunk_memory_bytes`). ``None`` (default) sizes chunks from the free memory of
            the devices the layers live on. Either way an out-of-memory error halves the chunk and retries.
        strict: Refuse ablations naming an expert that is not routed where it acts (its ΔL would be exactly 0;
            the default accepts them and returns ΔL = 0).
        state: A :class:`CleanState` of ``input_ids`` computed earlier (e.g. shared by several experiments); its
            clean pass is not run again. It must hold every layer in ``layers`` and, for the fast engine, a cache.

    Attributes:
        state: The :class:`CleanState` (routing, per-position clean losses) of the sequence.
        budget: The fast engine's :class:`QueryBudget` (remembers out-of-memory halvings across runs).
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, *, engine: str = "fast",
                 layers: Sequence[int] | None = None, max_query_tokens: int | None = None,
                 strict: bool = False, state: CleanState | None = None) -> None:
        self.model = model
        self.engine = check_choice("engine", engine, ENGINES)
        self.desc = describe(model)
        self.input_ids = check_input_ids(input_ids)
        self.strict = bool(strict)
        self.budget = QueryBudget(cap=check_max_query_tokens(max_query_tokens))
        layers = check_layers(layers, self.desc)
        if state is None:
            state = clean_state(model, self.input_ids, desc=self.desc, layers=layers, keep_cache=engine == "fast")
        else:
            _check_state(state, self.input_ids, layers, engine)
        self.state = state

    @property
    def max_query_tokens(self) -> int | None:
        """The user's cap on query tokens per chunk (``None``: sized from free memory)."""
        return self.budget.cap

    def run(self, ablations: Sequence[Ablation], mode: str = "zero", *,
            means: ExpertMeans | None = None) -> list[AblationResult]:
        """Perform ``ablations`` (results in the same order); ``mode="mean"`` needs ``means`` (ignored otherwise)."""
        check_choice("mode", mode, MODES)
        ablations = list(ablations)
        for ab in ablations:
            check_ablation(ab, self.desc, self.state.seq_len)
            if ab.layer not in self.state.moe:
                raise ValueError(f"layer {ab.layer} was not prepared; prepared layers: {sorted(self.state.moe)}.")
            if self.strict:
                check_routed(ab, self.state.moe[ab.layer].host_routing()[0])
        if mode == "mean":
            check_means(self.model, ablations, means)
        if not ablations:
            return []
        if self.engine == "naive":
            return run_naive(self.model, self.input_ids, ablations, mode, means=means)
        return run_fast(self.model, self.state, ablations, mode, budget=self.budget, means=means)


def check_means(model: nn.Module, ablations: Sequence[Ablation], means: ExpertMeans | None) -> None:
    """``mode="mean"``: refuse missing means, means of another model, and experts without a mean."""
    if means is None:
        raise ValueError("mode='mean' replaces each removed expert by its mean output c_e: pass means= "
                         "(moeaudit.expert_means(model, sequences), computed on the corpus you ablate).")
    if not isinstance(means, ExpertMeans):
        raise ValueError(f"means must be an ExpertMeans (moeaudit.expert_means), got {type(means).__name__}.")
    means.check(model, sorted({ab.layer for ab in ablations}))
    for ab in ablations:
        means.require(ab.layer, ab.experts)


def _check_state(state: CleanState, input_ids: torch.Tensor, layers: list[int] | None, engine: str) -> None:
    if not isinstance(state, CleanState):
        raise ValueError(f"state must be a CleanState from clean_state(), got {type(state).__name__}.")
    if state.seq_len != len(input_ids) or not torch.equal(state.input_ids.cpu(), input_ids.cpu()):
        raise ValueError("state was computed for another sequence than input_ids; pass the state of this sequence.")
    missing = sorted(set(layers or []) - set(state.moe))
    if missing:
        raise ValueError(f"state holds MoE layers {sorted(state.moe)} but layers {missing} were asked for; "
                         "compute it with clean_state(model, ids, layers=None) to capture every MoE layer.")
    if engine == "fast" and state.cache is None:
        raise ValueError("the fast engine needs the clean keys/values: compute the state with keep_cache=True.")


def ablate(model: nn.Module, input_ids: torch.Tensor, ablations: Sequence[Ablation], *, engine: str = "fast",
           mode: str = "zero", max_query_tokens: int | None = None, strict: bool = False,
           means: ExpertMeans | None = None) -> list[AblationResult]:
    """Remove experts at token positions and measure the next-token loss change.

    Args:
        model: A transformers MoE causal LM of a supported family.
        input_ids: [T] one unpadded sequence (1-D LongTensor).
        ablations: What to remove where; results come back in this order.
        engine: ``fast`` (one clean pass, incremental recomputation; default) or ``naive`` (one full forward per
            ablation; the reference).
        mode: ``zero``, ``renormalize``, ``reroute`` or ``mean`` (see :data:`MODES`).
        max_query_tokens: Fast engine: hard cap on query tokens per chunk; ``None`` sizes chunks from free memory.
        strict: Refuse an ablation of an expert that is not routed where it acts instead of returning ΔL = 0.
        means: ``mode="mean"``: the experts' mean outputs (:func:`expert_means`); each removed expert's output
            becomes w_e * c_e where it is routed (see :mod:`moeaudit.intervene._means`).

    Returns:
        One :class:`AblationResult` per ablation.

    Raises:
        ValueError: for a dense layer, a layer/position/expert out of range (or not an integer, or negative), a
            shared expert, the last position, an empty expert set, 2-D input, ``max_query_tokens < 1``, an unknown
            engine/mode/scope, or (``strict``) an expert that is not routed there.
    """
    check_choice("engine", engine, ENGINES)
    check_choice("mode", mode, MODES)
    check_max_query_tokens(max_query_tokens)
    ids = check_input_ids(input_ids)
    desc = describe(model)
    ablations = list(ablations)
    for ab in ablations:
        check_ablation(ab, desc, int(ids.shape[0]))
    if mode == "mean":
        check_means(model, ablations, means)
    if not ablations:
        return []
    layers = sorted({ab.layer for ab in ablations})
    ablator = SequenceAblator(model, ids, engine=engine, layers=layers, max_query_tokens=max_query_tokens,
                              strict=strict)
    return ablator.run(ablations, mode, means=means)


__all__ = [
    "ATTRIBUTION_COLUMNS",
    "DEFAULT_MAX_QUERY_TOKENS",
    "ENGINES",
    "MEAN_COLUMNS",
    "MODES",
    "SCOPES",
    "Ablation",
    "AblationResult",
    "ChunkGeometry",
    "CleanState",
    "ExpertMeans",
    "MoELayerState",
    "OutOfMemoryEvenForOneToken",
    "QueryBudget",
    "SequenceAblator",
    "ablate",
    "apply_mode",
    "attribute",
    "attribution_importance",
    "auto_query_tokens",
    "check_layers",
    "check_means",
    "chunk_geometry",
    "chunk_memory_bytes",
    "clean_state",
    "dense_weights",
    "expert_means",
    "free_memory_bytes",
    "override_routing",
    "replace_with_means",
    "own_loss_gradients",
]
