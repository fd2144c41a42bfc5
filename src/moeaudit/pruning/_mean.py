"""Mean replacement (MoNE's constant "novice"): a removed expert keeps its router slot and outputs its mean.

At every token, wherever the router chooses a replaced expert e with weight w_e, the MoE block adds w_e * c_e instead
of w_e * E_e(x): the router, its choices and weights, the other experts and the shared experts are unchanged. c_e is
the mean of E_e(x) (before the routing weight) over the calibration tokens the *unpruned* model routes to e
(:func:`moeaudit.intervene.expert_means`). Experts that no calibration token is routed to have no mean; they output
0 (their contribution is dropped, as MoNE's zero-initialised running mean does) and :func:`unrouted_replaced`
names them.

Compared with MoNE's published implementation (zxgx/mode-pd, ``modepd/pruning/expert_prune.py``,
``expert_prune_by_mone``): the same estimand (a per-expert running mean of the expert module's output over the
tokens dispatched to it, collected by forward hooks on the unpruned model, loaded into a constant-output module
that the router's weight still multiplies). Departures: (1) every family moeaudit supports, not DeepSeek only; (2)
sums in float64 (MoNE keeps a float32 running average); (3) the experts to replace are chosen by any criterion of the
run (MoNE ranks by routing score or output fluctuation); (4) the replacement is a scoped hook, not a rewritten
checkpoint: saving a mean-replaced model is not offered (a standard transformers config has no constant expert);
(5) MoNE's hook averages ``_output[0]`` of each expert module's
output: the whole [tokens, d_model] output only if their modelling file's expert MLP returns a tuple (not checked
here; for a plain tensor it would be the first dispatched token of each call); moeaudit averages every dispatched
token.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from moeaudit.intervene import ExpertMeans, check_layers, replace_with_means
from moeaudit.models import describe
from moeaudit.pruning._plan import Removal

#: How a prune-eval removes an expert: ``delete`` (the router can no longer choose it; a sliced checkpoint) or
#: ``mean`` (it keeps its router slot and outputs its calibration mean, times its routing weight).
METHODS: tuple[str, ...] = ("delete", "mean")
DELETE, MEAN = METHODS


def _checked(model: nn.Module, removed: Removal) -> dict[int, list[int]]:
    desc = describe(model)
    out = {}
    for layer, experts in removed.items():
        layer = check_layers([layer], desc)[0]
        ids = sorted({int(e) for e in experts})
        bad = [e for e in ids if not 0 <= e < desc.n_experts]
        if bad:
            raise ValueError(f"experts {bad} at layer {layer} are out of range; routed experts are "
                             f"0..{desc.n_experts - 1} (shared experts are never replaced).")
        out[layer] = ids
    return out


def unrouted_replaced(means: ExpertMeans, removed: Removal) -> dict[int, list[int]]:
    """Per layer, the replaced experts without a mean (no calibration token routed to them): they output 0."""
    out = {}
    for layer, experts in removed.items():
        missing = sorted(set(int(e) for e in experts) & set(means.unrouted(int(layer))))
        if missing:
            out[int(layer)] = missing
    return out


@contextmanager
def mean_replaced(model: nn.Module, removed: Removal, means: ExpertMeans) -> Iterator[nn.Module]:
    """Within the block, each expert in ``removed`` outputs its mean ``c_e`` (times its routing weight) at every
    token, at every layer of ``removed`` (see the module docstring). The hooks are removed in ``finally``, so the
    model is clean after any exception.

    Args:
        model: A transformers MoE causal LM.
        removed: MoE layer -> experts to replace there (original ids).
        means: :func:`moeaudit.intervene.expert_means` of the unpruned model on the calibration documents.

    Raises:
        ValueError: a layer that is not an MoE layer, an expert id out of range, or means of another model.
    """
    checked = _checked(model, removed)
    if not isinstance(means, ExpertMeans):
        raise ValueError(f"means must be an ExpertMeans (moeaudit.expert_means), got {type(means).__name__}.")
    means.check(model, sorted(checked))
    n_experts = describe(model).n_experts
    with ExitStack() as stack:
        for layer, experts in checked.items():
            if not experts:
                continue
            mask = torch.zeros(n_experts, dtype=torch.bool)
            mask[experts] = True
            stack.enter_context(replace_with_means(model, layer, mask, means.constants(layer, unrouted=0.0)))
        yield model
