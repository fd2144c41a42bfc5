"""The incremental pass: query tokens through decoder layers against the clean keys/values, on each layer's device.

Queries are appended after the ``T`` cached tokens as one batch of ``Q`` tokens. Query ``q`` at position ``pos[q]``
belongs to block ``block[q]`` (one ablation's changed span, starting at ``start[q]``); it sees the clean keys
``j < start[q]`` and the keys of its own block up to itself: the block's earlier pieces (``carried``, when a long
block is split) and the chunk's own keys. Where a layer has a sliding window, only keys ``j > pos[q] - window``.
Rotary embeddings are the clean pass's own, indexed at the query positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from moeaudit.intervene._state import CleanState, _first
from moeaudit.models import FamilyAdapter, MoEDescription, decoder_layers, execution_device


@dataclass
class Context:
    """What every chunk of one run needs: the model, its clean state, and where each layer computes."""

    model: nn.Module
    state: CleanState
    desc: MoEDescription
    adapter: FamilyAdapter
    layers: nn.ModuleList
    devices: list[torch.device]  # per decoder layer, its execution device
    windows: list[int | None]  # per decoder layer, its sliding window
    head_device: torch.device
    means: object = None  # ExpertMeans of a ``mean`` run (see moeaudit.intervene._means)

    @classmethod
    def build(cls, model: nn.Module, state: CleanState, desc: MoEDescription, adapter: FamilyAdapter) -> Context:
        layers = decoder_layers(model)
        return cls(model=model, state=state, desc=desc, adapter=adapter, layers=layers,
                   devices=[execution_device(layer) for layer in layers],
                   windows=adapter.windows(model.config, len(layers)),
                   head_device=execution_device(model.get_output_embeddings()))

    def position_embeddings(self, pos: torch.Tensor):
        """The clean pass's rotary embeddings at ``pos`` (``None`` for a model without a rotary module)."""
        return _map(self.state.position_embeddings, lambda t: t[:, pos.to(t.device)])


def _map(value, fn):
    if value is None:
        return None
    return tuple(fn(v) for v in value) if isinstance(value, (tuple, list)) else fn(value)


class PrefixCache:
    """Stand-in cache: layer ``l`` attends over its clean keys/values, then keys carried from the block's earlier
    pieces, then the queries' own; with ``record`` it keeps the queries' keys/values for the next piece."""

    def __init__(self, clean_cache, carried: dict | None = None, record: bool = False) -> None:
        self.clean = clean_cache
        self.carried = carried or {}
        self.record = record
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.clean.layers[layer_idx]
        keys, values = [layer.keys], [layer.values]
        if layer_idx in self.carried:
            keys.append(self.carried[layer_idx][0])
            values.append(self.carried[layer_idx][1])
        if self.record:
            self.new[layer_idx] = (key_states, value_states)
        return torch.cat([*keys, key_states], dim=-2), torch.cat([*values, value_states], dim=-2)


@contextmanager
def mask_capable_attention(model: nn.Module, adapter: FamilyAdapter) -> Iterator[None]:
    """Use an attention implementation that honours arbitrary 4-D masks (not flash) for the incremental pass."""
    config = model.config
    current = getattr(config, "_attn_implementation", None)
    wanted = current if current in ("eager", "sdpa") else adapter.mask_attention
    if wanted == current:
        yield
        return
    config._attn_implementation = wanted
    try:
        yield
    finally:
        config._attn_implementation = current


def _query_mask(pos: torch.Tensor, start: torch.Tensor, block: torch.Tensor, key_pos: torch.Tensor,
                key_block: torch.Tensor, seq_len: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [1, 1, Q, T + M]: query q sees clean keys j < start[q] and the keys of its own block (``M`` of
    them: carried then new, at ``key_pos`` of block ``key_block``) up to itself; within ``window`` if set."""
    cached = torch.arange(seq_len, device=pos.device)
    see_cached = cached[None, :] < start[:, None]
    see_own = (key_block[None, :] == block[:, None]) & (key_pos[None, :] <= pos[:, None])
    if window is not None:
        see_cached &= cached[None, :] > pos[:, None] - window
        see_own &= key_pos[None, :] > pos[:, None] - window
    allowed = torch.cat([see_cached, see_own], dim=1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=pos.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


@torch.no_grad()
def propagate(ctx: Context, layer: int, hidden: torch.Tensor, pos: torch.Tensor, start: torch.Tensor,
              block: torch.Tensor, *, carried: dict | None = None, carried_pos: torch.Tensor | None = None,
              record: bool = False) -> tuple[torch.Tensor, dict]:
    """:func:`run_queries` without autograd (the ablation engine's pass)."""
    return run_queries(ctx, layer, hidden, pos, start, block, carried=carried, carried_pos=carried_pos,
                       record=record)


def run_queries(ctx: Context, layer: int, hidden: torch.Tensor, pos: torch.Tensor, start: torch.Tensor,
                block: torch.Tensor, *, carried: dict | None = None, carried_pos: torch.Tensor | None = None,
                record: bool = False, outputs: dict | None = None) -> tuple[torch.Tensor, dict]:
    """Run ``hidden`` [Q, d_model] (the output of decoder layer ``layer`` at the queries) through layers
    ``layer+1..N-1``.

    Args:
        ctx: The run's :class:`Context`.
        layer: The ablated decoder layer.
        hidden: [Q, d_model] query states leaving ``layer``.
        pos, start, block: [Q] each query's position, its block's first position, and its block id.
        carried: Per layer ``(keys, values)`` of the block's earlier pieces (a split block; one block per chunk).
        carried_pos: [M] positions of the carried keys.
        record: Keep this chunk's keys/values per layer (returned) for the block's next piece.
        outputs: When given, receives every layer's output [1, Q, d_model] by layer index (with autograd on, the
            attribution pass differentiates the loss with respect to them). ``layer = -1`` starts from the
            embeddings.

    Returns:
        ``(hidden [Q, d_model] leaving the last layer, {layer: (keys, values)} if record else {})``.
    """
    n_layers = len(ctx.layers)
    if layer == n_layers - 1:
        return hidden, {}
    state = ctx.state
    key_pos, key_block = pos, block
    if carried_pos is not None and len(carried_pos):
        key_pos = torch.cat([carried_pos.to(pos.device), pos])
        key_block = torch.cat([torch.full_like(carried_pos, 0).to(pos.device), block])
    pe_all = ctx.position_embeddings(pos)
    cache = PrefixCache(state.cache, carried, record)
    masks: dict = {}
    per_device: dict = {}
    hidden = hidden[None]
    for l_idx in range(layer + 1, n_layers):
        device, window = ctx.devices[l_idx], ctx.windows[l_idx]
        if device not in per_device:
            moved = [t.to(device) for t in (pos, start, block, key_pos, key_block)]
            per_device[device] = (moved, _map(pe_all, lambda t, d=device: t.to(d)))
        (d_pos, d_start, d_block, d_key_pos, d_key_block), pe = per_device[device]
        if (window, device) not in masks:
            masks[window, device] = _query_mask(d_pos, d_start, d_block, d_key_pos, d_key_block, state.seq_len,
                                                window, hidden.dtype)
        hidden = _first(ctx.layers[l_idx](hidden.to(device), attention_mask=masks[window, device],
                                          position_ids=d_pos[None], cache=cache, position_embeddings=pe))
        if outputs is not None:
            outputs[l_idx] = hidden  # [1, Q, d_model]: the tensor the next layer consumes
    return hidden[0], cache.new


def head_losses(ctx: Context, final: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[n] float32 next-token cross-entropy of ``final`` [n, d_model] states leaving the last layer (on the LM
    head's device)."""
    model = ctx.model
    norm = model.model.norm
    normed = norm(final.to(execution_device(norm)))
    logits = model.get_output_embeddings()(normed.to(ctx.head_device)).float()
    return torch.nn.functional.cross_entropy(logits, targets.to(logits.device), reduction="none")
