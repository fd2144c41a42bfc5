"""Observational per-expert metrics of an MoE model over a corpus, in one streaming pass.

Every column but ``routed_count`` is a criterion of the registry (:mod:`moeaudit.observation._metric_registry`, re-exported
here: :func:`register_metric`, :data:`METRICS`, :class:`LayerBatch`): per-token criteria are computed on each
layer's :class:`LayerBatch` and reduced per expert by streaming moments; weight-only criteria read the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch
from torch import nn

from moeaudit.intervene._state import capture_layer_outputs, capture_moe
from moeaudit.models import MoEDescription, adapter_for, describe, moe_block
from moeaudit.models._describe import model_device
from moeaudit.observation._document_stats import DocumentStats, document_moments
from moeaudit.observation._metric_registry import (
    METRICS,
    OVER,
    REDUCTIONS,
    LayerBatch,
    Metric,
    register_builtins,
    register_metric,
    registered,
    unregister_metric,
)
from moeaudit.observation._weights import weight_only_values


def router_probabilities(family: str, logits: torch.Tensor) -> torch.Tensor:
    r"""[T, n_experts] float32 router probability of every expert from the pre-selection scores.

    - softmax routers (OLMoE, Qwen2/3-MoE, Mixtral, DeepSeek-V2): :math:`p = \mathrm{softmax}(z)`, the
      distribution the router takes its top-k from.
    - GPT-OSS takes top-k of the logits and a softmax over the chosen ones only, so it has no full distribution;
      we use :math:`\mathrm{softmax}(z)` over all logits (router bias included).
    - DeepSeek-V3 scores experts with sigmoids: :math:`p_e = \sigma(z_e) / \sum_j \sigma(z_j)` (without the
      ``e_score_correction_bias``, which only steers the choice).
    """
    z = logits.float()
    if family == "deepseek_v3":
        s = z.sigmoid()
        return s / s.sum(dim=-1, keepdim=True)
    return torch.softmax(z, dim=-1)


# ---- streaming moments (parallel Welford, Chan et al. 1979): state = (n, total, m2), each float64 [n_experts]

def _moments(values: torch.Tensor, groups: torch.Tensor | None, n_experts: int) -> tuple[torch.Tensor, ...]:
    v = values.double()
    if groups is None:  # dense [T, n_experts]: every token counts for every expert
        n = torch.full((n_experts,), float(v.shape[0]), dtype=torch.float64, device=v.device)
        total = v.sum(dim=0)
        return n, total, (v - total / n).pow(2).sum(dim=0)
    zeros = torch.zeros(n_experts, dtype=torch.float64, device=v.device)
    n = torch.bincount(groups, minlength=n_experts).double()
    total = zeros.index_add(0, groups, v)
    mean = total / n.clamp_min(1)
    return n, total, zeros.index_add(0, groups, (v - mean[groups]).pow(2))


def _merge(a: tuple[torch.Tensor, ...] | None, b: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    if a is None:
        return b
    (na, ta, ma), (nb, tb, mb) = a, b
    n = na + nb
    delta = tb / nb.clamp_min(1) - ta / na.clamp_min(1)
    return n, ta + tb, ma + mb + delta.pow(2) * na * nb / n.clamp_min(1)


def _reduce(state: tuple[torch.Tensor, ...], reduce: str) -> np.ndarray:
    n, total, m2 = (t.cpu().numpy() for t in state)
    with np.errstate(invalid="ignore", divide="ignore"):
        if reduce == "sum":
            return total
        if reduce == "mean":
            return np.where(n > 0, total / n, np.nan)
        return np.where(n > 1, np.sqrt(m2 / (n - 1)), np.nan)


# ---- input checks

def _check_layers(desc: MoEDescription, layers: Iterable[int] | None) -> list[int]:
    if layers is None:
        return list(desc.moe_layers)
    asked = [layers] if isinstance(layers, int) else list(layers)
    chosen = sorted({int(layer) for layer in asked})
    bad = [layer for layer in chosen if layer not in desc.moe_layers]
    if bad or not chosen:
        dense = f" ({', '.join(map(str, desc.dense_layers))} are dense)" if desc.dense_layers else ""
        raise ValueError(f"layers={bad or asked} are not MoE layers of this {desc.n_layers}-layer model; "
                         f"valid MoE layers: {list(desc.moe_layers)}{dense}.")
    return chosen


def _check_sequence(seq) -> torch.Tensor:
    ids = seq if isinstance(seq, torch.Tensor) else torch.as_tensor(seq)
    if ids.dim() != 1:
        raise ValueError(f"observe expects an iterable of 1-D token-id tensors, got a tensor of shape "
                         f"{tuple(ids.shape)}; pass 1-D sequences (e.g. iterate over the rows of a 2-D batch, "
                         "without padding).")
    if ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"token ids must be integers, got dtype {ids.dtype}.")
    if ids.numel() == 0:
        raise ValueError("observe got an empty sequence; every sequence needs at least one token.")
    return ids.long()


def _batches(sequences: Iterable, batch_size: int) -> Iterator[list[torch.Tensor]]:
    batch: list[torch.Tensor] = []
    for seq in sequences:
        batch.append(_check_sequence(seq))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---- the engine

def _one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[T] float64 ``1 - cos(a_t, b_t)`` (0 where either vector is zero)."""
    a, b = a.double(), b.double()
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    cos = (a * b).sum(dim=-1) / torch.where(norms > 0, norms, torch.ones_like(norms))
    return 1.0 - torch.where(norms > 0, cos, torch.ones_like(cos))


def _layer_batch(layer: int, slot: dict, layer_out: torch.Tensor, real: torch.Tensor | None, family: str,
                 experts: nn.Module, n_experts: int) -> LayerBatch:
    pick = (lambda t: t) if real is None else (lambda t: t[real])
    x, logits, weights, indices = pick(slot["x"]), pick(slot["logits"]), pick(slot["weights"]), pick(slot["indices"])
    moe_out = pick(slot["moe_out"]).double()
    post = pick(layer_out).double()
    pre = post - moe_out  # residual stream entering the MoE sub-layer
    n_tokens, top_k = indices.shape
    token = torch.arange(n_tokens, device=x.device).repeat_interleave(top_k)
    expert = indices.reshape(-1).long()
    # One experts call for all routed pairs: each pair's token row, a single index, weight 1 -> unweighted output.
    ones = torch.ones(token.shape[0], 1, dtype=x.dtype, device=x.device)
    output = experts(x[token], expert[:, None], ones)
    weight = weights.reshape(-1).double()
    routed_out = torch.zeros_like(moe_out).index_add_(0, token, output.double() * weight[:, None])
    routed = torch.zeros(n_tokens, n_experts, dtype=torch.float32, device=x.device).scatter_(1, indices.long(), 1.0)
    return LayerBatch(
        layer=layer, n_experts=n_experts, token=token, expert=expert, weight=weight,
        output=output, output_norm=output.double().norm(dim=-1), x=x, logits=logits,
        router_probs=router_probabilities(family, logits), routed=routed,
        moe_change=_one_minus_cos(pre, post), routed_change=_one_minus_cos(pre, pre + routed_out),
    )


@torch.no_grad()
def observe(model: nn.Module, sequences: Iterable[torch.Tensor], *, layers: Iterable[int] | None = None,
            batch_size: int = 1, metrics: Iterable[str] | None = None,
            progress: Callable[[int], None] | None = None, per_document: bool = False) -> pd.DataFrame:
    r"""Per-expert observational metrics over a corpus, in one streaming pass.

    Every sequence runs once through ``model`` with scoped hooks on all requested MoE layers. Statistics are
    streamed per (layer, expert) (sums and parallel-Welford moments), so memory is O(layers x experts), never
    O(tokens). Only real tokens count: with ``batch_size > 1`` sequences are right-padded and the pads masked out.

    Notation, for MoE layer l over the corpus's N real tokens t: :math:`A_e` the tokens whose top-k contains
    expert e, :math:`n_e = |A_e|`, :math:`g_e(t)` the router's returned weight multiplying expert e's output
    (after the model's renormalisation / routed scaling), :math:`a_e(t) = \lVert E_e(x_t) \rVert_2` the L2 norm
    of the expert's *unweighted* output, :math:`p_e(t)` the router probability (:func:`router_probabilities`),
    :math:`h_t` the residual stream entering the MoE sub-layer, :math:`r_t = \sum_{j} g_j(t) E_j(x_t)` the routed
    experts' output and :math:`m_t` the whole MoE output (shared experts included). Each criterion's published
    source and any departure from it are in :mod:`moeaudit.observation._criteria` (and in :data:`METRICS`).

    - ``routed_count`` :math:`n_e`; ``utilization_rate`` :math:`n_e / N` (top-k membership, not raw logits).
    - ``mean_routing_weight_when_active`` :math:`\frac{1}{n_e}\sum_{A_e} g_e(t)` (NaN when :math:`n_e = 0`).
    - ``activation_norm`` :math:`\bar a_e = \frac{1}{n_e}\sum_{A_e} a_e(t)`; ``activation_std`` its sample
      standard deviation :math:`\sqrt{\frac{1}{n_e-1}\sum_{A_e}(a_e(t)-\bar a_e)^2}` (ddof=1; NaN when
      :math:`n_e < 2`).
    - ``soft_utilization`` :math:`\frac{1}{N}\sum_t p_e(t)` (sums to 1 over a layer's experts).
    - ``reap`` :math:`\frac{1}{n_e}\sum_{A_e} g_e(t)\,a_e(t)` (REAP, Lasby et al. 2025).
    - ``frequency_weighted`` :math:`\sum_{A_e} g_e(t)`; ``ean`` :math:`\sum_{A_e} a_e(t)` (EAN);
      ``msan`` :math:`\frac{1}{n_e}\sum_{A_e} a_e(t)^2`.
    - ``easy_ep`` :math:`\sum_{A_e} g_e(t)\,a_e(t)\,\max(1-\cos(h_t, h_t + r_t), 0)` (EASY-EP, Dong et al.
      2025: a sum over tokens, the cosine with the routed output only); ``easy_ep_mean`` moeaudit's variant
      :math:`\frac{1}{n_e}\sum_{A_e} g_e(t)\,a_e(t)\,(1-\cos(h_t, h_t + m_t))`. Both cosines in float64.
    - weight-only: ``router_norm`` :math:`\lVert W^{r}_{e,:}\rVert_2`; ``weight_norm`` the Frobenius norm of
      all the expert's parameters (biases included); ``stable_rank`` :math:`\lVert W^{down}_e\rVert_F^2 /
      \lVert W^{down}_e\rVert_2^2`.

    Args:
        model: A transformers MoE causal LM of a supported family.
        sequences: Iterable (a generator is fine; consumed once) of 1-D integer token-id tensors, unpadded.
        layers: MoE layers to observe; default all of ``describe(model).moe_layers``.
        batch_size: Sequences per forward (right-padded, pads masked out of every statistic).
        metrics: Names of registered metrics to compute (default all, see :data:`METRICS`).
        progress: Called with the number of sequences processed after each batch.
        per_document: Return per-document sufficient statistics instead
            (:class:`~moeaudit.observation._document_stats.DocumentStats`), whose ``table(documents)`` equals this function
            run on those documents alone (to floating-point summation order), for half-splits without re-running
            the model.

    Returns:
        table (pandas.DataFrame | DocumentStats): One row per (layer, expert): ``layer, expert, routed_count``
            (int64), then one float64 column per metric in registration order (with ``per_document``: a
            ``DocumentStats``).

    Raises:
        ValueError: no sequence, a sequence that is not 1-D / not integer / empty, layers that are not MoE layers,
            an unknown metric name, or ``batch_size < 1``.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size!r} is not valid; use an integer >= 1.")
    desc = describe(model)
    adapter = adapter_for(model)
    chosen_layers = _check_layers(desc, layers)
    chosen = registered(metrics)
    per_token = [m for m in chosen if m.per_token is not None]
    device, n_experts = model_device(model), desc.n_experts
    pad_id = getattr(model.config, "pad_token_id", None) or 0
    experts = {layer: moe_block(model, layer).experts for layer in chosen_layers}
    counts = {layer: torch.zeros(n_experts, dtype=torch.int64, device=device) for layer in chosen_layers}
    state: dict[tuple[int, str], tuple[torch.Tensor, ...] | None] = {}
    doc_state: dict[tuple[int, str], list] = {}
    doc_counts: dict[int, list[np.ndarray]] = {layer: [] for layer in chosen_layers}
    n_sequences = 0
    for batch in _batches(sequences, int(batch_size)):
        lengths = torch.tensor([len(s) for s in batch])
        ids = torch.full((len(batch), int(lengths.max())), pad_id, dtype=torch.long)
        for i, seq in enumerate(batch):
            ids[i, : len(seq)] = seq
        mask = torch.arange(ids.shape[1])[None] < lengths[:, None]  # [B, T] True at real tokens
        moe: dict = {}
        outs: list = []
        with capture_moe(model, chosen_layers, adapter, moe), capture_layer_outputs(model, outs):
            if len(batch) == 1:  # exactly a plain forward of the sequence
                model(input_ids=ids.to(device))
            else:
                model(input_ids=ids.to(device), attention_mask=mask.long().to(device))
        real = None if len(batch) == 1 else mask.reshape(-1).to(device)
        token_doc = torch.arange(len(batch)).repeat_interleave(lengths).to(device)  # document of each real token
        for layer in chosen_layers:
            here = outs[layer].device  # the layer's own device (a device_map spreads layers over several)
            lb = _layer_batch(layer, moe[layer], outs[layer], None if real is None else real.to(here), desc.family,
                              experts[layer], n_experts)
            counts[layer] += torch.bincount(lb.expert, minlength=n_experts).to(device)
            if per_document:
                pair_doc = token_doc.to(here)[lb.token]
                doc_counts[layer].append(torch.bincount(pair_doc * n_experts + lb.expert, minlength=len(batch) *
                                                        n_experts).reshape(len(batch), n_experts).cpu().numpy())
            for m in per_token:
                values = m.per_token(lb)
                groups = lb.expert if m.over == "routed" else None
                if per_document:
                    doc_state.setdefault((layer, m.name), []).append(document_moments(
                        values, groups, pair_doc if groups is not None else token_doc.to(here), len(batch),
                        n_experts))
                else:
                    state[layer, m.name] = _merge(state.get((layer, m.name)), _moments(values, groups, n_experts))
        n_sequences += len(batch)
        if progress is not None:
            progress(n_sequences)
    if n_sequences == 0:
        raise ValueError("observe got no sequences; pass a non-empty iterable of 1-D token-id tensors.")
    if per_document:
        return DocumentStats.from_observation(model, chosen_layers, n_experts, doc_counts, doc_state, chosen)
    return _frame(model, chosen_layers, n_experts, counts, state, chosen)


def _frame(model: nn.Module, layers: list[int], n_experts: int, counts: dict, state: dict,
           chosen: list[Metric]) -> pd.DataFrame:
    columns: dict[str, np.ndarray] = {
        "layer": np.repeat(np.asarray(layers, dtype=np.int64), n_experts),
        "expert": np.tile(np.arange(n_experts, dtype=np.int64), len(layers)),
        "routed_count": np.concatenate([counts[layer].cpu().numpy() for layer in layers]).astype(np.int64),
    }
    for m in chosen:
        if m.per_token is not None:
            values = [_reduce(state[layer, m.name], m.reduce) for layer in layers]
        else:
            values = [weight_only_values(m, model, layer, n_experts) for layer in layers]
            if any(v.shape != (n_experts,) for v in values):
                raise ValueError(f"weight-only metric {m.name!r} must return one value per expert "
                                 f"({n_experts}), got shapes {[v.shape for v in values]}.")
        columns[m.name] = np.concatenate(values).astype(np.float64)
    return pd.DataFrame(columns)


BUILTIN_METRICS = register_builtins()

__all__ = ["BUILTIN_METRICS", "METRICS", "OVER", "REDUCTIONS", "LayerBatch", "Metric", "observe", "register_metric",
           "router_probabilities", "unregister_metric", "weight_only_values"]
