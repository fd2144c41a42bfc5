"""Pruning beyond deletion: mean replacement against a model whose experts are literally constant-output modules,
parameters and bytes removed against a sliced checkpoint, super experts and their protection, --save-pairs."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import random_ids
from torch import nn

from moeaudit.errors import ConfigError
from moeaudit.intervene import expert_means
from moeaudit.models import describe, moe_block
from moeaudit.pruning import (
    PruneConfig,
    mean_replaced,
    parse_save_pairs,
    protect,
    removal_costs,
    removed_size,
    sequence_losses,
    slice_experts,
    super_experts,
    unrouted_replaced,
)
from moeaudit.pruning._extras import check_save_pairs, method_comparison
from moeaudit.pruning._size import model_size
from moeaudit.pruning._units import PruneUnit
from moeaudit.testing import TINY_FAMILIES, tiny_model


@functools.cache
def model64(family: str):
    return tiny_model(family, seed=3, dtype=torch.float64, experts_implementation="eager")


class _ConstantExperts(nn.Module):
    """A fused experts module in which experts ``constant`` are replaced by modules that output a constant: the
    router is untouched, each routed expert's output is multiplied by its weight, summed per token."""

    def __init__(self, original: nn.Module, constants: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.original = original
        self.novices = nn.ModuleDict({str(e): _Constant(c) for e, c in constants.items()})

    def forward(self, hidden, indices, weights):
        out = torch.zeros_like(hidden)
        for t in range(hidden.shape[0]):
            for j, e in enumerate(indices[t].tolist()):
                if str(e) in self.novices:
                    value = self.novices[str(e)](hidden[t])
                else:
                    value = self.original(hidden[t][None], torch.tensor([[e]]), torch.ones(1, 1, dtype=hidden.dtype))[0]
                out[t] += weights[t, j] * value
        return out


class _Constant(nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value)

    def forward(self, x):
        return self.value.to(x.dtype)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@torch.no_grad()
def test_mean_replaced_equals_constant_expert_modules(family):
    model = model64(family)
    desc = describe(model)
    calibration = [random_ids(30, seed=s) for s in range(3)]
    means = expert_means(model, calibration)
    removed = {layer: (1, 2) for layer in desc.moe_layers}
    ids = random_ids(24, seed=11)
    with mean_replaced(model, removed, means):
        got = model(input_ids=ids[None]).logits[0]
    originals = {}
    try:
        for layer, experts in removed.items():
            block = moe_block(model, layer)
            originals[layer] = block.experts
            block.experts = _ConstantExperts(block.experts, {e: means.constants(layer, unrouted=0.0)[e]
                                                             for e in experts})
        want = model(input_ids=ids[None]).logits[0]
    finally:
        for layer, module in originals.items():
            moe_block(model, layer).experts = module
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    plain = model(input_ids=ids[None]).logits[0]
    assert (got - plain).abs().max() > 1e-6  # the replacement changed something
    losses = sequence_losses(model, [ids], removed, method="mean", means=means)
    ref = torch.nn.functional.cross_entropy(want[:-1], ids[1:], reduction="none").numpy()
    np.testing.assert_allclose(losses, ref, rtol=0, atol=1e-6)  # sequence_losses rounds to float32 losses


@torch.no_grad()
def test_unrouted_expert_outputs_zero_and_is_named():
    model = model64("olmoe")
    layer = describe(model).moe_layers[0]
    means = expert_means(model, [random_ids(3, seed=1)])
    never = means.unrouted(layer)[:2]
    assert unrouted_replaced(means, {layer: never}) == {layer: never}
    ids = random_ids(20, seed=4)
    with mean_replaced(model, {layer: never}, means):
        got = model(input_ids=ids[None]).logits
    block = moe_block(model, layer)
    original = block.experts
    block.experts = _ConstantExperts(original, {e: torch.zeros(describe(model).d_model, dtype=torch.float64)
                                                for e in never})
    try:
        want = model(input_ids=ids[None]).logits
    finally:
        block.experts = original
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_mean_replaced_leaves_model_clean_after_an_exception_and_refuses_bad_input():
    model = model64("mixtral")
    desc = describe(model)
    ids = random_ids(12, seed=2)
    means = expert_means(model, [ids])
    before = model(input_ids=ids[None]).logits
    with pytest.raises(KeyError), mean_replaced(model, {desc.moe_layers[0]: (0,)}, means):
        raise KeyError("boom")
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
    torch.testing.assert_close(model(input_ids=ids[None]).logits, before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="out of range"), \
            mean_replaced(model, {desc.moe_layers[0]: (desc.n_experts,)}, means):
        pass
    with pytest.raises(ValueError, match="ExpertMeans"), mean_replaced(model, {desc.moe_layers[0]: (0,)}, None):
        pass


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_removed_size_equals_a_sliced_checkpoint(family):
    model = tiny_model(family, seed=0)
    desc = describe(model)
    removed = {layer: tuple(range(0, desc.n_experts, 4))[: max(1, desc.n_experts // 4)] for layer in desc.moe_layers}
    if family == "deepseek_v3" or (family == "deepseek_v2" and getattr(model.config, "topk_method", "") ==
                                   "group_limited_greedy"):
        from moeaudit.pruning import plan_removal, prune_geometry

        geometry = prune_geometry(model)
        removed = plan_removal({layer: np.arange(desc.n_experts, dtype=float) for layer in desc.moe_layers}, 0.25,
                               geometry, seed=0)
    sliced = slice_experts(model, removed)
    size = removed_size(model, removed)
    (before, before_bytes), (after, after_bytes) = model_size(model), model_size(sliced)
    assert size.params_removed == before - after
    assert size.bytes_removed == before_bytes - after_bytes
    assert size.params_total == before
    mean = removed_size(model, removed, "mean")
    n = sum(len(v) for v in removed.values())
    assert mean.params_removed < size.params_removed and mean.experts_removed == n
    # mean keeps the router rows and adds one d_model constant per expert
    router_values = size.params_removed - mean.params_removed - n * desc.d_model
    assert router_values > 0


def test_super_experts_from_pool_records_and_protection():
    records = pd.DataFrame({
        "experiment": ["pool"] * 6, "layer": [0, 0, 0, 1, 1, 1], "seq_id": [0, 0, 1, 0, 0, 0],
        "position": [3, 3, 5, 3, 3, 4], "ablated_experts": [[0], [1], [0], [2], [0], [2]],
        "delta": [0.5, 0.1, 0.3, 2.0, -0.1, 1.0]})
    costs = removal_costs(records, [0, 1], 3).set_index(["layer", "expert"])
    assert costs.loc[(0, 0), "removal_cost"] == pytest.approx((0.5 + 0.3) / 2)  # 2 positions at layer 0
    assert costs.loc[(0, 0), "routed_share"] == pytest.approx(1.0)
    assert costs.loc[(1, 2), "removal_cost"] == pytest.approx(3.0 / 2)
    assert costs.loc[(0, 2), "removal_cost"] == 0.0
    importance = pd.DataFrame({"layer": [0, 0, 0, 1, 1, 1], "expert": [0, 1, 2] * 2,
                               "mean_delta": [0.4, 0.1, np.nan, -0.1, np.nan, 1.5]})
    top = super_experts(importance, 2, records=records)
    assert top[["layer", "expert"]].values.tolist() == [[1, 2], [0, 0]]
    scores = protect({0: np.array([0.0, 1.0, 2.0]), 1: np.array([5.0, 0.0, -1.0])}, {1: (2,)}, m=1)
    assert scores[1][2] == np.inf and scores[0].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ConfigError, match="protect"):
        protect({1: np.zeros(3)}, {1: (0, 1)}, m=2)


def test_save_pairs_syntax_and_refusals(tmp_path):
    assert parse_save_pairs("reap@0.25, causal@0.5") == [("reap", 0.25), ("causal", 0.5)]
    for bad in ("reap0.25", "@0.5", "reap@x"):
        with pytest.raises(ConfigError, match="save-pairs"):
            parse_save_pairs(bad)
    config = PruneConfig(fractions=(0.25, 0.5), criteria=("reap", "causal"))
    criteria = ["reap", "causal"]
    check_save_pairs([("reap", 0.25), ("causal", 0.5)], tmp_path, config, criteria)
    for pairs, match in (([("ean", 0.25)], "not a criterion"), ([("reap", 0.3)], "not a fraction"),
                         ([("reap", 0.25), ("reap", 0.25)], "twice")):
        with pytest.raises(ConfigError, match=match):
            check_save_pairs(pairs, tmp_path, config, criteria)
    with pytest.raises(ConfigError, match="needs --save-pruned"):
        check_save_pairs([("reap", 0.25)], None, config, criteria)
    (tmp_path / "reap@0.25").mkdir()
    (tmp_path / "reap@0.25" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not an empty directory"):
        check_save_pairs([("reap", 0.25)], tmp_path, config, criteria)
    with pytest.raises(ConfigError, match="deleted"):
        check_save_pairs([("causal", 0.5)], tmp_path, config.replace(method=("mean",)), criteria)


def test_method_config_checks():
    assert PruneConfig(method=("delete", "mean")).method == ("delete", "mean")
    for kwargs, match in (({"method": ("mena",)}, "Did you mean 'mean'"), ({"method": ()}, "empty"),
                          ({"method": ("mean", "mean")}, "repeats"), ({"protect_top": -1}, "protect"),
                          ({"mode": "mean"}, "--method mean")):
        with pytest.raises(ConfigError, match=match):
            PruneConfig(**kwargs)


def test_method_comparison_against_scipy():
    from scipy import stats

    rng = np.random.default_rng(0)
    docs = np.repeat(np.arange(8), 5)
    delete = rng.gamma(2.0, 1.0, docs.size)
    mean = delete - 0.2 + rng.normal(0, 0.05, docs.size)
    # two cross-fitting folds of 4 documents each: the comparison pools them (every document once)
    half = docs.size // 2
    units = [PruneUnit("reap", 0.25, 0, None, ((0, (1,)),), fold, "uniform", method)
             for fold in (0, 1) for method in ("delete", "mean")]
    assert len({u.loss_key for u in units}) == 4  # the method is part of the model's identity
    parts = {"delete": (delete[:half], delete[half:]), "mean": (mean[:half], mean[half:])}
    losses = {u.loss_key: parts[u.method][u.fold] for u in units}
    table = method_comparison(units, losses, {0: docs[:half], 1: docs[half:]}, alpha=0.05, n_perm=999, n_boot=500,
                              seed=0)
    assert len(table) == 1
    row = table.iloc[0]
    assert row["n_docs"] == 8 and row["n_folds"] == 2 and row["allocation"] == "uniform"
    per_doc = pd.Series(mean - delete).groupby(docs).mean()
    assert row["delta_mean"] == pytest.approx((mean - delete).mean())
    assert row["p_t"] == pytest.approx(stats.ttest_1samp(per_doc, 0).pvalue, rel=1e-6)  # equal document sizes
    assert row["decision"] == "mean better"


def test_dry_run_workload_counts_methods_and_protection():
    """``prune-eval --dry-run``: every method evaluates each pruning (mean doubles the pruned models), and
    ``--protect-top`` needs the importance map even without the causal criterion (``n`` unset resolved)."""
    from types import SimpleNamespace

    from moeaudit.pruning import PruneConfig
    from moeaudit.run._workloads import prune_workload

    geometry = SimpleNamespace(moe_layers=[1, 2], top_k=2)  # what the workload reads of the model
    base = PruneConfig(model="builtin:tiny-moe", corpus="builtin", n_docs=4, n_docs_eval=4, max_length=32,
                       criteria=("reap",), fractions=(0.25, 0.5))
    plain, both = prune_workload(base, geometry), prune_workload(base.replace(method=("delete", "mean")), geometry)
    assert plain.full_forwards // 4 == 2 * (1 + 2) and both.full_forwards // 4 == 2 * (1 + 2 * 2)  # 2 folds
    assert not plain.ablations
    protected = prune_workload(base.replace(protect_top=2), geometry)
    assert protected.ablations and all(v > 0 for v in protected.ablations.values())
