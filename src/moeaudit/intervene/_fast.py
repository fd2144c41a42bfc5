"""The fast engine: reuse one clean pass, recompute only the ablated tokens through the layers after the ablation.

For an ablation at MoE layer ``L``, layers ``< L`` and layer ``L``'s own inputs are untouched, so the MoE output at
a position changes by exactly ``sum_e (w'_e - w_e) E_e(x)`` over the experts whose weight changed. The engine adds
that to the clean output of layer ``L`` and runs layers ``L+1..N-1`` on the changed positions only ("queries"),
appended after the clean keys/values of the whole sequence: a query at position ``t`` of a block starting at ``s``
sees clean keys ``j < s`` and the block's own keys ``<= t`` (and only keys inside a sliding window, where a layer
has one). Many ablations run together as one batch of queries, each masked to its own prefix.

Token scope has one query per ablation; sequence scope has the block from the first position where a removed
expert is routed up to ``position``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from moeaudit.intervene._routing import apply_mode, dense_weights, removal_mask
from moeaudit.intervene._spec import Ablation, AblationResult
from moeaudit.intervene._state import CleanState, _first
from moeaudit.models import adapter_for, decoder_layers, describe, moe_block, router

#: Upper bound on query tokens pushed through the remaining layers at once (memory ~ Q x (T + Q) per head).
DEFAULT_MAX_QUERY_TOKENS = 1024


def layer_windows(model: nn.Module) -> list[int | None]:
    """Per decoder layer, its sliding attention window (``None`` for full attention)."""
    config = model.config
    n = len(decoder_layers(model))
    window = getattr(config, "sliding_window", None) or None
    types = getattr(config, "layer_types", None)
    if types is not None:
        return [window if t == "sliding_attention" else None for t in types[:n]]
    if config.model_type == "mixtral":
        return [window] * n
    return [None] * n


class _PrefixCache:
    """Stand-in cache: layer ``l`` attends over its clean keys/values followed by the queries' own."""

    def __init__(self, clean_cache) -> None:
        self.clean = clean_cache

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.clean.layers[layer_idx]
        return (torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2))


@contextmanager
def _mask_capable_attention(model: nn.Module) -> Iterator[None]:
    """Use an attention implementation that honours arbitrary 4-D masks (not flash) for the incremental pass."""
    config = model.config
    current = getattr(config, "_attn_implementation", None)
    wanted = current
    if current not in ("eager", "sdpa"):
        wanted = "eager" if config.model_type == "gpt_oss" else "sdpa"
    if wanted == current:
        yield
        return
    config._attn_implementation = wanted
    try:
        yield
    finally:
        config._attn_implementation = current


def _query_mask(pos: torch.Tensor, start: torch.Tensor, block: torch.Tensor, seq_len: int,
                window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [1, 1, Q, T + Q]: query q sees clean keys j < start[q] and its block's keys up to itself."""
    cached = torch.arange(seq_len, device=pos.device)
    see_cached = cached[None, :] < start[:, None]
    see_new = (block[:, None] == block[None, :]) & (pos[None, :] <= pos[:, None])
    if window is not None:
        see_cached &= cached[None, :] > pos[:, None] - window
        see_new &= pos[None, :] > pos[:, None] - window
    allowed = torch.cat([see_cached, see_new], dim=1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=pos.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


@torch.no_grad()
def run_fast(model: nn.Module, state: CleanState, ablations: Sequence[Ablation], mode: str, *,
             max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS) -> list[AblationResult]:
    """Run ``ablations`` of the sequence whose clean pass is ``state`` (see module docstring)."""
    adapter = adapter_for(model)
    desc = describe(model)
    results: list[AblationResult | None] = [None] * len(ablations)
    by_layer: dict[int, list[int]] = defaultdict(list)
    for i, ab in enumerate(ablations):
        by_layer[ab.layer].append(i)
    with _mask_capable_attention(model):
        for layer, idxs in sorted(by_layer.items()):
            _run_layer(model, state, desc, adapter, layer, [ablations[i] for i in idxs], idxs, mode,
                       results, max_query_tokens)
    return results  # type: ignore[return-value]


def _layer_deltas(model, state, desc, adapter, layer, abls, mode):
    """Per ablation: its changed positions and the [n, d_model] float32 change of layer ``layer``'s output there."""
    ls = state.moe[layer]
    device = ls.x.device
    row_ab, row_pos = [], []
    for a, ab in enumerate(abls):
        positions = [ab.position] if ab.scope == "token" else range(ab.position + 1)
        row_ab.extend([a] * len(positions))
        row_pos.extend(positions)
    row_ab_t = torch.tensor(row_ab, device=device)
    row_pos_t = torch.tensor(row_pos, device=device)
    ab_masks = torch.stack([removal_mask(ab.experts, desc.n_experts, device) for ab in abls])
    weights, indices = ls.weights[row_pos_t], ls.indices[row_pos_t]
    new_w, new_i = apply_mode(adapter, router(model, layer, adapter), ls.logits[row_pos_t], weights, indices,
                              ab_masks[row_ab_t], mode)
    diff = dense_weights(new_w, new_i, desc.n_experts) - dense_weights(weights, indices, desc.n_experts)
    rows, experts = diff.nonzero(as_tuple=True)
    delta = torch.zeros(len(row_pos), ls.x.shape[-1], dtype=torch.float32, device=device)
    if len(rows):
        # Each (position, expert) output is computed once, however many ablations need it.
        keys, inverse = torch.unique(row_pos_t[rows] * desc.n_experts + experts, return_inverse=True)
        pos_u, exp_u = keys // desc.n_experts, keys % desc.n_experts
        ones = torch.ones(len(keys), 1, dtype=ls.weights.dtype, device=device)
        outputs = moe_block(model, layer).experts(ls.x[pos_u], exp_u[:, None], ones).float()
        delta.index_add_(0, rows, diff[rows, experts, None] * outputs[inverse])
    changed = diff.ne(0).any(dim=-1)
    per_ab = []
    for a in range(len(abls)):
        sel = (row_ab_t == a) & changed
        per_ab.append((row_pos_t[sel], delta[sel]))
    return per_ab


def _run_layer(model, state, desc, adapter, layer, abls, idxs, mode, results, max_query_tokens):
    ls = state.moe[layer]
    last = desc.n_layers - 1
    clean_out = state.layer_out[layer]
    dtype = clean_out.dtype
    blocks = []  # (ablation index, positions, inputs[n, d] for layer+1, gap_norm)
    for a, (positions, delta) in enumerate(_layer_deltas(model, state, desc, adapter, layer, abls, mode)):
        ab = abls[a]
        t = ab.position
        old_w = dense_weights(ls.weights[t: t + 1], ls.indices[t: t + 1], desc.n_experts)[0]
        removed_weight = float(old_w[list(ab.experts)].sum())
        if positions.numel() == 0:
            clean = float(state.losses[t])
            results[idxs[a]] = AblationResult(ab, clean, clean, 0.0, 0.0, 0.0, removed_weight)
            continue
        start = int(positions.min())
        span = torch.arange(start, t + 1, device=positions.device)
        full_delta = torch.zeros(len(span), delta.shape[-1], dtype=torch.float32, device=delta.device)
        full_delta[positions - start] = delta
        inputs = (clean_out[start: t + 1].float() + full_delta).to(dtype)
        gap = float((inputs[-1].float() - clean_out[t].float()).norm())
        blocks.append((a, span, inputs, gap, removed_weight))

    chunk: list = []
    size = 0
    for block in blocks:
        if chunk and size + len(block[1]) > max_query_tokens:
            _run_chunk(model, state, desc, layer, last, chunk, abls, idxs, results)
            chunk, size = [], 0
        chunk.append(block)
        size += len(block[1])
    if chunk:
        _run_chunk(model, state, desc, layer, last, chunk, abls, idxs, results)


def _run_chunk(model, state, desc, layer, last, chunk, abls, idxs, results):
    device = state.input_ids.device
    pos = torch.cat([b[1] for b in chunk])
    start = torch.cat([torch.full_like(b[1], int(b[1][0])) for b in chunk])
    block = torch.cat([torch.full_like(b[1], k) for k, b in enumerate(chunk)])
    hidden = torch.cat([b[2] for b in chunk])[None]
    ends = torch.cumsum(torch.tensor([len(b[1]) for b in chunk], device=device), 0) - 1
    layers = decoder_layers(model)
    if layer < last:
        position_ids = pos[None]
        position_embeddings = model.model.rotary_emb(hidden, position_ids)
        cache = _PrefixCache(state.cache)
        masks: dict = {}
        windows = layer_windows(model)
        for l_idx in range(layer + 1, desc.n_layers):
            w = windows[l_idx]
            if w not in masks:
                masks[w] = _query_mask(pos, start, block, state.seq_len, w, hidden.dtype)
            hidden = _first(layers[l_idx](hidden, attention_mask=masks[w], position_ids=position_ids, cache=cache,
                                          position_embeddings=position_embeddings))
    final = hidden[0, ends]
    logits = model.get_output_embeddings()(model.model.norm(final)).float()
    targets = state.input_ids[[abls[b[0]].position + 1 for b in chunk]]
    losses = F.cross_entropy(logits, targets, reduction="none")
    for k, (a, _span, _inputs, gap, removed_weight) in enumerate(chunk):
        t = abls[a].position
        clean = float(state.losses[t])
        ablated = float(losses[k])
        final_gap = float((final[k].float() - state.layer_out[last][t].float()).norm())
        results[idxs[a]] = AblationResult(abls[a], clean, ablated, ablated - clean, gap, final_gap, removed_weight)
