"""Ablation semantics on router outputs: the three modes, dense weights, and the scoped router hook."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from moeaudit.models import FamilyAdapter


def apply_mode(
    adapter: FamilyAdapter,
    router: nn.Module,
    logits: torch.Tensor,  # [rows, n_experts] the router's pre-selection scores
    weights: torch.Tensor,  # [rows, top_k] the router's weights
    indices: torch.Tensor,  # [rows, top_k] the router's chosen experts
    removed: torch.Tensor,  # [rows, n_experts] bool: experts asked to be removed at each row
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New ``(weights, indices)`` for rows where some experts are removed.

    Only experts that are routed at a row are removed there; a row whose routed experts are all kept is returned
    unchanged bit for bit, in every mode.

    - ``zero``: removed experts' weights become 0; every other weight stays as the router computed it.
    - ``renormalize``: the remaining weights are rescaled to the original top-k weight sum (when every routed
      expert is removed there is nothing left to rescale and the row's weights are all 0, as in ``zero``).
    - ``reroute``: the removed experts leave the candidates and the family's own rule picks top-k from the rest.
    """
    routed_removed = removed.gather(1, indices)  # [rows, top_k]
    if mode == "zero":
        return weights.masked_fill(routed_removed, 0), indices
    if mode == "renormalize":
        kept = weights.float().masked_fill(routed_removed, 0.0)
        old_sum = weights.float().sum(dim=-1, keepdim=True)
        new_sum = kept.sum(dim=-1, keepdim=True)
        scale = torch.where(new_sum > 0, old_sum / new_sum.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        changed = routed_removed.any(dim=-1, keepdim=True)
        return torch.where(changed, (kept * scale).to(weights.dtype), weights), indices
    if mode == "reroute":
        effective = torch.zeros_like(removed)
        effective.scatter_(1, indices, routed_removed)
        new_weights, new_indices = adapter.select(router, logits, effective)
        changed = routed_removed.any(dim=-1, keepdim=True)
        return (torch.where(changed, new_weights.to(weights.dtype), weights),
                torch.where(changed, new_indices.to(indices.dtype), indices))
    raise ValueError(f"mode={mode!r} is not valid; choose one of zero, renormalize, reroute.")


def dense_weights(weights: torch.Tensor, indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Scatter top-k ``weights`` [rows, top_k] into a float32 [rows, n_experts] matrix (0 for unrouted experts)."""
    out = torch.zeros(weights.shape[0], n_experts, dtype=torch.float32, device=weights.device)
    return out.scatter_add_(1, indices.long(), weights.float())


def removal_mask(experts: tuple[int, ...], n_experts: int, device: torch.device) -> torch.Tensor:
    """Bool [n_experts] with True at ``experts``."""
    mask = torch.zeros(n_experts, dtype=torch.bool, device=device)
    mask[list(experts)] = True
    return mask


@contextmanager
def override_routing(
    adapter: FamilyAdapter, router: nn.Module, removed: torch.Tensor, mode: str
) -> Iterator[None]:
    """Within the block, ``router`` removes experts per row (``removed`` [tokens, n_experts]) in ``mode``.

    The hook is removed in ``finally``, so the model is clean after any exception.
    """

    def hook(module: nn.Module, args: tuple, output: tuple) -> tuple:
        logits, weights, indices = output
        if removed.shape[0] != logits.shape[0]:
            raise RuntimeError(f"routing override expected {removed.shape[0]} tokens, the router saw "
                               f"{logits.shape[0]}")
        # Under a device map the router may live on another device than the one the mask was built on.
        new_weights, new_indices = apply_mode(adapter, module, logits, weights, indices,
                                              removed.to(logits.device), mode)
        return (logits, new_weights, new_indices, *output[3:])

    handle = router.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
