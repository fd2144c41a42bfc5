"""What an ablation is (:class:`Ablation`), what it returns (:class:`AblationResult`), and input validation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moeaudit.models import MoEDescription

#: How the removed experts' routing weight is treated.
#: zero: weight set to 0, others unchanged (the paper's "output replaced by zero");
#: renormalize: remaining top-k weights rescaled to the original top-k weight sum;
#: reroute: removed experts leave the router's candidates and the router chooses top-k from the rest.
MODES: tuple[str, ...] = ("zero", "renormalize", "reroute")
#: token: removed at ``position`` only (Definition 2.1); sequence: removed at every position <= ``position``.
SCOPES: tuple[str, ...] = ("token", "sequence")
ENGINES: tuple[str, ...] = ("fast", "naive")


@dataclass(frozen=True)
class Ablation:
    """Remove ``experts`` of MoE layer ``layer`` at ``position`` and measure the loss at ``position``.

    Attributes:
        layer: Decoder layer index (must be an MoE layer).
        position: Token position; the loss is the cross-entropy of predicting token ``position + 1``.
        experts: Routed expert ids to remove. An expert that is not routed at a position is left alone there.
        scope: ``token`` (only at ``position``) or ``sequence`` (at every position <= ``position``).
    """

    layer: int
    position: int
    experts: tuple[int, ...]
    scope: str = "token"

    def __post_init__(self) -> None:
        experts = self.experts
        if isinstance(experts, int):
            experts = (experts,)
        object.__setattr__(self, "experts", tuple(int(e) for e in experts))
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "position", int(self.position))


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


def check_ablation(ablation: Ablation, desc: MoEDescription, seq_len: int) -> None:
    """Raise ``ValueError`` naming the problem and the valid range when ``ablation`` cannot be performed."""
    if not isinstance(ablation, Ablation):
        raise ValueError(f"expected an Ablation, got {type(ablation).__name__}: {ablation!r}")
    layers = ", ".join(map(str, desc.moe_layers))
    if not 0 <= ablation.layer < desc.n_layers:
        raise ValueError(f"layer {ablation.layer} is out of range: the model has {desc.n_layers} decoder layers; "
                         f"MoE layers are {layers}.")
    if ablation.layer not in desc.moe_layers:
        raise ValueError(f"layer {ablation.layer} is a dense layer with no experts to ablate; MoE layers are "
                         f"{layers}.")
    if not 0 <= ablation.position < seq_len - 1:
        raise ValueError(
            f"position {ablation.position} is out of range: a next-token loss exists at positions 0..{seq_len - 2} "
            f"of this {seq_len}-token sequence (the last token has no target)."
        )
    if not ablation.experts:
        raise ValueError("experts is empty: name at least one expert to remove.")
    bad = [e for e in ablation.experts if not 0 <= e < desc.n_experts]
    if bad:
        raise ValueError(f"expert id(s) {bad} out of range: layer {ablation.layer} has experts 0..{desc.n_experts - 1}.")
    if len(set(ablation.experts)) != len(ablation.experts):
        raise ValueError(f"experts {ablation.experts} lists an expert twice.")
    check_choice("scope", ablation.scope, SCOPES)
