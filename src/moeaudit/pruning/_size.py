"""What a pruning saves: parameters and bytes removed, read from the shapes of the tensors a slice drops.

For ``delete`` every expert-indexed tensor of the router (its weight rows, GPT-OSS's bias, DeepSeek-V3's
``e_score_correction_bias``) and of the fused experts module (``gate_up_proj``, ``down_proj``, GPT-OSS's biases)
loses one slice per removed expert, exactly what :func:`moeaudit.pruning.slice_experts` drops (tested against a
sliced model). ``mean`` keeps the router rows and adds one d_model constant per replaced expert (stored in the
model's dtype), so it removes the expert slices minus d_model values each. Shared experts are never removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import pandas as pd
from torch import nn

from moeaudit.models import adapter_for, describe, moe_block
from moeaudit.pruning._plan import Removal

#: Columns of :func:`size_table` (``sizes.csv``).
SIZE_COLUMNS: tuple[str, ...] = ("fraction", "method", "experts_removed", "params_removed", "bytes_removed",
                                 "params_total", "bytes_total", "share_params_removed")


@dataclass(frozen=True)
class PrunedSize:
    """Parameters (and persistent buffers) and bytes a pruning removes, and the model's totals."""

    experts_removed: int
    params_removed: int
    bytes_removed: int
    params_total: int
    bytes_total: int

    @property
    def share_params_removed(self) -> float:
        return self.params_removed / self.params_total if self.params_total else float("nan")


def _tensors(module: nn.Module, names: Sequence[str]):
    own = dict(chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)))
    return [own[n] for n in names if own.get(n) is not None]


def model_size(model: nn.Module) -> tuple[int, int]:
    """(values, bytes) of every distinct parameter and persistent buffer (tied weights counted once)."""
    seen, values, nbytes = set(), 0, 0
    for name, t in chain(model.named_parameters(), model.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if leaf in getattr(module, "_non_persistent_buffers_set", set()) or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        values += t.numel()
        nbytes += t.numel() * t.element_size()
    return values, nbytes


def removed_size(model: nn.Module, removed: Removal, method: str = "delete") -> PrunedSize:
    """Parameters and bytes ``removed`` (MoE layer -> experts) takes out of ``model`` under ``method``."""
    adapter = adapter_for(model)
    desc = describe(model)
    values = nbytes = count = 0
    for layer, experts in removed.items():
        n = len(set(int(e) for e in experts))
        block = moe_block(model, int(layer))
        router_tensors = _tensors(getattr(block, adapter.router_attr), adapter.router_expert_tensors)
        expert_tensors = _tensors(block.experts, adapter.expert_tensors)
        dropped = expert_tensors + (router_tensors if method == "delete" else [])
        for t in dropped:
            per_expert = t.numel() // desc.n_experts
            values += n * per_expert
            nbytes += n * per_expert * t.element_size()
        if method == "mean":
            item = expert_tensors[0].element_size()
            values -= n * desc.d_model
            nbytes -= n * desc.d_model * item
        count += n
    total_values, total_bytes = model_size(model)
    return PrunedSize(count, values, nbytes, total_values, total_bytes)


def size_table(model: nn.Module, units: Sequence) -> pd.DataFrame:
    """``sizes.csv``: per (fraction, method) of the all-layer prunings, what they remove (prunings of one fraction
    and method that remove different numbers of experts, e.g. other allocations, get one row each)."""
    rows = []
    for u in units:
        if u.layer is not None or not u.removed:
            continue
        size = removed_size(model, u.removal, getattr(u, "method", "delete"))
        rows.append((u.fraction, getattr(u, "method", "delete"), size.experts_removed, size.params_removed,
                     size.bytes_removed, size.params_total, size.bytes_total, size.share_params_removed))
    frame = pd.DataFrame(rows, columns=list(SIZE_COLUMNS)).drop_duplicates()
    return frame.sort_values(["method", "fraction", "experts_removed"]).reset_index(drop=True)
