"""Typed description of an MoE model and access to its routers, experts and decoder layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeaudit.errors import UnsupportedModelError
from moeaudit.models._families import FAMILIES, MODEL_TYPE_TO_FAMILY, FamilyAdapter

_ADAPTER_HOME = "src/moeaudit/models/_families.py (register a FamilyAdapter in FAMILIES)"


@dataclass(frozen=True)
class MoEDescription:
    """The MoE facts of a model, read from its modules and config.

    Attributes:
        family: Adapter family (``olmoe``, ``qwen2_moe``, ``deepseek_v2``, ...).
        model_type: ``config.model_type``.
        n_layers: Number of decoder layers.
        moe_layers: Indices of decoder layers whose MLP is a routed MoE block.
        dense_layers: Indices of decoder layers with a dense MLP (e.g. DeepSeek's first layers).
        n_experts: Routed experts per MoE layer.
        top_k: Experts chosen per token.
        n_shared_experts: Always-on shared experts (never ablated); 0 when none.
        shared_expert_gated: Whether the shared expert output is scaled by a learned sigmoid gate.
        norm_topk_prob: Whether the chosen weights are renormalised to sum to one.
        routed_scaling_factor: Constant multiplying the routed weights (1.0 when none).
        d_model: Hidden size.
        vocab_size: Vocabulary size.
    """

    family: str
    model_type: str
    n_layers: int
    moe_layers: tuple[int, ...]
    dense_layers: tuple[int, ...]
    n_experts: int
    top_k: int
    n_shared_experts: int
    shared_expert_gated: bool
    norm_topk_prob: bool
    routed_scaling_factor: float
    d_model: int
    vocab_size: int


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (``model.model.layers``)."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None and hasattr(model, "get_decoder"):
        layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no decoder layers at model.model.layers; moeaudit expects a "
            "transformers causal LM (…ForCausalLM)."
        )
    return layers


def _is_moe_block(mlp: nn.Module) -> bool:
    return hasattr(mlp, "experts") and (hasattr(mlp, "gate") or hasattr(mlp, "router"))


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The family adapter of ``model``; a clear error for dense models and unknown MoE families."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = MODEL_TYPE_TO_FAMILY.get(model_type)
    supported = ", ".join(sorted(FAMILIES))
    if family is None:
        try:
            has_moe = any(_is_moe_block(layer.mlp) for layer in decoder_layers(model) if hasattr(layer, "mlp"))
        except UnsupportedModelError:
            has_moe = False
        if not has_moe:
            raise UnsupportedModelError(
                f"{type(model).__name__} (model_type={model_type!r}) is a dense model: it has no routed experts to "
                f"audit. moeaudit supports the MoE families: {supported}."
            )
        raise UnsupportedModelError(
            f"model_type={model_type!r} is an MoE family moeaudit has no adapter for. Supported families: "
            f"{supported}. To add one, see {_ADAPTER_HOME}."
        )
    adapter = FAMILIES[family]
    if not moe_layers(model, adapter=adapter):
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={model_type!r}) has no MoE layers (every MLP is dense), so there "
            "are no experts to audit."
        )
    return adapter


def moe_layers(model: nn.Module, *, adapter: FamilyAdapter | None = None) -> list[int]:
    """Indices of the decoder layers whose MLP is a routed MoE block (dense layers excluded).

    Args:
        model: A transformers causal LM of a supported MoE family.
        adapter: The family's adapter; found from the model when ``None``.
    """
    if adapter is None:
        adapter = adapter_for(model)
    return [
        i
        for i, layer in enumerate(decoder_layers(model))
        if hasattr(layer, "mlp") and hasattr(layer.mlp, adapter.router_attr) and hasattr(layer.mlp, "experts")
    ]


def moe_block(model: nn.Module, layer: int) -> nn.Module:
    """The MoE block (``decoder_layers(model)[layer].mlp``) of an MoE layer."""
    return decoder_layers(model)[layer].mlp


def router(model: nn.Module, layer: int, adapter: FamilyAdapter | None = None) -> nn.Module:
    """The router module of MoE layer ``layer`` (returns ``(logits, weights, indices)``)."""
    adapter = adapter or adapter_for(model)
    return getattr(moe_block(model, layer), adapter.router_attr)


def describe(model: nn.Module) -> MoEDescription:
    """Describe the MoE structure of a transformers model.

    Args:
        model: A transformers causal LM of a supported MoE family (for example from ``moeaudit.load_model``).

    Returns:
        description (MoEDescription): The family, decoder and MoE layers, experts, top-k, shared experts, routing
            flags, model width and vocabulary size.

    Raises:
        UnsupportedModelError: for a dense model or an MoE family without adapter.
    """
    adapter = adapter_for(model)
    layers = moe_layers(model, adapter=adapter)
    n_layers = len(decoder_layers(model))
    first = moe_block(model, layers[0])
    gate = getattr(first, adapter.router_attr)
    config = model.config
    n_shared = 0
    if adapter.shared_attr and hasattr(first, adapter.shared_attr):
        n_shared = int(getattr(config, "n_shared_experts", 1) or 0)
    gated = bool(adapter.shared_gate_attr and hasattr(first, adapter.shared_gate_attr))
    norm = True if adapter.family in ("gpt_oss", "mixtral") else bool(getattr(gate, "norm_topk_prob", False))
    return MoEDescription(
        family=adapter.family,
        model_type=config.model_type,
        n_layers=n_layers,
        moe_layers=tuple(layers),
        dense_layers=tuple(i for i in range(n_layers) if i not in layers),
        n_experts=int(first.experts.num_experts),
        top_k=int(gate.top_k),
        n_shared_experts=n_shared,
        shared_expert_gated=gated,
        norm_topk_prob=norm,
        routed_scaling_factor=float(getattr(gate, "routed_scaling_factor", 1.0) or 1.0),
        d_model=int(config.hidden_size),
        vocab_size=int(config.vocab_size),
    )


def model_device(model: nn.Module) -> torch.device:
    """Where token ids go in: the execution device of the input embeddings (under an accelerate device map the
    first parameter may sit on ``meta``)."""
    from moeaudit.models._loading import execution_device

    return execution_device(model.get_input_embeddings())
