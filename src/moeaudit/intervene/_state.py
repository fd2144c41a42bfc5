"""The clean pass of one sequence: every layer's output, each MoE layer's routing and input, and full K/V."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moeaudit.models import FamilyAdapter, MoEDescription, adapter_for, decoder_layers, describe, moe_block


@dataclass
class MoELayerState:
    """Clean routing of one MoE layer over a sequence of T tokens."""

    x: torch.Tensor  # [T, d_model] input of the MoE block
    logits: torch.Tensor  # [T, n_experts] router pre-selection scores
    weights: torch.Tensor  # [T, top_k]
    indices: torch.Tensor  # [T, top_k]
    moe_out: torch.Tensor  # [T, d_model] output of the MoE block (routed + shared)


@dataclass
class CleanState:
    """What the fast engine reuses across all ablations of one sequence.

    Attributes:
        input_ids: [T] the sequence.
        losses: [T-1] float32 next-token cross-entropy at each position.
        layer_out: per decoder layer, [T, d_model] its output.
        moe: per MoE layer index, its :class:`MoELayerState`.
        cache: the clean keys/values of every layer (full length, also for sliding-window layers).
    """

    input_ids: torch.Tensor
    losses: torch.Tensor
    layer_out: list[torch.Tensor]
    moe: dict[int, MoELayerState]
    cache: object
    logits_dtype: torch.dtype = field(default=torch.float32)

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[0])


def _first(x):
    return x[0] if isinstance(x, tuple) else x


@contextmanager
def capture_moe(model: nn.Module, layers: list[int], adapter: FamilyAdapter, store: dict) -> Iterator[None]:
    """Record, per MoE layer in ``layers``, the block input, router outputs and block output (hooks scoped)."""
    with ExitStack() as stack:
        for layer in layers:
            block = moe_block(model, layer)
            gate = getattr(block, adapter.router_attr)
            slot = store.setdefault(layer, {})

            def pre(module, args, kwargs, slot=slot):
                hidden = args[0] if args else kwargs["hidden_states"]
                slot["x"] = hidden.reshape(-1, hidden.shape[-1]).detach()

            def post(module, args, output, slot=slot):
                out = _first(output)
                slot["moe_out"] = out.reshape(-1, out.shape[-1]).detach()

            def route(module, args, output, slot=slot):
                slot["logits"], slot["weights"], slot["indices"] = (t.detach() for t in output[:3])

            for h in (block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post),
                      gate.register_forward_hook(route)):
                stack.callback(h.remove)
        yield


@contextmanager
def capture_layer_outputs(model: nn.Module, store: list) -> Iterator[None]:
    """Record every decoder layer's output hidden states [T, d_model] (hooks scoped)."""
    layers = decoder_layers(model)
    store.extend([None] * len(layers))
    with ExitStack() as stack:
        for i, layer in enumerate(layers):

            def post(module, args, output, i=i):
                out = _first(output)
                store[i] = out.reshape(-1, out.shape[-1]).detach()

            stack.callback(layer.register_forward_hook(post).remove)
        yield


def token_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """[T-1] float32 cross-entropy of predicting ``input_ids[t+1]`` from ``logits[t]``."""
    return F.cross_entropy(logits[:-1].float(), input_ids[1:].to(logits.device), reduction="none")


@torch.no_grad()
def clean_state(model: nn.Module, input_ids: torch.Tensor, *, desc: MoEDescription | None = None,
                layers: list[int] | None = None, keep_cache: bool = True) -> CleanState:
    """Run the clean forward of one sequence and keep what ablations need.

    With ``keep_cache=False`` the forward runs exactly as a plain ``model(input_ids)`` call and no keys/values
    are kept (what the naive engine compares against).
    """
    from transformers import DynamicCache

    adapter = adapter_for(model)
    desc = desc or describe(model)
    layers = list(desc.moe_layers) if layers is None else list(layers)
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    moe: dict = {}
    outs: list = []
    # No config: every layer keeps its full keys, also sliding-window ones (their window is applied in the mask).
    cache = DynamicCache() if keep_cache else None
    with capture_moe(model, layers, adapter, moe), capture_layer_outputs(model, outs):
        output = model(input_ids=ids[None], cache=cache, use_cache=True) if keep_cache else model(input_ids=ids[None])
    logits = output.logits[0]
    return CleanState(
        input_ids=ids,
        losses=token_losses(logits, ids),
        layer_out=outs,
        moe={layer: MoELayerState(**moe[layer]) for layer in layers},
        cache=cache,
        logits_dtype=logits.dtype,
    )
