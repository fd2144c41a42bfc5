"""Mean ablation: each routed expert's mean output c_e, and the scoped hook that puts w_e * c_e in place of
w_e * E_e(x) (the ``mean`` ablation mode of both engines, and mean replacement in pruning).

**Definition.** For MoE layer ``l`` and routed expert ``e``,

    c_e = (1 / N_e) * sum over tokens t routed to e of E_e(x_t),

where ``x_t`` is the MoE block's input, ``E_e(x)`` the expert's output *before* the router weight (the fused experts
module called with index ``[[e]]`` and weight ``[[1]]``), and "routed to e" means ``e`` is among the router's top-k
choices at ``t`` (``N_e`` such tokens). Replacing the expert by its mean at a token where the router chose it with
weight ``w_e`` changes the MoE block's output by ``w_e * (c_e - E_e(x_t))``: the router, the other experts and the
shared experts are untouched (shared experts are never replaced: they are not routed). The mean is the constant
that minimises the expected squared error of the replaced output over the tokens the expert serves (mean ablation,
the interpretability literature's standard beside zero ablation; MoNE's "novice" in pruning, Zhang et al. 2025,
arXiv:2507.00390).

**Experts never routed** in the corpus the means were computed on have no mean (``n_routed == 0``; their row of
:attr:`ExpertMeans.means` is NaN). The ablation engines refuse an ablation that names such an expert (the run
pipeline computes the means over every document it ablates, so this cannot happen there); pruning's mean
replacement uses 0 for them (the expert's contribution is dropped, as MoNE's zero-initialised running mean does)
and says how many there were.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from moeaudit.models import adapter_for, describe, model_device, moe_block

#: Columns of :meth:`ExpertMeans.to_frame` (``expert_means.parquet``): ``mean`` holds the d_model values of c_e.
MEAN_COLUMNS: tuple[str, ...] = ("layer", "expert", "n_routed", "mean")


@dataclass(frozen=True, eq=False)
class ExpertMeans:
    """Every routed expert's mean output c_e on one corpus (see the module docstring).

    Attributes:
        means: MoE layer -> float64 [n_experts, d_model] (CPU); NaN rows for experts never routed.
        counts: MoE layer -> int64 [n_experts] tokens routed to each expert (N_e).
    """

    means: Mapping[int, torch.Tensor]
    counts: Mapping[int, np.ndarray]

    @property
    def layers(self) -> list[int]:
        return sorted(self.means)

    def unrouted(self, layer: int) -> list[int]:
        """Experts of ``layer`` with no mean (never routed in the corpus)."""
        return [int(e) for e in np.flatnonzero(np.asarray(self.counts[layer]) == 0)]

    def constants(self, layer: int, *, device=None, dtype: torch.dtype = torch.float64,
                  unrouted: float = float("nan")) -> torch.Tensor:
        """[n_experts, d_model] c_e of ``layer`` (rows of never-routed experts set to ``unrouted``)."""
        c = self.means[layer].clone()
        c[torch.from_numpy(np.asarray(self.counts[layer]) == 0)] = unrouted
        return c.to(device=device, dtype=dtype)

    def check(self, model: nn.Module, layers: Sequence[int] | None = None) -> None:
        """Refuse means that do not fit ``model`` (expert count, d_model) or lack a layer of ``layers``."""
        desc = describe(model)
        for layer in layers if layers is not None else desc.moe_layers:
            if layer not in self.means:
                raise ValueError(f"the expert means hold layers {self.layers}, not layer {layer}; compute them with "
                                 "moeaudit.expert_means(model, sequences) over every MoE layer the run ablates.")
            shape = tuple(self.means[layer].shape)
            if shape != (desc.n_experts, desc.d_model):
                raise ValueError(f"the expert means of layer {layer} have shape {shape}, but the model has "
                                 f"{desc.n_experts} experts of d_model {desc.d_model}: they were computed on another "
                                 "model. Recompute them with moeaudit.expert_means on this model.")

    def require(self, layer: int, experts: Sequence[int]) -> None:
        """Refuse experts of ``layer`` that have no mean (an ablation naming them could not replace them)."""
        missing = sorted(set(int(e) for e in experts) & set(self.unrouted(layer)))
        if missing:
            raise ValueError(
                f"mode='mean': expert(s) {missing} of layer {layer} were never routed in the corpus the means were "
                "computed on, so their mean output c_e is undefined. Compute the means over a corpus that includes "
                "the ablated documents (moeaudit.expert_means(model, sequences)), or ablate other experts.")

    def to_frame(self) -> pd.DataFrame:
        """One row per (layer, expert): ``n_routed`` and ``mean`` (list of d_model float64; NaN when unrouted)."""
        rows = [(layer, e, int(self.counts[layer][e]), self.means[layer][e].tolist())
                for layer in self.layers for e in range(self.means[layer].shape[0])]
        return pd.DataFrame(rows, columns=list(MEAN_COLUMNS))

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> ExpertMeans:
        """Inverse of :meth:`to_frame`."""
        missing = [c for c in MEAN_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"an expert-means table needs columns {list(MEAN_COLUMNS)}; missing {missing}.")
        means, counts = {}, {}
        for layer, sub in frame.sort_values(["layer", "expert"]).groupby("layer"):
            if sub["expert"].tolist() != list(range(len(sub))):
                raise ValueError(f"the expert-means table lists experts {sub['expert'].tolist()} at layer {layer}; "
                                 "expected 0..E-1 once each.")
            means[int(layer)] = torch.tensor(np.stack([np.asarray(m, dtype=np.float64) for m in sub["mean"]]))
            counts[int(layer)] = sub["n_routed"].to_numpy(dtype=np.int64)
        return cls(means, counts)


@torch.no_grad()
def expert_means(model: nn.Module, sequences: Sequence, *, layers: Sequence[int] | None = None,
                 progress: Callable[[int], None] | None = None) -> ExpertMeans:
    """c_e of every routed expert of ``layers`` (default: every MoE layer) over ``sequences`` (one plain forward
    each; sums in float64).

    Args:
        model: A transformers MoE causal LM (unmodified: no pruning or ablation hooks).
        sequences: Unpadded token sequences (``CorpusSequence`` objects or 1-D tensors).
        layers: MoE layers whose means to compute.
        progress: Called with 1 after each sequence.
    """
    from moeaudit.intervene._spec import check_layers
    from moeaudit.intervene._state import capture_moe

    adapter = adapter_for(model)
    desc = describe(model)
    layers = check_layers(layers, desc) or list(desc.moe_layers)
    device = model_device(model)
    sums = {layer: torch.zeros(desc.n_experts, desc.d_model, dtype=torch.float64) for layer in layers}
    counts = {layer: np.zeros(desc.n_experts, dtype=np.int64) for layer in layers}
    for seq in sequences:
        ids = torch.as_tensor(getattr(seq, "input_ids", seq)).long().to(device)
        store: dict = {}
        with capture_moe(model, layers, adapter, store):
            model(input_ids=ids[None])
        for layer in layers:
            x, indices = store[layer]["x"], store[layer]["indices"]
            experts = moe_block(model, layer).experts
            ones = torch.ones(x.shape[0], 1, dtype=store[layer]["weights"].dtype, device=x.device)
            for slot in range(indices.shape[1]):  # one call per top-k slot: E_{i_t}(x_t) for every token t
                chosen = indices[:, slot: slot + 1]
                out = experts(x, chosen, ones).double().cpu()
                sums[layer].index_add_(0, chosen[:, 0].cpu(), out)
                counts[layer] += np.bincount(chosen[:, 0].cpu().numpy(), minlength=desc.n_experts)
        if progress is not None:
            progress(1)
    means = {}
    for layer in layers:
        n = torch.from_numpy(counts[layer]).double()[:, None]
        means[layer] = torch.where(n > 0, sums[layer] / n.clamp_min(1), torch.full_like(sums[layer], float("nan")))
    return ExpertMeans(means, counts)


_WEIGHT_KWARGS = ("top_k_weights", "routing_weights")
_INDEX_KWARGS = ("top_k_index", "router_indices")


def _argument(args: tuple, kwargs: dict, position: int, names: tuple[str, ...]):
    if len(args) > position:
        return args[position], None
    for name in names:
        if name in kwargs:
            return kwargs[name], name
    raise RuntimeError(f"the experts module was called without its routing argument #{position} ({names}); "
                       "moeaudit expects experts(hidden_states, top_k_index, top_k_weights).")


@contextmanager
def replace_with_means(model: nn.Module, layer: int, removed: torch.Tensor, constants: torch.Tensor
                       ) -> Iterator[None]:
    """Within the block, at MoE layer ``layer`` every routed expert marked in ``removed`` outputs its constant:
    where the router chose expert e with weight w_e at row t and ``removed[t, e]`` (or ``removed[e]`` for every row),
    the experts module's output is sum over kept e of w_e E_e(x_t) + sum over removed e of w_e c_e.

    Implemented on the fused experts module: a pre-hook gives the removed experts weight 0 (the router's outputs,
    and so the routing, are unchanged) and a hook adds ``w_e * c_e`` with the original weights. Both are removed in
    ``finally``.

    Args:
        model: A transformers MoE causal LM.
        layer: The MoE layer.
        removed: bool [rows, n_experts] (one row per token of the forward) or [n_experts] (every token).
        constants: [n_experts, d_model] c_e (rows of experts never removed are not read; give them any finite value).
    """
    experts = moe_block(model, layer).experts
    n_experts = constants.shape[0]
    stash: dict = {}

    def pre(module, args, kwargs):
        indices, _ = _argument(args, kwargs, 1, _INDEX_KWARGS)
        weights, name = _argument(args, kwargs, 2, _WEIGHT_KWARGS)
        mask = removed.to(indices.device)
        rows = mask.expand(indices.shape[0], -1) if mask.dim() == 1 else mask
        if rows.shape != (indices.shape[0], n_experts):
            raise RuntimeError(f"mean replacement at layer {layer} expected {rows.shape[0]} tokens, the experts "
                               f"module saw {indices.shape[0]}")
        hit = rows.gather(1, indices.long())  # [rows, top_k] routed and removed
        stash["dense"] = torch.zeros(indices.shape[0], n_experts, dtype=torch.float64, device=indices.device
                                     ).scatter_add_(1, indices.long(), weights.double().masked_fill(~hit, 0.0))
        new_weights = weights.masked_fill(hit, 0)
        if name is None:
            return (*args[:2], new_weights, *args[3:]), kwargs
        return args, {**kwargs, name: new_weights}

    def post(module, args, output):
        dense = stash.pop("dense")
        added = dense @ torch.nan_to_num(constants.to(device=dense.device, dtype=torch.float64))
        return output + added.to(device=output.device, dtype=output.dtype)

    with ExitStack() as stack:
        stack.callback(experts.register_forward_pre_hook(pre, with_kwargs=True).remove)
        stack.callback(experts.register_forward_hook(post).remove)
        yield
