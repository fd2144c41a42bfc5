"""In-memory pruning: a scoped router hook per MoE layer that removes experts for every token."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from moeaudit.models import adapter_for, router
from moeaudit.pruning._plan import Removal, prune_geometry, removal_masks


@contextmanager
def pruned(model: nn.Module, removed: Removal) -> Iterator[nn.Module]:
    """Within the block, the routers of ``model`` can no longer select the ``removed`` experts.

    At every layer of ``removed`` the family's own routing rule (``adapter.select``) runs on the router's scores
    with the removed experts taken out of the candidates for every token: scores over the remaining experts only
    (a softmax renormalises over them), top-k from the remaining, exactly what a checkpoint with those experts
    deleted computes (tested against :func:`moeaudit.pruning.slice_experts` on every family). Shared experts are
    not routed and stay. The hooks are removed in ``finally``, so the model is clean after any exception.

    Args:
        model: A transformers MoE causal LM.
        removed: MoE layer -> experts to remove there (original expert ids).

    Raises:
        ValueError: see :func:`moeaudit.pruning.removal_masks`.
    """
    adapter = adapter_for(model)
    masks = removal_masks(prune_geometry(model), removed)
    with ExitStack() as stack:
        for layer, mask in masks.items():
            if not bool(mask.any()):
                continue

            def hook(module: nn.Module, args: tuple, output: tuple, mask: torch.Tensor = mask) -> tuple:
                logits, weights, indices = output[:3]
                rows = mask.to(logits.device).expand(logits.shape[0], -1)
                new_weights, new_indices = adapter.select(module, logits, rows)
                return (logits, new_weights.to(weights.dtype), new_indices.to(indices.dtype), *output[3:])

            stack.callback(router(model, layer, adapter).register_forward_hook(hook).remove)
        yield model
