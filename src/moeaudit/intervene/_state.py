"""The clean pass of one sequence: every layer's output, each MoE layer's routing and input, full K/V, and the
rotary embeddings of every position."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moeaudit.models import (
    FamilyAdapter,
    MoEDescription,
    adapter_for,
    decoder_layers,
    describe,
    model_device,
    moe_block,
)


@dataclass
class MoELayerState:
    """Clean routing of one MoE layer over a sequence of T tokens."""

    x: torch.Tensor  # [T, d_model] input of the MoE block
    logits: torch.Tensor  # [T, n_experts] router pre-selection scores
    weights: torch.Tensor  # [T, top_k]
    indices: torch.Tensor  # [T, top_k]
    moe_out: torch.Tensor  # [T, d_model] output of the MoE block (routed + shared)
    _host: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def host_routing(self) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, weights)`` as host arrays [T, top_k] (int64, float32), copied once: what planning reads
        without touching the device per ablation."""
        if self._host is None:
            self._host = (self.indices.cpu().numpy().astype(np.int64), self.weights.float().cpu().numpy())
        return self._host


@dataclass
class CleanState:
    """What the fast engine reuses across all ablations of one sequence.

    Attributes:
        input_ids: [T] the sequence.
        losses: [T-1] float32 next-token cross-entropy at each position.
        layer_out: per decoder layer, [T, d_model] its output.
        moe: per MoE layer index, its :class:`MoELayerState`.
        cache: the clean keys/values of every layer (full length, also for sliding-window layers); ``None`` for a
            state made for the naive engine.
        position_embeddings: the rotary embeddings the clean pass computed for all T positions (``(cos, sin)``
            [1, T, dim] or one tensor, as the family's rotary module returns them): queries reuse them, so rotary
            types whose frequencies depend on the sequence length (dynamic NTK, longrope) stay consistent.
    """

    input_ids: torch.Tensor
    losses: torch.Tensor
    layer_out: list[torch.Tensor]
    moe: dict[int, MoELayerState]
    cache: object
    logits_dtype: torch.dtype = field(default=torch.float32)
    position_embeddings: object = None
    _host_losses: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors (each storage counted once, on whatever devices they live)."""
        tensors: list[torch.Tensor] = [self.input_ids, self.losses, *self.layer_out]
        for ls in self.moe.values():
            tensors += [ls.x, ls.logits, ls.weights, ls.indices, ls.moe_out]
        for layer in getattr(self.cache, "layers", None) or []:
            tensors += [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
        pe = self.position_embeddings
        tensors += list(pe) if isinstance(pe, (tuple, list)) else [pe] if pe is not None else []
        seen: dict[tuple, int] = {}
        for t in tensors:
            storage = t.untyped_storage()
            seen[(t.device, storage.data_ptr())] = storage.nbytes()
        return sum(seen.values())

    def host_losses(self) -> np.ndarray:
        """[T-1] float32 clean losses on the host (copied once)."""
        if self._host_losses is None:
            self._host_losses = self.losses.float().cpu().numpy()
        return self._host_losses


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


@contextmanager
def capture_rotary(model: nn.Module, adapter: FamilyAdapter, store: dict) -> Iterator[None]:
    """Record the rotary embeddings the forward computes (``store["pe"]``; hook scoped)."""
    rotary = getattr(model.model, adapter.rotary_attr, None)
    if rotary is None:
        yield
        return

    def post(module, args, output):
        store["pe"] = tuple(t.detach() for t in output) if isinstance(output, tuple) else output.detach()

    handle = rotary.register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def clean_state(model: nn.Module, input_ids: torch.Tensor, *, desc: MoEDescription | None = None,
                layers: list[int] | None = None, keep_cache: bool = True) -> CleanState:
    """Run the clean forward of one sequence and keep what ablations need.

    Args:
        model: A transformers MoE causal LM.
        input_ids: [T] one unpadded sequence.
        desc: The model's :class:`MoEDescription` (computed when omitted).
        layers: MoE layers whose routing to keep (default: every MoE layer). Must be MoE layers (see
            :func:`moeaudit.intervene.check_layers`).
        keep_cache: Keep every layer's full keys/values (the fast engine needs them). With ``False`` the forward runs
            exactly as a plain ``model(input_ids)`` call (what the naive engine compares against).
    """
    from transformers import DynamicCache

    from moeaudit.intervene._spec import check_layers

    adapter = adapter_for(model)
    desc = desc or describe(model)
    layers = check_layers(layers, desc) or list(desc.moe_layers)
    ids = input_ids.to(model_device(model))
    moe: dict = {}
    outs: list = []
    rotary: dict = {}
    # No config: every layer keeps its full keys, also sliding-window ones (their window is applied in the mask).
    cache = DynamicCache() if keep_cache else None
    with capture_moe(model, layers, adapter, moe), capture_layer_outputs(model, outs), \
            capture_rotary(model, adapter, rotary):
        output = model(input_ids=ids[None], cache=cache, use_cache=True) if keep_cache else model(input_ids=ids[None])
    logits = output.logits[0]
    return CleanState(
        input_ids=ids,
        losses=token_losses(logits, ids),
        layer_out=outs,
        moe={layer: MoELayerState(**moe[layer]) for layer in layers},
        cache=cache,
        logits_dtype=logits.dtype,
        position_embeddings=rotary.get("pe"),
    )
