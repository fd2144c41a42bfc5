"""Checkpoints with experts deleted: slice every expert-indexed tensor, update the config, save a loadable copy.

The per-family facts (config key of the expert count, the router's and the experts module's expert-indexed
tensors) are data in :mod:`moeaudit.models._families`; a tensor indexed by expert that the adapter does not list is
an error, so a new config variant cannot be sliced half-way silently.
"""

from __future__ import annotations

import copy
import json
import shutil
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from moeaudit.errors import UnsupportedModelError
from moeaudit.models import adapter_for, moe_block
from moeaudit.pruning._plan import Removal, prune_geometry, removal_masks

#: File a saved pruned checkpoint carries next to config.json: which original experts it removed and kept.
PRUNING_FILE = "moeaudit_pruning.json"


def _slice_tensors(module: nn.Module, names: tuple[str, ...], kept: torch.Tensor, n_experts: int,
                   where: str) -> None:
    own = dict(chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)))
    indexed = {n for n, t in own.items() if t is not None and t.dim() >= 1 and t.shape[0] == n_experts}
    unknown = sorted(indexed - set(names))
    if unknown:
        raise UnsupportedModelError(
            f"{where} ({type(module).__name__}) has tensors indexed by expert that the family adapter does not list: "
            f"{unknown}; slicing without them would leave a broken checkpoint. Add them to the adapter's "
            "router_expert_tensors / expert_tensors in src/moeaudit/models/_families.py.")
    for name in names:
        tensor = own.get(name)
        if tensor is None:
            raise UnsupportedModelError(f"{where} ({type(module).__name__}) has no tensor {name!r}, which its family "
                                        "adapter lists as expert-indexed; check src/moeaudit/models/_families.py.")
        new = tensor.detach()[kept.to(tensor.device)].clone()
        if isinstance(tensor, nn.Parameter):
            setattr(module, name, nn.Parameter(new, requires_grad=tensor.requires_grad))
        else:
            module.register_buffer(name, new, persistent=name not in module._non_persistent_buffers_set)


def slice_experts(model: nn.Module, removed: Removal, *, inplace: bool = False) -> nn.Module:
    """The model with the ``removed`` experts deleted: router rows (and router bias, DeepSeek-V3's
    ``e_score_correction_bias``) and every expert-indexed parameter of the fused experts sliced, the config's expert
    count updated. Remaining experts keep their order (expert ``e`` becomes the number of kept experts below it).

    A transformers config has one expert count for all MoE layers, so ``removed`` must name every MoE layer with the
    same number of experts (per-layer prunings exist in memory only, see :func:`moeaudit.pruning.pruned`).

    Args:
        model: A transformers MoE causal LM.
        removed: MoE layer -> experts to delete (original ids).
        inplace: Slice ``model`` itself instead of a deep copy (saves the memory of a second model).

    Returns:
        The sliced model (``model`` itself when ``inplace``).
    """
    adapter = adapter_for(model)
    geometry = prune_geometry(model)
    masks = removal_masks(geometry, removed)
    missing = [layer for layer in geometry.moe_layers if layer not in masks]
    counts = {int(mask.sum()) for mask in masks.values()}
    if missing or len(counts) != 1:
        raise ValueError(
            "a checkpoint has one expert count for every MoE layer: remove the same number of experts at every MoE "
            f"layer ({list(geometry.moe_layers)}); got "
            + (f"no removal for layers {missing}" if missing else f"counts {sorted(counts)}") + ".")
    n_kept = geometry.n_experts - counts.pop()
    target = model if inplace else copy.deepcopy(model)
    for layer in geometry.moe_layers:
        kept = torch.nonzero(~masks[layer]).flatten()
        block = moe_block(target, layer)
        gate = getattr(block, adapter.router_attr)
        _slice_tensors(gate, adapter.router_expert_tensors, kept, geometry.n_experts, f"layer {layer} router")
        _slice_tensors(block.experts, adapter.expert_tensors, kept, geometry.n_experts, f"layer {layer} experts")
        for module in (block, gate, block.experts):
            if hasattr(module, "num_experts"):
                module.num_experts = n_kept
    setattr(target.config, adapter.n_experts_key, n_kept)
    if hasattr(target, "num_experts"):  # the causal LM's own copy (router auxiliary loss)
        target.num_experts = n_kept
    return target


def check_save_target(out: str | Path) -> Path:
    """Refuse a target for a pruned checkpoint that is a file or a non-empty directory (before any work).

    Raises:
        FileExistsError: Naming the path, what it is, and the fix.
    """
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"save_pruned={str(out)!r} is an existing file, not a directory; name a new directory "
                              "for the pruned checkpoint.")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"save_pruned={str(out)!r} is a directory that is not empty; name a new (or empty) "
                              "directory for the pruned checkpoint, or move the existing one aside.")
    return out


def save_pruned(model: nn.Module, removed: Removal, out: str | Path, *, tokenizer=None,
                provenance: dict | None = None) -> Path:
    """Write a loadable checkpoint of ``model`` with the ``removed`` experts deleted to the directory ``out``.

    The model is sliced in a copy (``model`` is untouched), saved with ``save_pretrained`` (and the tokenizer, when
    given) into a temporary sibling directory that is renamed into place, so ``out`` holds a whole checkpoint or
    nothing. ``moeaudit_pruning.json`` records the removed and kept original expert ids per layer and
    ``provenance``.

    Raises:
        FileExistsError: ``out`` exists and is not empty.
    """
    out = check_save_target(out)
    sliced = slice_experts(model, removed)
    geometry = prune_geometry(model)
    staging = out.parent / f".tmp-{out.name}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        sliced.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        layers = {str(layer): {"removed": sorted(int(e) for e in removed[layer]),
                               "kept": [e for e in range(geometry.n_experts) if e not in set(removed[layer])]}
                  for layer in geometry.moe_layers}
        (staging / PRUNING_FILE).write_text(json.dumps(
            {"original_n_experts": geometry.n_experts, "layers": layers, **(provenance or {})}, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
