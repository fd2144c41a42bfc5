"""Per-family MoE adapters: where the router and experts live and how each router turns logits into top-k weights.

An adapter is mostly data (which module is the router, whether shared experts exist) plus one function,
``select``, that re-implements the family's routing rule from the router's pre-selection scores so that
``reroute`` ablations can exclude experts and let the router choose again exactly as the model would.
A test proves that every ``select`` reproduces its router's own outputs on clean inputs.

Routing rules (transformers 5.x):

- OLMoE, Qwen2-MoE, Qwen3-MoE: softmax over all experts, top-k, renormalise when ``norm_topk_prob``.
- Mixtral: softmax, top-k, always renormalised.
- DeepSeek-V2: softmax, greedy or group-limited greedy top-k (unsorted), times ``routed_scaling_factor``.
- DeepSeek-V3: sigmoid scores; choice by scores + ``e_score_correction_bias`` within the top groups (group score =
  sum of its two best choice scores); weights are the chosen sigmoid scores, renormalised when ``norm_topk_prob``,
  times ``routed_scaling_factor``.
- GPT-OSS: top-k of the logits (router has a bias), softmax over the chosen logits.

Pruning facts (what a checkpoint with experts deleted must slice, see :mod:`moeaudit.pruning`): every adapter names
the config key holding the routed-expert count (``num_experts`` / ``n_routed_experts`` / ``num_local_experts``), the
router's expert-indexed tensors (its weight rows; GPT-OSS's router bias; DeepSeek-V3's ``e_score_correction_bias``)
and the fused experts module's expert-indexed parameters (``gate_up_proj``, ``down_proj``; GPT-OSS adds their
biases). Group-limited routers (DeepSeek-V2 ``group_limited_greedy``, DeepSeek-V3) regroup a sliced checkpoint's
experts contiguously, so ``routing_groups`` states the groups and how many experts per group the rule needs.

Attention windows (a query at ``t`` sees keys ``t - window < j <= t``; ``None`` is full causal attention), read from
the config exactly as each family's mask builder does in transformers 5.x:

- OLMoE, DeepSeek-V2/V3: full attention on every layer (``create_causal_mask``; OLMoE forwards a
  ``sliding_window`` attribute to the attention kernel, which only flash kernels would honour, and its config has none).
- Mixtral, Qwen3-MoE: one window for every layer when ``config.sliding_window`` is set (Qwen3-MoE's config sets it to
  ``None`` unless ``use_sliding_window``).
- Qwen2-MoE, GPT-OSS: per layer from ``config.layer_types`` (Qwen2-MoE derives it from ``use_sliding_window`` and
  ``max_window_layers``: odd-numbered layers below ``max_window_layers`` slide), window ``config.sliding_window``.

Rotary embeddings: every family computes them once per forward in ``model.model.rotary_emb`` for all positions, as
``(cos, sin)`` of shape [1, T, rotary_dim] (DeepSeek-V2: complex ``freqs_cis`` [1, T, rotary_dim / 2]). Types whose
frequencies depend on the sequence (``dynamic``, ``longrope``) make that module stateful, so engines reuse the
clean pass's output instead of calling it again.

Incremental passes need an attention implementation that honours an arbitrary additive 4-D mask: ``sdpa``, except
GPT-OSS (attention sinks: ``eager``).

To add a family: write a ``select`` (or reuse one) and register a :class:`FamilyAdapter` in ``FAMILIES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# select(router, logits[tokens, n_experts], removed[tokens, n_experts] | None) -> (weights, indices)[tokens, top_k]
SelectFn = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]

_NEG_INF = float("-inf")


def _mask(scores: torch.Tensor, removed: torch.Tensor | None) -> torch.Tensor:
    return scores if removed is None else scores.masked_fill(removed, _NEG_INF)


def select_softmax_topk(router: nn.Module, logits: torch.Tensor, removed: torch.Tensor | None):
    """Softmax over the (remaining) experts, top-k, optional renormalisation (OLMoE, Qwen2/3-MoE, Mixtral)."""
    probs = torch.softmax(_mask(logits.float(), removed), dim=-1)
    weights, indices = torch.topk(probs, router.top_k, dim=-1)
    # Mixtral's router has no norm_topk_prob attribute and always renormalises.
    if getattr(router, "norm_topk_prob", True):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def select_deepseek_v2(router: nn.Module, logits: torch.Tensor, removed: torch.Tensor | None):
    """Softmax, greedy or group-limited greedy top-k, routed scaling (DeepSeek-V2 / V2-Lite)."""
    scores = torch.softmax(_mask(logits.float(), removed), dim=-1)
    choice = _mask(scores, removed)
    if router.topk_method == "group_limited_greedy":
        n_tokens, n_experts = choice.shape
        grouped = choice.view(n_tokens, router.num_group, n_experts // router.num_group)
        group_idx = torch.topk(grouped.max(dim=-1).values, k=router.topk_group, dim=-1, sorted=False)[1]
        keep = torch.zeros(n_tokens, router.num_group, dtype=torch.bool, device=choice.device)
        keep.scatter_(1, group_idx, True)
        choice = choice.masked_fill(~keep.repeat_interleave(n_experts // router.num_group, dim=1), _NEG_INF)
    elif router.topk_method != "greedy":
        raise ValueError(f"DeepSeek-V2 topk_method {router.topk_method!r} is not supported; expected "
                         "'greedy' or 'group_limited_greedy'.")
    indices = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, indices) * router.routed_scaling_factor
    return weights, indices


def select_deepseek_v3(router: nn.Module, logits: torch.Tensor, removed: torch.Tensor | None):
    """Sigmoid scores, bias-corrected group-limited choice, renormalisation, routed scaling (DeepSeek-V3)."""
    scores = logits.float().sigmoid()
    # Removed experts leave the bias-corrected choice, not only the logits: a bias could otherwise pick them.
    choice = _mask(scores + router.e_score_correction_bias, removed)
    n_tokens, n_experts = choice.shape
    per_group = n_experts // router.num_group
    group_scores = choice.view(n_tokens, router.num_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
    keep = torch.zeros(n_tokens, router.num_group, dtype=torch.bool, device=choice.device)
    keep.scatter_(1, group_idx, True)
    choice = choice.masked_fill(~keep.repeat_interleave(per_group, dim=1), _NEG_INF)
    indices = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, indices)
    if router.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * router.routed_scaling_factor, indices


def select_topk_softmax(router: nn.Module, logits: torch.Tensor, removed: torch.Tensor | None):
    """Top-k of the logits, softmax over the chosen ones (GPT-OSS)."""
    top, indices = torch.topk(_mask(logits.float(), removed), router.top_k, dim=-1)
    return torch.softmax(top, dim=-1), indices


# windows(config, n_layers) -> per decoder layer, its sliding window (None: full attention)
WindowsFn = Callable[[Any, int], "list[int | None]"]


def windows_none(config: Any, n_layers: int) -> list[int | None]:
    """Full causal attention on every layer (OLMoE, DeepSeek-V2/V3)."""
    return [None] * n_layers


def windows_every_layer(config: Any, n_layers: int) -> list[int | None]:
    """``config.sliding_window`` on every layer when set (Mixtral; Qwen3-MoE with ``use_sliding_window``)."""
    return [_window(config, None)] * n_layers if getattr(config, "sliding_window", None) is not None \
        else [None] * n_layers


def windows_by_layer_type(config: Any, n_layers: int) -> list[int | None]:
    """``config.sliding_window`` on the layers ``config.layer_types`` marks ``sliding_attention`` (Qwen2-MoE,
    GPT-OSS)."""
    types = getattr(config, "layer_types", None) or ["full_attention"] * n_layers
    return [_window(config, i) if t == "sliding_attention" else None for i, t in enumerate(types[:n_layers])]


def _window(config: Any, layer: int | None) -> int:
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window < 1:
        where = "every layer" if layer is None else f"layer {layer} (config.layer_types)"
        raise ValueError(f"{config.model_type}: {where} uses sliding-window attention but config.sliding_window is "
                         f"{window!r}; the model's own mask would hide every key. Set a positive sliding_window or "
                         "full attention.")
    return window


def attention_dims(config: Any) -> tuple[int, int, int]:
    """``(n_heads, key_dim, value_dim)`` of the attention scores and values each query computes.

    Multi-head latent attention (DeepSeek) expands its latent cache to ``qk_nope_head_dim + qk_rope_head_dim`` per
    head for keys and ``v_head_dim`` for values; other families use ``head_dim`` (default ``hidden_size / heads``).
    """
    heads = int(config.num_attention_heads)
    if getattr(config, "kv_lora_rank", None):
        return heads, int(config.qk_nope_head_dim + config.qk_rope_head_dim), int(config.v_head_dim)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return heads, head_dim, head_dim


@dataclass(frozen=True)
class RoutingGroups:
    """The expert groups of a group-limited router (experts ``g * E/n_group ... (g+1) * E/n_group - 1`` form group g).

    Attributes:
        n_group: Number of groups.
        topk_group: Groups each token may choose from.
        min_per_group: Experts a group needs for the rule to be defined (DeepSeek-V3 scores a group by the sum of
            its two best experts: 2; DeepSeek-V2 by its best: 1).
    """

    n_group: int
    topk_group: int
    min_per_group: int


def groups_deepseek_v2(router: nn.Module) -> RoutingGroups | None:
    if router.topk_method != "group_limited_greedy":
        return None
    return RoutingGroups(int(router.num_group), int(router.topk_group), 1)


def groups_deepseek_v3(router: nn.Module) -> RoutingGroups:
    return RoutingGroups(int(router.num_group), int(router.topk_group), 2)


@dataclass(frozen=True)
class FamilyAdapter:
    """What moeaudit needs to know about one MoE family.

    Attributes:
        family: Human-readable family name.
        model_types: ``config.model_type`` values this adapter serves.
        router_attr: Attribute of the MoE block holding the router (``gate`` or ``router``).
        select: The family's routing rule (see module docstring).
        shared_attr: Attribute holding the shared expert(s), or ``None``.
        shared_gate_attr: Attribute of a sigmoid gate on the shared expert, or ``None``.
        returns_tuple: The MoE block returns ``(hidden, router_scores)`` instead of a tensor.
        n_experts_key: Config attribute holding the number of routed experts per MoE layer.
        router_expert_tensors: Tensors (parameters or buffers) of the router indexed by expert on dim 0.
        expert_tensors: Parameters of the fused ``experts`` module indexed by expert on dim 0.
        routing_groups: The router's expert groups when its rule is group-limited, else ``None``.
        windows: Per decoder layer, its sliding attention window from the config (see module docstring).
        mask_attention: Attention implementation that honours an additive 4-D mask (incremental passes).
        rotary_attr: Attribute of the base model (``model.model``) computing the rotary embeddings.
    """

    family: str
    model_types: tuple[str, ...]
    router_attr: str
    select: SelectFn
    shared_attr: str | None = None
    shared_gate_attr: str | None = None
    returns_tuple: bool = False
    n_experts_key: str = "num_experts"
    router_expert_tensors: tuple[str, ...] = ("weight",)
    expert_tensors: tuple[str, ...] = ("gate_up_proj", "down_proj")
    routing_groups: Callable[[nn.Module], RoutingGroups | None] | None = None
    windows: WindowsFn = windows_none
    mask_attention: str = "sdpa"
    rotary_attr: str = "rotary_emb"


FAMILIES: dict[str, FamilyAdapter] = {
    a.family: a
    for a in (
        FamilyAdapter("olmoe", ("olmoe",), "gate", select_softmax_topk),
        FamilyAdapter("qwen2_moe", ("qwen2_moe",), "gate", select_softmax_topk,
                      shared_attr="shared_expert", shared_gate_attr="shared_expert_gate",
                      windows=windows_by_layer_type),
        FamilyAdapter("deepseek_v2", ("deepseek_v2",), "gate", select_deepseek_v2, shared_attr="shared_experts",
                      n_experts_key="n_routed_experts", routing_groups=groups_deepseek_v2),
        FamilyAdapter("deepseek_v3", ("deepseek_v3",), "gate", select_deepseek_v3, shared_attr="shared_experts",
                      n_experts_key="n_routed_experts",
                      router_expert_tensors=("weight", "e_score_correction_bias"), routing_groups=groups_deepseek_v3),
        FamilyAdapter("mixtral", ("mixtral",), "gate", select_softmax_topk, windows=windows_every_layer,
                      n_experts_key="num_local_experts"),
        FamilyAdapter("qwen3_moe", ("qwen3_moe",), "gate", select_softmax_topk, windows=windows_every_layer),
        FamilyAdapter("gpt_oss", ("gpt_oss",), "router", select_topk_softmax, returns_tuple=True,
                      windows=windows_by_layer_type, mask_attention="eager", n_experts_key="num_local_experts",
                      router_expert_tensors=("weight", "bias"),
                      expert_tensors=("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")),
    )
}

MODEL_TYPE_TO_FAMILY: dict[str, str] = {mt: a.family for a in FAMILIES.values() for mt in a.model_types}
