"""Weight-only expert criteria: pure functions of a model's router and expert parameters (no data, no forward)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from moeaudit.models import decoder_layers, materialized, moe_block, router


def expert_parameters(model: nn.Module, layer: int, expert: int) -> list[torch.Tensor]:
    """The slices of the fused expert tensors that belong to ``expert`` at MoE layer ``layer``.

    Every parameter of the experts module whose leading dimension is the number of experts is sliced
    (``gate_up_proj[e]``, ``down_proj[e]``, and for GPT-OSS ``gate_up_proj_bias[e]``, ``down_proj_bias[e]``).
    """
    experts = moe_block(model, layer).experts
    n_experts = int(experts.num_experts)
    return [p[expert] for p in experts.parameters() if p.dim() >= 1 and p.shape[0] == n_experts]


@torch.no_grad()
def router_norm(model: nn.Module, layer: int, experts: Sequence[int]) -> np.ndarray:
    r"""L2 norm of each expert's router row.

    .. math:: \mathrm{router\_norm}_e = \lVert W^{\mathrm{router}}_{e,:} \rVert_2

    The router bias (GPT-OSS) and DeepSeek-V3's ``e_score_correction_bias`` are not part of the row.
    """
    weight = router(model, layer).weight.detach().float()
    return weight[list(experts)].norm(dim=-1).double().cpu().numpy()


@torch.no_grad()
def weight_norm(model: nn.Module, layer: int, experts: Sequence[int]) -> np.ndarray:
    r"""Frobenius norm of all of an expert's parameters taken together.

    .. math:: \mathrm{weight\_norm}_e = \Big(\sum_{P \in \mathrm{params}(e)} \lVert P \rVert_F^2\Big)^{1/2}

    ``params(e)`` are the slices of :func:`expert_parameters` (gate/up and down projections, plus biases).
    """
    out = []
    for e in experts:
        squares = sum(float(p.detach().double().pow(2).sum()) for p in expert_parameters(model, layer, e))
        out.append(np.sqrt(squares))
    return np.asarray(out, dtype=np.float64)


@torch.no_grad()
def stable_rank(model: nn.Module, layer: int, experts: Sequence[int]) -> np.ndarray:
    r"""Stable rank of each expert's down projection.

    .. math:: \mathrm{stable\_rank}(W) = \lVert W \rVert_F^2 / \lVert W \rVert_2^2 = \sum_i \sigma_i^2 / \sigma_1^2

    computed in float32 from the singular values (orientation-free: GPT-OSS stores ``down_proj`` transposed).
    """
    down = moe_block(model, layer).experts.down_proj.detach()[list(experts)].float()  # [n, ., .]
    sigma = torch.linalg.svdvals(down)  # [n, min(d_in, d_out)], descending
    return (sigma.pow(2).sum(dim=-1) / sigma[:, 0].pow(2)).double().cpu().numpy()


def weight_only_values(metric: Any, model: nn.Module, layer: int, n_experts: int) -> np.ndarray:
    """A weight-only metric of every expert of ``layer`` (float64, one per expert), with weights that accelerate
    offloaded brought to the layer's device for the call (``metric``: a registered
    :class:`~moeaudit.observation._metric_registry.Metric` with a ``weight_only`` function)."""
    with materialized(decoder_layers(model)[layer]):
        return np.asarray(metric.weight_only(model, layer, list(range(n_experts))), dtype=np.float64).reshape(-1)
