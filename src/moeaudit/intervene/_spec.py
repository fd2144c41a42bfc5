"""What an ablation is (:class:`Ablation`), what it returns (:class:`AblationResult`), and input validation."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moeaudit.models import MoEDescription

#: How the removed experts' routing weight is treated.
#: zero: weight set to 0, others unchanged (the paper's "output replaced by zero");
#: renormalize: remaining top-k weights rescaled to the original top-k weight sum;
#: reroute: removed experts leave the router's candidates and the router chooses top-k from the rest;
#: mean: each removed expert's output is replaced by its mean output c_e, still times its routing weight (needs the
#: means, :func:`moeaudit.intervene.expert_means`).
MODES: tuple[str, ...] = ("zero", "renormalize", "reroute", "mean")
#: token: removed at ``position`` only (Definition 2.1); sequence: removed at every position <= ``position``.
SCOPES: tuple[str, ...] = ("token", "sequence")
ENGINES: tuple[str, ...] = ("fast", "naive")


@dataclass(frozen=True)
class Ablation:
    """Remove ``experts`` of MoE layer ``layer`` at ``position`` and measure the loss at ``position``.

    Attributes:
        layer: Decoder layer index (must be an MoE layer).
        position: Token position; the loss is the cross-entropy of predicting token ``position + 1``.
        experts: Routed expert ids to remove. An expert that is not routed at a position is left alone there, so
            ablating an expert the router did not choose at ``position`` gives ΔL = 0 (``strict=True`` in
            :func:`~moeaudit.ablate` / :class:`~moeaudit.SequenceAblator` refuses such ablations instead).
        scope: ``token`` (only at ``position``) or ``sequence`` (at every position <= ``position``).

    Raises:
        ValueError: for a layer, position or expert id that is not an integer (``1.7`` is refused, not truncated).
    """

    layer: int
    position: int
    experts: tuple[int, ...]
    scope: str = "token"

    def __post_init__(self) -> None:
        experts = self.experts
        if not isinstance(experts, (tuple, list, range)) and not _is_sequence_like(experts):
            experts = (experts,)
        object.__setattr__(self, "experts", tuple(_integer("expert id", e) for e in experts))
        object.__setattr__(self, "layer", _integer("layer", self.layer))
        object.__setattr__(self, "position", _integer("position", self.position))


def _is_sequence_like(value) -> bool:
    return hasattr(value, "__len__") and hasattr(value, "__iter__") and not isinstance(value, (str, bytes)) and \
        getattr(value, "ndim", 1) != 0


def _integer(what: str, value) -> int:
    """``value`` as an int when it is an integer (Python, NumPy, or a one-element integer tensor), else an error:
    floats are refused rather than truncated."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got the bool {value!r}.")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r} ({type(value).__name__}); a non-integer id "
                         "names no expert / layer / position. Pass an int.") from None


@dataclass(frozen=True)
class AblationResult:
    """The outcome of one ablation.

    Attributes:
        ablation: The ablation performed.
        clean_loss: Next-token cross-entropy at ``position`` without intervention (nats, float32).
        ablated_loss: The same loss with the experts removed.
        delta_loss: ``ablated_loss - clean_loss``.
        gap_norm: L2 norm of the change of the residual stream leaving decoder layer ``layer`` at ``position``.
        final_gap_norm: L2 norm of the change leaving the last decoder layer at ``position`` (propagated
            displacement).
        removed_weight: Sum of the routing weights of the removed experts at ``position`` (0 if none routed).
    """

    ablation: Ablation
    clean_loss: float
    ablated_loss: float
    delta_loss: float
    gap_norm: float
    final_gap_norm: float
    removed_weight: float


def check_choice(name: str, value: str, options: Sequence[str]) -> str:
    """Validate a string option, naming the valid ones."""
    from moeaudit.errors import did_you_mean

    if value not in options:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(options)}."
                         f"{did_you_mean(value, options)}")
    return value


def check_input_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """One unpadded sequence as a 1-D LongTensor."""
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() != 1:
        raise ValueError(
            f"input_ids must be one unpadded sequence (1-D), got shape {tuple(input_ids.shape)}; pass "
            "input_ids[0] for a batch of one, and one call per sequence."
        )
    if input_ids.numel() < 2:
        raise ValueError(f"input_ids has {input_ids.numel()} token(s); a next-token loss needs at least 2.")
    if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
    return input_ids.long()


def check_layer(layer, desc: MoEDescription) -> int:
    """An MoE layer index (no negative indexing), or ``ValueError`` naming the MoE layers."""
    layer = _integer("layer", layer)
    layers = ", ".join(map(str, desc.moe_layers))
    if not 0 <= layer < desc.n_layers:
        hint = " (negative indices are not accepted: count from 0)" if layer < 0 else ""
        raise ValueError(f"layer {layer} is out of range{hint}: the model has {desc.n_layers} decoder layers "
                         f"(0..{desc.n_layers - 1}); MoE layers are {layers}.")
    if layer not in desc.moe_layers:
        raise ValueError(f"layer {layer} is a dense layer with no experts to ablate; MoE layers are {layers}.")
    return layer


def check_layers(layers: Sequence[int] | None, desc: MoEDescription) -> list[int] | None:
    """Validate a ``layers=`` argument (``None``: every MoE layer); duplicates are dropped, order kept."""
    if layers is None:
        return None
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise ValueError(f"layers must be a list of MoE layer indices, got {layers!r}; MoE layers are "
                         f"{', '.join(map(str, desc.moe_layers))}.")
    checked = [check_layer(layer, desc) for layer in layers]
    if not checked:
        raise ValueError(f"layers is empty; name at least one MoE layer ({', '.join(map(str, desc.moe_layers))}) "
                         "or pass None for all.")
    return list(dict.fromkeys(checked))


def check_max_query_tokens(value: int | None) -> int | None:
    """``None`` (sized from free memory) or a positive integer cap on query tokens per chunk."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"max_query_tokens must be a positive integer or None, got {value!r}.")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"max_query_tokens must be a positive integer or None (size from free memory), got "
                         f"{value!r}.") from None
    if value <= 0:
        raise ValueError(f"max_query_tokens={value} must be at least 1 (query tokens per chunk), or None to size "
                         "chunks from the device's free memory.")
    return value


def check_ablation(ablation: Ablation, desc: MoEDescription, seq_len: int) -> None:
    """Raise ``ValueError`` naming the problem and the valid range when ``ablation`` cannot be performed."""
    if not isinstance(ablation, Ablation):
        raise ValueError(f"expected an Ablation, got {type(ablation).__name__}: {ablation!r}")
    check_layer(ablation.layer, desc)
    if not 0 <= ablation.position < seq_len - 1:
        raise ValueError(
            f"position {ablation.position} is out of range: a next-token loss exists at positions 0..{seq_len - 2} "
            f"of this {seq_len}-token sequence (the last token has no target)."
        )
    if not ablation.experts:
        raise ValueError("experts is empty: name at least one expert to remove.")
    bad = [e for e in ablation.experts if not 0 <= e < desc.n_experts]
    if bad:
        routed = f"layer {ablation.layer} has routed experts 0..{desc.n_experts - 1}"
        if desc.n_shared_experts:
            shared = [e for e in bad if desc.n_experts <= e < desc.n_experts + desc.n_shared_experts]
            named = (f"id(s) {shared} would be the model's shared expert(s) when numbered after the routed ones; "
                     if shared else "")
            raise ValueError(f"expert id(s) {bad} out of range: {routed}. {named}shared experts cannot be ablated: "
                             f"this model's {desc.n_shared_experts} shared expert(s) process every token outside "
                             "the router, so removing them is not a routing intervention.")
        raise ValueError(f"expert id(s) {bad} out of range: {routed}.")
    if len(set(ablation.experts)) != len(ablation.experts):
        raise ValueError(f"experts {ablation.experts} lists an expert twice.")
    check_choice("scope", ablation.scope, SCOPES)


def check_routed(ablation: Ablation, indices) -> None:
    """``strict`` mode: refuse an ablation naming an expert that is not routed where it acts (at ``position`` for
    token scope, at any position ``<= position`` for sequence scope), whose ΔL would be exactly 0.

    Args:
        ablation: A checked ablation.
        indices: [T, top_k] host array of the layer's routed experts.
    """
    t = ablation.position
    rows = indices[t: t + 1] if ablation.scope == "token" else indices[: t + 1]
    missing = [e for e in ablation.experts if not (rows == e).any()]
    if missing:
        where = f"position {t}" if ablation.scope == "token" else f"any position 0..{t}"
        raise ValueError(
            f"strict: expert(s) {missing} of layer {ablation.layer} are not routed at {where}, so removing them "
            f"changes nothing (ΔL = 0). Routed at position {t}: {sorted(int(e) for e in indices[t])}. Ablate a routed "
            "expert, or pass strict=False to accept ΔL = 0 for unrouted experts."
        )
