"""Pruning semantics: which experts a fraction removes, and in-memory pruning equal to a checkpoint with those
experts actually deleted (router rows, biases and expert weights sliced, config updated, saved and reloaded) on
every family, group-limited routers included."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import cached_tiny, random_ids

from moeaudit.errors import ConfigError, UnsupportedModelError
from moeaudit.models import FAMILIES, adapter_for, moe_block, router
from moeaudit.pruning import (
    PRUNING_FILE,
    n_removed,
    plan_removal,
    prune_geometry,
    pruned,
    rank_experts,
    save_pruned,
    slice_experts,
)
from moeaudit.pruning._plan import PruneGeometry
from moeaudit.testing import tiny_model


def _random_removal(model, fraction: float, seed: int = 1) -> dict[int, tuple[int, ...]]:
    geometry = prune_geometry(model)
    rng = np.random.default_rng(seed)
    scores = {layer: rng.random(geometry.n_experts) for layer in geometry.moe_layers}
    return plan_removal(scores, fraction, geometry, seed=seed)


def _reloaded(model, removed, tmp_path):
    from transformers import AutoModelForCausalLM

    out = save_pruned(model, removed, tmp_path / "pruned")
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), out


@torch.no_grad()
def _check_equal_to_sliced(model, removed, tmp_path):
    ids = random_ids(48, seed=3)[None]
    clean = model(ids).logits
    with pruned(model, removed):
        in_memory = model(ids).logits
    sliced, out = _reloaded(model, removed, tmp_path)
    on_disk = sliced(ids).logits
    assert (in_memory - on_disk).abs().max() < 1e-5
    assert (in_memory - clean).abs().max() > 1e-2, "the pruning must change the logits for the test to bite"
    assert torch.equal(model(ids).logits, clean), "the hooks are gone after the block"
    return sliced, out


def test_in_memory_pruning_equals_a_sliced_checkpoint(family, tmp_path):
    model = cached_tiny(family)
    removed = _random_removal(model, 0.25)
    sliced, out = _check_equal_to_sliced(model, removed, tmp_path)
    geometry = prune_geometry(model)
    m = n_removed(geometry, 0.25)
    adapter = adapter_for(model)
    assert getattr(sliced.config, adapter.n_experts_key) == geometry.n_experts - m
    for layer in geometry.moe_layers:
        gate = router(sliced, layer)
        kept = [e for e in range(geometry.n_experts) if e not in removed[layer]]
        for name in adapter.router_expert_tensors:
            assert torch.equal(getattr(gate, name), getattr(router(model, layer), name)[kept])
        for name in adapter.expert_tensors:
            assert torch.equal(getattr(moe_block(sliced, layer).experts, name),
                               getattr(moe_block(model, layer).experts, name)[kept])
    record = json.loads((out / PRUNING_FILE).read_text())
    assert record["layers"][str(geometry.moe_layers[0])]["removed"] == list(removed[geometry.moe_layers[0]])


def test_group_limited_deepseek_v2_prunes_group_balanced_and_equals_the_sliced_checkpoint(tmp_path):
    model = tiny_model("deepseek_v2", topk_method="group_limited_greedy", n_group=4, topk_group=2)
    geometry = prune_geometry(model)
    assert geometry.groups is not None and (geometry.groups.n_group, geometry.per_group) == (4, 4)
    removed = _random_removal(model, 0.5)
    for experts in removed.values():  # two from each group of four
        assert np.bincount(np.asarray(experts) // 4, minlength=4).tolist() == [2, 2, 2, 2]
    _check_equal_to_sliced(model, removed, tmp_path)


def test_group_limited_routers_refuse_unbalanced_removal_and_too_small_groups():
    for model in (cached_tiny("deepseek_v3"),
                  tiny_model("deepseek_v2", topk_method="group_limited_greedy", n_group=4, topk_group=2)):
        layer = prune_geometry(model).moe_layers[0]
        with pytest.raises(ValueError, match="same number from every group"), pruned(model, {layer: (0, 1)}):
            pass  # both from group 0
        with pytest.raises(ConfigError, match="per group"):
            n_removed(prune_geometry(model), 0.75)  # leaves one expert per group
    # DeepSeek-V3 scores a group by its two best experts: two must remain (top_k 4 / topk_group 2 needs two too)
    assert n_removed(prune_geometry(cached_tiny("deepseek_v3")), 0.5) == 8


@pytest.mark.parametrize(("n_experts", "top_k", "fraction", "expected"), [
    (16, 4, 0.125, 2), (16, 4, 0.25, 4), (16, 4, 0.5, 8), (60, 4, 0.125, 8), (20, 4, 0.125, 3), (8, 2, 0.25, 2),
])
def test_removed_count_rounds_half_up(n_experts, top_k, fraction, expected):
    geometry = PruneGeometry("olmoe", (0,), n_experts, top_k, None)
    assert n_removed(geometry, fraction) == expected


def test_fractions_that_remove_nothing_or_too_much_are_refused():
    geometry = PruneGeometry("olmoe", (0,), 16, 4, None)
    with pytest.raises(ConfigError, match="removes no expert"):
        n_removed(geometry, 0.01)
    with pytest.raises(ConfigError, match="leaving 3 < top_k = 4"):
        n_removed(geometry, 0.8)
    with pytest.raises(ConfigError, match=r"not in \(0, 1\)"):
        n_removed(geometry, 1.0)


def test_ranking_is_ascending_nan_lowest_with_a_seeded_tie_break():
    values = np.array([0.5, np.nan, 0.1, 0.5, 0.5, 0.9])
    order = rank_experts(values, tiebreak=np.array([5, 0, 1, 2, 4, 3]))
    assert order.tolist() == [1, 2, 3, 4, 0, 5]  # NaN first, then 0.1, then the 0.5 ties by the tie-break order
    geometry = PruneGeometry("olmoe", (0, 1), 8, 2, None)
    tied = {0: np.zeros(8), 1: np.zeros(8)}
    a = plan_removal(tied, 0.5, geometry, seed=0)
    assert a == plan_removal(tied, 0.5, geometry, seed=0)
    assert a != plan_removal(tied, 0.5, geometry, seed=1), "ties are broken by the seed, not by expert id"
    assert a[0] != a[1], "each layer has its own tie-break"


def test_pruned_model_never_routes_a_removed_expert_and_is_clean_after_an_error():
    model = cached_tiny("olmoe")
    removed = _random_removal(model, 0.5)
    seen: dict[int, torch.Tensor] = {}
    ids = random_ids(32)[None]
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), pruned(model, removed):
        # registered after the pruning hooks, so they see what the MoE block receives
        handles = [router(model, layer).register_forward_hook(
            lambda m, a, out, layer=layer: seen.__setitem__(layer, out[2])) for layer in removed]
        try:
            model(ids)
        finally:
            for h in handles:
                h.remove()
        raise RuntimeError("boom")
    for layer, experts in removed.items():
        assert not np.isin(seen[layer].numpy(), experts).any()
    assert all(not router(model, layer)._forward_hooks for layer in removed)


def test_slicing_refuses_uneven_layers_and_unlisted_expert_tensors(monkeypatch, tmp_path):
    model = cached_tiny("gpt_oss")
    layers = prune_geometry(model).moe_layers
    with pytest.raises(ValueError, match="same number of experts at every MoE layer"):
        slice_experts(model, {layers[0]: (0, 1)})
    adapter = FAMILIES["gpt_oss"]
    partial = dataclasses.replace(adapter, expert_tensors=("gate_up_proj", "down_proj"))
    monkeypatch.setitem(FAMILIES, "gpt_oss", partial)
    with pytest.raises(UnsupportedModelError, match="gate_up_proj_bias"):
        slice_experts(model, _random_removal(model, 0.25))
    monkeypatch.undo()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        save_pruned(model, _random_removal(model, 0.25), tmp_path / "full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"], "a refused save leaves nothing behind"
