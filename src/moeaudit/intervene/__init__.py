"""Expert ablation: semantics (:class:`Ablation`, modes, scopes), the naive reference engine and the fast engine."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moeaudit.intervene._fast import DEFAULT_MAX_QUERY_TOKENS, run_fast
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
)
from moeaudit.intervene._state import CleanState, MoELayerState, clean_state
from moeaudit.models import describe


class SequenceAblator:
    """All ablations of one sequence: the clean pass runs once, then :meth:`run` as often as needed.

    Args:
        model: A transformers MoE causal LM.
        input_ids: [T] one unpadded sequence.
        engine: ``fast`` (default) or ``naive``.
        layers: MoE layers to prepare (default: all).
        max_query_tokens: Fast engine batch size in query tokens.

    Attributes:
        state: The :class:`CleanState` (routing, per-position clean losses) of the sequence.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, *, engine: str = "fast",
                 layers: Sequence[int] | None = None,
                 max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS) -> None:
        self.model = model
        self.engine = check_choice("engine", engine, ENGINES)
        self.desc = describe(model)
        self.input_ids = check_input_ids(input_ids)
        self.max_query_tokens = int(max_query_tokens)
        self.state = clean_state(model, self.input_ids, desc=self.desc,
                                 layers=None if layers is None else list(layers), keep_cache=engine == "fast")

    def run(self, ablations: Sequence[Ablation], mode: str = "zero") -> list[AblationResult]:
        """Perform ``ablations`` (results in the same order)."""
        check_choice("mode", mode, MODES)
        ablations = list(ablations)
        for ab in ablations:
            check_ablation(ab, self.desc, self.state.seq_len)
            if ab.layer not in self.state.moe:
                raise ValueError(f"layer {ab.layer} was not prepared; prepared layers: {sorted(self.state.moe)}.")
        if not ablations:
            return []
        if self.engine == "naive":
            return run_naive(self.model, self.input_ids, ablations, mode)
        return run_fast(self.model, self.state, ablations, mode, max_query_tokens=self.max_query_tokens)


def ablate(model: nn.Module, input_ids: torch.Tensor, ablations: Sequence[Ablation], *, engine: str = "fast",
           mode: str = "zero", max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS) -> list[AblationResult]:
    """Remove experts at token positions and measure the next-token loss change.

    Args:
        model: A transformers MoE causal LM of a supported family.
        input_ids: [T] one unpadded sequence (1-D LongTensor).
        ablations: What to remove where; results come back in this order.
        engine: ``fast`` (one clean pass, incremental recomputation; default) or ``naive`` (one full forward per
            ablation; the reference).
        mode: ``zero``, ``renormalize`` or ``reroute`` (see :data:`MODES`).
        max_query_tokens: Fast engine batch size in query tokens.

    Returns:
        One :class:`AblationResult` per ablation.

    Raises:
        ValueError: for a dense layer, a layer/position/expert out of range, the last position, an empty expert
            set, 2-D input, or an unknown engine/mode/scope.
    """
    check_choice("engine", engine, ENGINES)
    check_choice("mode", mode, MODES)
    ids = check_input_ids(input_ids)
    desc = describe(model)
    ablations = list(ablations)
    for ab in ablations:
        check_ablation(ab, desc, int(ids.shape[0]))
    if not ablations:
        return []
    layers = sorted({ab.layer for ab in ablations})
    ablator = SequenceAblator(model, ids, engine=engine, layers=layers, max_query_tokens=max_query_tokens)
    return ablator.run(ablations, mode)


__all__ = [
    "ENGINES",
    "MODES",
    "SCOPES",
    "Ablation",
    "AblationResult",
    "CleanState",
    "MoELayerState",
    "SequenceAblator",
    "ablate",
    "apply_mode",
    "clean_state",
    "dense_weights",
    "override_routing",
]
