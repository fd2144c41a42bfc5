"""The naive engine: one full forward pass per ablation with the router's output overridden (the reference); in
``mean`` mode the removed experts' outputs are replaced by their means on the experts module instead."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moeaudit.intervene._means import ExpertMeans, replace_with_means
from moeaudit.intervene._routing import dense_weights, override_routing, removal_mask
from moeaudit.intervene._spec import Ablation, AblationResult
from moeaudit.intervene._state import capture_layer_outputs, clean_state, token_losses
from moeaudit.models import adapter_for, describe, router


@torch.no_grad()
def run_naive(model: nn.Module, input_ids: torch.Tensor, ablations: Sequence[Ablation], mode: str, *,
              means: ExpertMeans | None = None) -> list[AblationResult]:
    """Ablate by re-running the whole sequence once per ablation, intervening on the router of the layer (``mean``:
    on its experts module, with ``means``)."""
    adapter = adapter_for(model)
    desc = describe(model)
    state = clean_state(model, input_ids, desc=desc, layers=sorted({a.layer for a in ablations}),
                        keep_cache=False)
    ids = state.input_ids
    seq_len = state.seq_len
    last = desc.n_layers - 1
    results = []
    for ab in ablations:
        layer_state = state.moe[ab.layer]
        removed = torch.zeros(seq_len, desc.n_experts, dtype=torch.bool, device=ids.device)
        rows = [ab.position] if ab.scope == "token" else list(range(ab.position + 1))
        removed[rows] = removal_mask(ab.experts, desc.n_experts, ids.device)
        outs: list = []
        if mode == "mean":
            intervention = replace_with_means(model, ab.layer, removed, means.constants(ab.layer))
        else:
            intervention = override_routing(adapter, router(model, ab.layer, adapter), removed, mode)
        with intervention, capture_layer_outputs(model, outs):
            logits = model(input_ids=ids[None]).logits[0]
        t = ab.position
        clean_loss = float(state.losses[t])
        ablated_loss = float(token_losses(logits[t: t + 2], ids[t: t + 2])[0])
        old = dense_weights(layer_state.weights[t: t + 1], layer_state.indices[t: t + 1], desc.n_experts)[0]
        results.append(AblationResult(
            ablation=ab,
            clean_loss=clean_loss,
            ablated_loss=ablated_loss,
            delta_loss=ablated_loss - clean_loss,
            gap_norm=float((outs[ab.layer][t].float() - state.layer_out[ab.layer][t].float()).norm()),
            final_gap_norm=float((outs[last][t].float() - state.layer_out[last][t].float()).norm()),
            removed_weight=float(old[list(ab.experts)].sum()),
        ))
    return results
