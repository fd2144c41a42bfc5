"""The fast engine: reuse one clean pass, recompute only the ablated tokens through the layers after the ablation.

For an ablation at MoE layer ``L``, layers ``< L`` and layer ``L``'s own inputs are untouched, so the MoE output at
a position changes by exactly ``sum_e (w'_e - w_e) E_e(x)`` over the experts whose weight changed. The engine adds
that to the clean output of layer ``L`` and runs layers ``L+1..N-1`` on the changed positions only ("queries"),
appended after the clean keys/values of the whole sequence (see :mod:`moeaudit.intervene._incremental`).

Token scope has one query per ablation; sequence scope has the block from the first position where a removed
expert is routed up to ``position``. Work is cut into chunks of at most ``Q`` query tokens, so peak memory is bounded
by construction (:mod:`moeaudit.intervene._memory`):

- blocks no longer than ``Q`` are packed whole into chunks, each query masked to its own block;
- a longer block is split into pieces of at most ``Q`` tokens run one after the other; each piece attends to the
  keys/values its block's earlier pieces left in every later layer (carried forward), so the result is the same;
- the deltas of a chunk are built when the chunk runs, never for all ablations of a layer at once;
- an out-of-memory error halves ``Q`` and retries the chunk (nothing is committed before a chunk succeeds).

Planning reads the routing from host copies made once per layer; each chunk returns its results in one device to
host transfer (no per-ablation ``float()`` / ``int()`` synchronisation).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from moeaudit.intervene._incremental import Context, head_losses, mask_capable_attention, propagate
from moeaudit.intervene._means import ExpertMeans
from moeaudit.intervene._memory import (
    QueryBudget,
    chunk_geometry,
    is_out_of_memory,
    layer_devices,
    release_memory,
)
from moeaudit.intervene._routing import apply_mode, dense_weights
from moeaudit.intervene._spec import Ablation, AblationResult
from moeaudit.intervene._state import CleanState
from moeaudit.models import adapter_for, describe, moe_block, router

#: Former fixed chunk size, kept for callers that name it; chunks are now sized from free memory by default
#: (``max_query_tokens=None``) up to :data:`moeaudit.intervene._memory.AUTO_MAX_QUERY_TOKENS`.
DEFAULT_MAX_QUERY_TOKENS = 1024


@dataclass(eq=False)
class _Block:
    """One ablation's changed span ``start..end`` (``end`` = its position), consumed piece by piece."""

    index: int  # the ablation's index in the run
    start: int
    end: int
    removed_weight: float
    next: int = -1  # first position not yet processed
    carried: dict = field(default_factory=dict)  # per later layer (keys, values) of the processed positions

    def __post_init__(self) -> None:
        self.next = self.start

    @property
    def remaining(self) -> int:
        return self.end - self.next + 1


@dataclass(frozen=True)
class _Piece:
    block: _Block
    first: int
    last: int

    @property
    def final(self) -> bool:
        return self.last == self.block.end


class OutOfMemoryEvenForOneToken(MemoryError):
    """A chunk of a single query token did not fit: nothing smaller can be tried."""


@torch.no_grad()
def run_fast(model: nn.Module, state: CleanState, ablations: Sequence[Ablation], mode: str, *,
             max_query_tokens: int | None = None, budget: QueryBudget | None = None,
             means: ExpertMeans | None = None) -> list[AblationResult]:
    """Run ``ablations`` of the sequence whose clean pass is ``state`` (see module docstring).

    Args:
        model: The model ``state`` was computed with.
        state: The sequence's :class:`CleanState` (with its cache).
        ablations: Checked ablations of MoE layers ``state`` holds.
        mode: ``zero``, ``renormalize``, ``reroute`` or ``mean``.
        max_query_tokens: Hard cap on query tokens per chunk; ``None`` sizes chunks from the free memory of the
            devices the later layers live on.
        budget: A :class:`QueryBudget` shared across runs (remembers out-of-memory halvings); overrides
            ``max_query_tokens``.
        means: The experts' mean outputs (``mode="mean"`` only; checked by the caller).
    """
    adapter = adapter_for(model)
    ctx = Context.build(model, state, describe(model), adapter)
    ctx.means = means
    budget = budget or QueryBudget(cap=max_query_tokens)
    results: list[AblationResult | None] = [None] * len(ablations)
    by_layer: dict[int, list[int]] = defaultdict(list)
    for i, ab in enumerate(ablations):
        by_layer[ab.layer].append(i)
    with mask_capable_attention(model, adapter):
        for layer, idxs in sorted(by_layer.items()):
            _run_layer(ctx, layer, ablations, idxs, mode, results, budget)
    return results  # type: ignore[return-value]


def _ragged(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(row, value, counts)``: the row index and the value of every element of the integer lists ``rows``,
    flattened in order, and each row's length (int64 arrays; one pass in C instead of a loop per row)."""
    counts = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    values = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(counts.sum()))
    return np.repeat(np.arange(len(rows)), counts), values, counts


def _plan_blocks(ctx: Context, layer: int, ablations: Sequence[Ablation], idxs: list[int],
                 results: list) -> list[_Block]:
    """Blocks of the ablations that change something; the others get their (clean) result directly. Vectorised
    over the layer's ablations: on a GPU this host-side planning runs while the device waits."""
    indices, weights = ctx.state.moe[layer].host_routing()
    losses = ctx.state.host_losses()
    seq_len, top_k = indices.shape
    # first[e]: the first position where expert e is routed (seq_len when never).
    first = np.full(ctx.desc.n_experts, seq_len, dtype=np.int64)
    np.minimum.at(first, indices.ravel(), np.repeat(np.arange(seq_len), top_k))
    chosen = [ablations[i] for i in idxs]
    row, expert, counts = _ragged([ab.experts for ab in chosen])
    experts = np.full((len(chosen), int(counts.max())), -1, dtype=np.int64)  # [N, most removed], -1: none
    experts[row, np.arange(len(expert)) - np.repeat(np.cumsum(counts) - counts, counts)] = expert
    positions = np.fromiter((ab.position for ab in chosen), dtype=np.int64, count=len(chosen))
    routed_here = (indices[positions][:, :, None] == experts[:, None, :]).any(axis=2)  # [N, top_k]
    removed_weight = np.where(routed_here, weights[positions], np.float32(0)).sum(axis=1, dtype=np.float32)
    sequence = np.fromiter((ab.scope != "token" for ab in chosen), dtype=bool, count=len(chosen))
    first_routed = np.where(experts >= 0, first[experts.clip(min=0)], seq_len).min(axis=1)
    starts = np.where(sequence, first_routed, positions)
    unchanged = (~sequence & ~routed_here.any(axis=1)) | (starts > positions)
    blocks = []
    for i, ab, t, start, weight, same in zip(idxs, chosen, positions.tolist(), starts.tolist(),
                                             removed_weight.tolist(), unchanged.tolist()):
        if same:
            clean = float(losses[t])
            results[i] = AblationResult(ab, clean, clean, 0.0, 0.0, 0.0, weight)
        else:
            blocks.append(_Block(i, start, t, weight))
    return blocks


def _next_chunk(queue: list[_Block], packed: int, split: int) -> list[_Piece]:
    """The next chunk: a piece of a started or over-long block alone, else whole blocks packed up to ``packed``."""
    head = queue[0]
    if head.next > head.start or head.remaining > packed:
        return [_Piece(head, head.next, head.next + min(split, head.remaining) - 1)]
    chunk, size = [], 0
    for b in queue:
        if b.next == b.start and size + b.remaining <= packed:
            chunk.append(_Piece(b, b.start, b.end))
            size += b.remaining
    return chunk


def _run_layer(ctx: Context, layer: int, ablations: Sequence[Ablation], idxs: list[int], mode: str,
               results: list, budget: QueryBudget) -> None:
    queue = _plan_blocks(ctx, layer, ablations, idxs, results)
    if not queue:
        return
    cache_layer = ctx.state.cache.layers[min(layer + 1, len(ctx.layers) - 1)]
    cache_width = (cache_layer.keys[0, :, 0].numel() + cache_layer.values[0, :, 0].numel())
    geometry = chunk_geometry(ctx.model, layer, cache_width, desc=ctx.desc)
    devices = layer_devices(ctx.model, layer)
    sizes = budget.sized(geometry, ctx.state.seq_len, devices)  # free memory read once per layer
    while queue:
        packed, split = budget.shrunk(sizes)
        chunk = _next_chunk(queue, packed, split)
        try:
            out = _run_chunk(ctx, layer, chunk, ablations, mode)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            release_memory(devices)
            if sum(p.last - p.first + 1 for p in chunk) == 1:
                raise OutOfMemoryEvenForOneToken(
                    f"out of memory running a single query token after layer {layer} (sequence of "
                    f"{ctx.state.seq_len} tokens): the model and the clean state leave no room. Use shorter "
                    "sequences (max_length), a smaller dtype, or spread the model with device_map.") from exc
            budget.halvings += 1
            continue
        finished = _commit(ctx, chunk, out, ablations, results)
        if finished:
            queue = [b for b in queue if b not in finished]


def _commit(ctx: Context, chunk: list[_Piece], out: tuple, ablations: Sequence[Ablation],
            results: list) -> set[_Block]:
    """Record a successful chunk: results of the ablations it finished (returned), carried keys of the others."""
    host, new_keys = out
    rows = host.tolist() if host is not None else []  # Python floats, converted once per chunk
    finished: set[_Block] = set()
    losses = ctx.state.host_losses()
    k = 0
    for piece in chunk:
        block = piece.block
        if not piece.final:
            block.carried = {layer: (torch.cat([block.carried[layer][0], kv[0]], dim=-2),
                                     torch.cat([block.carried[layer][1], kv[1]], dim=-2))
                             if layer in block.carried else kv for layer, kv in new_keys.items()}
            block.next = piece.last + 1
            continue
        ab = ablations[block.index]
        clean = float(losses[ab.position])
        ablated, gap, final_gap = rows[k]
        k += 1
        results[block.index] = AblationResult(ab, clean, ablated, ablated - clean, gap, final_gap,
                                              block.removed_weight)
        block.carried = {}
        finished.add(block)
    return finished


def _chunk_deltas(ctx: Context, layer: int, pos: torch.Tensor, row_piece: torch.Tensor, removed: torch.Tensor,
                  mode: str) -> torch.Tensor:
    """[Q, d_model] float32 change of layer ``layer``'s output at each query row (rows of one ablation share its
    removal mask ``removed[row_piece]``)."""
    ls = ctx.state.moe[layer]
    n_experts = ctx.desc.n_experts
    weights, indices = ls.weights[pos], ls.indices[pos]
    # mean: the removed experts' weights leave as in zero, then w_e * c_e comes back (the routing is unchanged).
    new_w, new_i = apply_mode(ctx.adapter, router(ctx.model, layer, ctx.adapter), ls.logits[pos], weights, indices,
                              removed[row_piece], "zero" if mode == "mean" else mode)
    diff = dense_weights(new_w, new_i, n_experts) - dense_weights(weights, indices, n_experts)
    rows, experts = diff.nonzero(as_tuple=True)
    delta = torch.zeros(len(pos), ls.x.shape[-1], dtype=torch.float32, device=pos.device)
    if len(rows):
        # Each (position, expert) output is computed once, however many ablations of the chunk need it.
        keys, inverse = torch.unique(pos[rows] * n_experts + experts, return_inverse=True)
        pos_u, exp_u = keys // n_experts, keys % n_experts
        ones = torch.ones(len(keys), 1, dtype=ls.weights.dtype, device=pos.device)
        outputs = moe_block(ctx.model, layer).experts(ls.x[pos_u], exp_u[:, None], ones)
        if mode == "mean":  # w_e * (c_e - E_e(x)): diff is -w_e at each removed routed expert
            work = torch.promote_types(outputs.dtype, torch.float32)
            constants = ctx.means.constants(layer, device=outputs.device, dtype=work)
            outputs = outputs.to(work) - constants[exp_u]
        delta.index_add_(0, rows, diff[rows, experts, None] * outputs.float()[inverse])
    return delta


def _run_chunk(ctx: Context, layer: int, chunk: list[_Piece], ablations: Sequence[Ablation],
               mode: str) -> tuple[np.ndarray | None, dict]:
    """Run one chunk. Returns ``(host [n_final, 3] of (ablated loss, gap_norm, final_gap_norm) for the pieces that
    finish their ablation, in chunk order; the chunk's keys/values per later layer when it is a non-final piece)``.
    """
    state = ctx.state
    device = ctx.devices[layer]
    n = len(chunk)
    firsts = np.fromiter((p.first for p in chunk), dtype=np.int64, count=n)
    lengths = np.fromiter((p.last for p in chunk), dtype=np.int64, count=n) - firsts + 1
    offsets = np.cumsum(lengths) - lengths
    piece_of_row = np.repeat(np.arange(n), lengths)
    pos_np = firsts[piece_of_row] + np.arange(int(lengths.sum())) - offsets[piece_of_row]
    ends = offsets + lengths - 1
    finals = [k for k, p in enumerate(chunk) if p.final]
    # The plan goes to the device once per chunk: positions, block ids and starts, removal masks.
    row, expert, _ = _ragged([ablations[p.block.index].experts for p in chunk])
    removed_np = np.zeros((n, ctx.desc.n_experts), dtype=bool)
    removed_np[row, expert] = True
    pos = torch.from_numpy(pos_np).to(device)
    row_piece = torch.from_numpy(piece_of_row).to(device)
    starts = torch.from_numpy(np.fromiter((p.block.start for p in chunk), dtype=np.int64, count=n)).to(
        device)[row_piece]
    removed = torch.from_numpy(removed_np).to(device)

    clean_out = state.layer_out[layer]
    delta = _chunk_deltas(ctx, layer, pos, row_piece, removed, mode)
    inputs = (clean_out[pos].float() + delta).to(clean_out.dtype)
    del delta
    end_rows = torch.tensor(ends[finals].tolist(), device=device, dtype=torch.long)
    gaps = (inputs[end_rows].float() - clean_out[pos[end_rows]].float()).norm(dim=-1)

    head = chunk[0]
    split = not (head.first == head.block.start and head.final)
    carried_pos = torch.arange(head.block.start, head.first, device=device) if split else None
    final, new_keys = propagate(ctx, layer, inputs, pos, starts, row_piece, carried=head.block.carried if split
                                else None, carried_pos=carried_pos, record=split and not head.final)
    if not finals:
        return None, new_keys
    last = ctx.desc.n_layers - 1
    final_end = final[end_rows.to(final.device)]
    end_pos = pos[end_rows]
    clean_last = state.layer_out[last]
    final_gaps = (final_end.float() - clean_last[end_pos.to(clean_last.device)].float()).norm(dim=-1)
    losses = head_losses(ctx, final_end, state.input_ids[(end_pos + 1).to(state.input_ids.device)])
    out = torch.stack([losses, gaps.to(losses.device), final_gaps.to(losses.device)], dim=1)
    return out.cpu().numpy(), new_keys
