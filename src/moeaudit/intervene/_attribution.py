"""Attribution patching for experts: first-order estimates of every (position, layer, active expert) ΔL from one
clean pass and one backward pass, in every ablation mode.

Estimand. For position ``t``, MoE layer ``l``, routed expert ``e`` and mode ``m``, the engine's
``ΔL_t = L_t(ablated) - L_t(clean)`` (``L_t``: cross-entropy of predicting token ``t + 1``). Its first-order
estimate (attribution patching, Nanda 2023; AtP, Kramár et al. 2024) is

    ΔL̂_t(l, e, m) = g_t^(l) · δy_t^(l)(e, m),      g_t^(l) = ∂L_t / ∂y_t^(l),

where ``δy`` is the exact change of the MoE block's output at ``t`` that the ablation engine applies (zero:
``-w_e E_e(x_t)``; renormalize / reroute: the recomputed combination minus the clean one, by the family's routing
rule; see :func:`moeaudit.intervene._fast._chunk_deltas`, so a mode the engine learns is estimated here as well)
and ``g`` is the gradient of position ``t``'s **own** loss with respect to the block's output at ``t`` (equal to the
gradient with respect to the decoder layer's output, which adds the block's output to the residual stream).

One backward for every ``g_t^(l)``. Each position runs as a query of the fast engine's incremental pass
(:func:`moeaudit.intervene._incremental.run_queries`): from the embeddings (or the clean output of the layer before
the first one asked), through every later layer, attending to the *detached* clean keys/values of the positions
before it and to its own key/value. Query ``t``'s final state therefore depends on ``y_t^(l)`` exactly as the plain
forward's ``L_t`` does (through its own residual stream and its own keys/values; earlier positions do not depend on
it and later ones do not enter ``L_t``) and on no other query, so one backward of ``Σ_t L_t`` through the queries
gives every position's own gradient at every layer. (A backward of ``Σ_t L_t`` through the plain forward would add
later positions' losses through attention: a different quantity.) Sliding windows, rotary types, attention sinks
and multi-head latent attention are the engine's. Queries are cut into chunks of at most ``max_query_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from moeaudit.intervene._fast import _chunk_deltas
from moeaudit.intervene._incremental import Context, mask_capable_attention, run_queries
from moeaudit.intervene._memory import is_out_of_memory, release_memory
from moeaudit.intervene._spec import MODES, check_choice, check_input_ids, check_layers
from moeaudit.intervene._state import CleanState, clean_state
from moeaudit.models import adapter_for, describe, execution_device

#: Query tokens per chunk of the attribution pass when none is given (memory grows with it: every later layer's
#: activations of the chunk are kept for the backward).
DEFAULT_ATTRIBUTION_TOKENS = 256
#: Rows (position x active expert) of one estimate chunk (bounds the [rows, d_model] changes of the block output).
_ESTIMATE_ROWS = 4096

#: Columns of :func:`attribute`'s table before the ``estimate_<mode>`` columns.
ATTRIBUTION_COLUMNS: tuple[str, ...] = ("seq_id", "doc_id", "position", "layer", "expert", "slot", "weight",
                                        "clean_loss")


def own_loss_gradients(model: nn.Module, state: CleanState, layers: Sequence[int], *,
                       max_query_tokens: int | None = None,
                       positions: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
    """``{layer: g [T-1, d_model]}``: ``g[t] = ∂L_t/∂y_t^(layer)``, each position's own-loss gradient with respect
    to the output of ``layer`` (see the module docstring), in the model's dtype. With ``positions``, only theirs:
    ``g [len(positions), d_model]`` in the order given (each position is its own query, so a subset costs
    proportionally less and gives the same rows).

    Args:
        model: The model ``state`` was computed with.
        state: The sequence's :class:`CleanState`, with its cache.
        layers: Decoder layers (any, MoE or dense) whose output gradients to return.
        max_query_tokens: Positions per forward/backward chunk (default :data:`DEFAULT_ATTRIBUTION_TOKENS`).
        positions: Positions (0 .. T-2) whose gradients to return (default: all).
    """
    if state.cache is None:
        raise ValueError("attribution needs the clean keys/values: compute the state with keep_cache=True.")
    layers = sorted({int(x) for x in layers})
    chunk = int(max_query_tokens or DEFAULT_ATTRIBUTION_TOKENS)
    if chunk < 1:
        raise ValueError(f"max_query_tokens={max_query_tokens}: use at least 1 (or None for the default).")
    adapter = adapter_for(model)
    ctx = Context.build(model, state, describe(model), adapter)
    first = layers[0] - 1
    n = state.seq_len - 1
    targets = None
    if positions is not None:
        targets = [int(p) for p in positions]
        if not targets or any(not 0 <= p < n for p in targets):
            raise ValueError(f"positions must lie in 0..{n - 1} (a loss needs a next token); got {targets}.")
        n = len(targets)
    grads: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    devices = sorted(set(ctx.devices), key=str)
    lo = 0
    with mask_capable_attention(model, adapter), torch.enable_grad():
        while lo < n:
            hi = min(lo + chunk, n)
            try:
                found = _chunk_gradients(ctx, first, layers, lo, hi) if targets is None else \
                    _chunk_gradients(ctx, first, layers, lo, hi, targets=targets)
            except Exception as exc:  # out of memory: halve the chunk and retry it (nothing was kept)
                if not is_out_of_memory(exc) or hi - lo == 1:
                    raise
                release_memory(devices)
                chunk = max(1, (hi - lo) // 2)
                continue
            for layer, g in zip(layers, found):
                grads[layer].append(g)
            lo = hi
    return {layer: torch.cat(parts) for layer, parts in grads.items()}


def _chunk_gradients(ctx: Context, first: int, layers: list[int], lo: int, hi: int, *,
                     targets: list[int] | None = None) -> list[torch.Tensor]:
    """Own-loss gradients of positions ``lo..hi-1`` (of ``targets[lo:hi]`` when given) at ``layers``: one forward
    of those queries from the output of layer ``first`` (embeddings when -1) to the loss, one backward."""
    state, model = ctx.state, ctx.model
    device = ctx.devices[max(first, 0)]
    pos = torch.arange(lo, hi, device=device) if targets is None else \
        torch.tensor(targets[lo:hi], dtype=torch.long, device=device)
    if first >= 0:
        start_hidden = state.layer_out[first][pos.to(state.layer_out[first].device)]
    else:
        embed = model.get_input_embeddings()
        start_hidden = embed(state.input_ids[pos.to(state.input_ids.device)].to(execution_device(embed)))
    hidden = start_hidden.detach().clone().requires_grad_(True)
    outputs: dict[int, torch.Tensor] = {}
    block = torch.arange(len(pos), device=device)
    final, _ = run_queries(ctx, first, hidden.to(device), pos, pos, block, outputs=outputs)
    losses = _query_losses(ctx, final, state.input_ids[(pos + 1).to(state.input_ids.device)])
    found = torch.autograd.grad(losses.sum(), [outputs[layer] for layer in layers], allow_unused=True)
    return [torch.zeros_like(outputs[layer][0]) if g is None else g[0].detach() for layer, g in zip(layers, found)]


def _query_losses(ctx: Context, final: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[Q] cross-entropy of the query states, differentiable, computed in at least float32 (in float64 for a
    float64 model: the engine's float32 head would cap the tests' precision at 1e-7)."""
    norm = ctx.model.model.norm
    normed = norm(final.to(execution_device(norm)))
    logits = ctx.model.get_output_embeddings()(normed.to(ctx.head_device))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.nn.functional.cross_entropy(logits, targets.to(logits.device), reduction="none")


def estimates(model: nn.Module, state: CleanState, layer: int, grad: torch.Tensor, modes: Sequence[str], *,
              ctx: Context | None = None, positions: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """``{mode: [T-1, top_k] float64}``: ``g_t · δy_t(e, mode)`` for the expert in each routing slot of every
    position (``grad`` from :func:`own_loss_gradients` at ``layer``); with ``positions``, ``[len(positions), top_k]``
    for those (``grad`` from :func:`own_loss_gradients` with the same ``positions``)."""
    ctx = ctx or Context.build(model, state, describe(model), adapter_for(model))
    ls = state.moe[layer]
    top_k = ls.indices.shape[1]
    device = ls.indices.device
    wanted = torch.arange(state.seq_len - 1, device=device) if positions is None else \
        torch.tensor([int(p) for p in positions], dtype=torch.long, device=device)
    n = len(wanted)
    out = {m: np.zeros((n, top_k), dtype=np.float64) for m in modes}
    grad_rows = torch.arange(n, device=device).repeat_interleave(top_k)
    rows_pos = wanted.repeat_interleave(top_k)
    slots = torch.arange(top_k, device=device).repeat(n)
    with torch.no_grad():
        for lo in range(0, len(rows_pos), _ESTIMATE_ROWS):
            pos, slot = rows_pos[lo:lo + _ESTIMATE_ROWS], slots[lo:lo + _ESTIMATE_ROWS]
            grow = grad_rows[lo:lo + _ESTIMATE_ROWS]
            removed = torch.zeros(len(pos), ctx.desc.n_experts, dtype=torch.bool, device=device)
            removed[torch.arange(len(pos), device=device), ls.indices[pos, slot].long()] = True
            row = torch.arange(len(pos), device=device)
            g = grad[grow.to(grad.device)]
            for m in modes:
                delta = _chunk_deltas(ctx, layer, pos, row, removed, m)
                value = (delta.to(device=g.device, dtype=torch.float64) * g.double()).sum(-1)
                out[m].reshape(-1)[lo:lo + len(pos)] = value.cpu().numpy()
    return out


def attribute_sequence(model: nn.Module, input_ids: torch.Tensor, *, layers: Sequence[int] | None = None,
                       modes: Sequence[str] = ("zero",), max_query_tokens: int | None = None,
                       state: CleanState | None = None, seq_id: int = 0, doc_id: int | None = None) -> pd.DataFrame:
    """The attribution rows of one sequence (see :func:`attribute`)."""
    desc = describe(model)
    modes = _check_modes(modes)
    ids = check_input_ids(input_ids)
    layers = check_layers(layers, desc) or list(desc.moe_layers)
    if state is None:
        state = clean_state(model, ids, desc=desc, layers=layers, keep_cache=True)
    grads = own_loss_gradients(model, state, layers, max_query_tokens=max_query_tokens)
    ctx = Context.build(model, state, desc, adapter_for(model))
    losses = state.host_losses().astype(np.float64)
    n = state.seq_len - 1
    frames = []
    for layer in layers:
        indices, weights = state.moe[layer].host_routing()
        top_k = indices.shape[1]
        est = estimates(model, state, layer, grads[layer], modes, ctx=ctx)
        frame = pd.DataFrame({
            "seq_id": np.full(n * top_k, seq_id, dtype=np.int64),
            "doc_id": np.full(n * top_k, seq_id if doc_id is None else doc_id, dtype=np.int64),
            "position": np.repeat(np.arange(n, dtype=np.int64), top_k),
            "layer": np.full(n * top_k, layer, dtype=np.int64),
            "expert": indices[:n].reshape(-1).astype(np.int64),
            "slot": np.tile(np.arange(top_k, dtype=np.int64), n),
            "weight": weights[:n].reshape(-1).astype(np.float64),
            "clean_loss": np.repeat(losses, top_k),
            **{f"estimate_{m}": est[m].reshape(-1) for m in modes}})
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def attribute(model: nn.Module, sequences: Sequence, *, layers: Sequence[int] | None = None,
              modes: Sequence[str] = ("zero",), max_query_tokens: int | None = None) -> pd.DataFrame:
    """First-order estimates of every active expert's ΔL at every position: one row per (sequence, position,
    MoE layer, routed expert).

    ``estimate_<mode> = g_t · δy_t``: the gradient of position ``t``'s own loss with respect to the MoE block's
    output at ``t``, times the exact change of that output when the expert is removed in ``mode`` (see
    :mod:`moeaudit.intervene._attribution`). It estimates the engine's ``ΔL`` (:func:`moeaudit.ablate`) to first
    order only; how well it does is measured per layer by ``moeaudit attribute`` against exact ablations.

    Args:
        model: A transformers MoE causal LM of a supported family.
        sequences: :class:`moeaudit.CorpusSequence` objects (``doc_id`` is their ``doc_index``) or 1-D token
            tensors (``doc_id`` is their index).
        layers: MoE layers (default: all).
        modes: Ablation modes to estimate (``zero``, ``renormalize``, ``reroute``).
        max_query_tokens: Positions per forward/backward chunk (default :data:`DEFAULT_ATTRIBUTION_TOKENS`).

    Returns:
        Columns :data:`ATTRIBUTION_COLUMNS` then ``estimate_<mode>`` per mode. ``position`` is the token whose
        loss (predicting ``position + 1``) the row is about, as in :class:`moeaudit.Ablation`.
    """
    modes = _check_modes(modes)
    desc = describe(model)
    layers = check_layers(layers, desc) or list(desc.moe_layers)
    frames = []
    for i, seq in enumerate(sequences):
        ids = torch.as_tensor(getattr(seq, "input_ids", seq)).long()
        if ids.ndim != 1 or len(ids) < 2:
            raise ValueError(f"sequence {i} has shape {tuple(ids.shape)}; pass 1-D token sequences of at least "
                             "2 tokens (a loss needs a next token).")
        frames.append(attribute_sequence(model, ids, layers=layers, modes=modes, max_query_tokens=max_query_tokens,
                                         seq_id=i, doc_id=getattr(seq, "doc_index", i)))
    if not frames:
        raise ValueError("sequences is empty; pass at least one sequence.")
    return pd.concat(frames, ignore_index=True)


def attribution_importance(attribution: pd.DataFrame, modes: Sequence[str], n_experts: int) -> pd.DataFrame:
    """The attribution importance map: one row per (layer, expert, mode) with ``n_routed``, ``routed_share``
    (share of the layer's positions routing the expert), ``mean_estimate`` (over those positions) and
    ``attr_removal_cost`` = routed_share x mean_estimate (the estimated mean ΔL per position of removing the expert
    at every position, to first order; NaN for an expert never routed)."""
    out = []
    for layer, part in attribution.groupby("layer", sort=True):
        n_pos = part.groupby(["doc_id", "position"]).ngroups
        counts = part.groupby("expert").size().reindex(range(n_experts), fill_value=0)
        for mode in modes:
            sums = part.groupby("expert")[f"estimate_{mode}"].sum().reindex(range(n_experts))
            mean = sums / counts.replace(0, np.nan)
            out.append(pd.DataFrame({"layer": int(layer), "expert": np.arange(n_experts), "mode": mode,
                                     "n_routed": counts.to_numpy(np.int64), "routed_share": counts.to_numpy() / n_pos,
                                     "mean_estimate": mean.to_numpy(float),
                                     "attr_removal_cost": (sums / n_pos).where(counts > 0).to_numpy(float)}))
    return pd.concat(out, ignore_index=True)


#: The engine's modes attribution estimates (``mean`` replaces an expert by a constant, not linearised here).
_ATTRIBUTION_MODES: tuple[str, ...] = tuple(m for m in MODES if m != "mean")


def _check_modes(modes: Sequence[str]) -> tuple[str, ...]:
    if isinstance(modes, str):
        modes = (modes,)
    modes = tuple(modes)
    if not modes:
        raise ValueError(f"modes is empty; name at least one of {', '.join(_ATTRIBUTION_MODES)}.")
    for m in modes:
        check_choice("mode", m, _ATTRIBUTION_MODES)
    if len(set(modes)) < len(modes):
        raise ValueError(f"modes={','.join(modes)} repeats a mode; give each once.")
    return modes
