"""prune-eval's design against independent computations: stratified cross-fitted splits (counted by hand), the
removal cost (brute force from the pool records, statsmodels for its interval), allocations at equal budget, and
the share of random prunings at least as good (its calibration and power by simulation with known truth)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import cached_tiny, random_ids

from moeaudit.builtin import builtin_labelled_documents
from moeaudit.errors import ConfigError
from moeaudit.experiments import ExperimentSettings
from moeaudit.models import RoutingGroups
from moeaudit.pruning import PruneConfig, PruneGeometry, collect_pool, importance_table, plan_removal
from moeaudit.pruning._plan import plan_allocation
from moeaudit.pruning._random_ref import share_random_better
from moeaudit.pruning._splits import make_folds
from moeaudit.stats import correct


def test_builtin_folds_are_stratified_disjoint_and_evaluate_every_document_once():
    labels = [d for d, _ in builtin_labelled_documents("heldout")]
    ids = list(np.random.default_rng(7).permutation(len(labels)))  # a shuffled pool
    folds = make_folds(ids, [labels[i] for i in ids], folds=2, n_calibration=32)
    assert sorted(d for f in folds for d in f.evaluation) == list(range(64))
    for f in folds:
        assert not set(f.calibration) & set(f.evaluation)
        assert set(f.calibration) | set(f.evaluation) == set(range(64))
        for side in (f.calibration, f.evaluation):
            counts = pd.Series([labels[d] for d in side]).value_counts()
            assert set(counts.index) == set(labels) and (counts == 8).all()
    three = make_folds(ids, [labels[i] for i in ids], folds=3, n_calibration=0)
    sizes = [pd.Series([labels[d] for d in f.evaluation]).value_counts() for f in three]
    assert all(s.max() - s.min() <= 1 and len(s) == 4 for s in sizes)
    (one,) = make_folds(ids[:40], [labels[i] for i in ids[:40]], folds=1, n_calibration=10)
    assert len(one.calibration) == 10 and len(one.evaluation) == 30
    counts = pd.Series([labels[d] for d in one.calibration]).value_counts()
    expected = pd.Series([labels[i] for i in ids[:40]]).value_counts() * 10 / 40
    assert (abs(counts.reindex(expected.index, fill_value=0) - expected) <= 1).all()


def test_removal_cost_is_the_mean_over_all_positions_by_brute_force():
    import statsmodels.api as sm

    model = cached_tiny("olmoe")
    seqs = [random_ids(40, seed=s) for s in range(4)]
    pool = pd.concat([collect_pool(model, seqs, ExperimentSettings(n=24, seed=0, mode="reroute"), layer)
                      for layer in (0, 2)], ignore_index=True)
    table = importance_table(pool, [0, 2], 16).set_index(["layer", "expert"])
    for layer in (0, 2):
        rows = pool[pool["layer"] == layer]
        positions = rows[["seq_id", "position"]].drop_duplicates()
        assert len(positions) == 24 and (table.loc[layer, "n_positions"] == 24).all()
        for e in range(16):
            mine = rows[[x[0] == e for x in rows["ablated_experts"]]]
            brute = mine["delta"].sum() / len(positions)
            assert table.loc[(layer, e), "removal_cost"] == pytest.approx(brute, abs=1e-12)
            assert table.loc[(layer, e), "routed_share"] == pytest.approx(len(mine) / len(positions))
            if len(mine) == 0:
                assert table.loc[(layer, e), "never_routed"] and table.loc[(layer, e), "removal_cost"] == 0
            else:
                assert brute == pytest.approx(table.loc[(layer, e), "routed_share"]
                                              * table.loc[(layer, e), "mean_delta"], abs=1e-12)
    # the interval: CR1 on the zero-filled per-position values, as statsmodels computes it
    layer, e = table["n_routed"].idxmax()
    rows = pool[pool["layer"] == layer]
    positions = rows[["seq_id", "position"]].drop_duplicates().sort_values(["seq_id", "position"])
    mine = rows[[x[0] == e for x in rows["ablated_experts"]]].set_index(["seq_id", "position"])["delta"]
    values = mine.reindex(pd.MultiIndex.from_frame(positions), fill_value=0.0).to_numpy()
    fit = sm.OLS(values, np.ones(len(values))).fit(cov_type="cluster", cov_kwds={"groups": positions["seq_id"]})
    from scipy import stats

    half = stats.t.ppf(0.975, positions["seq_id"].nunique() - 1) * float(fit.bse[0])
    assert table.loc[(layer, e), "removal_cost_low"] == pytest.approx(values.mean() - half, rel=1e-9)
    assert table.loc[(layer, e), "removal_cost_high"] == pytest.approx(values.mean() + half, rel=1e-9)


GEOMETRY = PruneGeometry("olmoe", (0, 1, 2), 8, 2, None)


def test_allocations_remove_the_same_total_where_each_rule_says():
    rng = np.random.default_rng(0)
    scores = {layer: rng.normal(layer, 1.0, 8) for layer in (0, 1, 2)}  # layer 0's values are smallest
    costs = {0: np.full(8, 5.0), 1: np.linspace(0, 0.7, 8), 2: np.full(8, 9.0)}
    uniform = plan_allocation(scores, 0.25, GEOMETRY, seed=0, allocation="uniform")
    assert uniform == plan_removal(scores, 0.25, GEOMETRY, seed=0)
    total = sum(len(v) for v in uniform.values())
    assert total == 6
    glob = plan_allocation(scores, 0.25, GEOMETRY, seed=0, allocation="global")
    flat = sorted((float(v), layer, e) for layer, values in scores.items() for e, v in enumerate(values))
    assert sorted((layer, e) for _, layer, e in flat[:6]) == sorted((layer, e) for layer, es in glob.items()
                                                                   for e in es)
    causal = plan_allocation(scores, 0.25, GEOMETRY, seed=0, allocation="causal", costs=costs)
    assert [len(causal[layer]) for layer in (0, 1, 2)] == [0, 6, 0]  # layer 1's experts are cheapest
    assert causal[1] == tuple(sorted(np.argsort(scores[1])[:6].tolist()))  # the criterion picks within
    big = plan_allocation({k: v for k, v in scores.items()}, 0.5, GEOMETRY, seed=0, allocation="causal",
                          costs=costs)
    assert sum(map(len, big.values())) == 12 and len(big[1]) == 6  # at most E - top_k = 6 per layer
    grouped = PruneGeometry("deepseek_v2", (0, 1, 2), 8, 2, RoutingGroups(2, 1, 1))
    with pytest.raises(ConfigError, match="group-limited"):
        plan_allocation(scores, 0.25, grouped, seed=0, allocation="global")
    with pytest.raises(ConfigError, match="allocation=uniform,banana"):
        PruneConfig(allocation=("uniform", "banana"))


def _world(rng, n_docs: int, seeds: int, criterion_effect: float | None, floor: float = 0.0):
    """Per-token losses: document effects, right-skewed seed effects (lognormal) and seed x document noise; the
    criterion sits at ``criterion_effect`` (None: the random median, so P(random ≤ criterion) = 1/2)."""
    sizes = rng.integers(20, 60, n_docs)
    docs = np.repeat(np.arange(n_docs), sizes)
    base = 2.0 + rng.normal(0, 0.5, n_docs)[docs] + rng.normal(0, 0.3, docs.size)
    effects = floor + rng.lognormal(-1.5, 1.0, seeds)  # skewness ~6: a mean far from the median

    def arm(effect):
        return base + effect + rng.normal(0, 0.1, n_docs)[docs]

    random = np.stack([arm(e) for e in effects])
    median = floor + float(np.exp(-1.5))
    return arm(median if criterion_effect is None else criterion_effect), random, docs


def test_share_random_better_is_calibrated_at_the_random_median_and_powered():
    rng = np.random.default_rng(1)
    rejected = 0
    sims = 200
    for _ in range(sims):
        crit, random, docs = _world(rng, 32, 20, None)
        rejected += share_random_better(crit, random, docs, n_boot=200, seed=0).p < 0.05
    assert rejected / sims <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / sims)  # at most alpha (Monte Carlo error)
    # power: a pruning as good as the unpruned model, random prunings clearly costlier, 45 rows under Holm
    powered = 0
    for _ in range(50):
        crit, random, docs = _world(rng, 32, 20, 0.0, floor=0.1)  # every random pruning costs >= 0.1 nats
        p = share_random_better(crit, random, docs, n_boot=200, seed=0)
        holm = correct(np.r_[p.p, np.full(44, 0.5)], "holm", 0.05).p_corrected[0]
        powered += holm < 0.05 and p.below_half > 0.5 and p.share == 0
    assert powered == 50
    # with 5 seeds the same pruning cannot be declared better under Holm over 45 rows (why the demo uses 20)
    crit, random, docs = _world(rng, 32, 5, 0.0, floor=0.1)
    assert share_random_better(crit, random, docs, n_boot=200).p * 45 > 0.05
    # the point estimate is a count
    assert share_random_better(random[0], random, docs).share == pytest.approx(
        float(np.mean(random.mean(1) <= random[0].mean())))


def test_loo_cost_is_the_loss_with_the_router_masked_by_hand():
    """Independent of moeaudit's pruning hook: Qwen2-MoE's router re-implemented with the expert's logit at -inf
    (softmax over the rest, top-k, renormalised as the config says), i.e. a checkpoint without the expert."""
    import torch

    from moeaudit.pruning import prune_geometry, sequence_losses
    from moeaudit.pruning._units import loo_costs

    model = cached_tiny("qwen2_moe")
    seqs = [random_ids(24, seed=s) for s in range(3)]
    layer = prune_geometry(model).moe_layers[-1]
    table = loo_costs(model, seqs, [layer], prune_geometry(model).n_experts)
    base = sequence_losses(model, seqs).mean()
    gate = model.model.layers[layer].mlp.gate
    for e in (0, 3):
        def masked(hidden, gate=gate, e=e):
            logits = torch.nn.functional.linear(hidden.reshape(-1, gate.hidden_dim), gate.weight)
            probs = torch.softmax(logits.float().index_fill(-1, torch.tensor([e]), float("-inf")), dim=-1)
            top, idx = torch.topk(probs, gate.top_k, dim=-1)
            if gate.norm_topk_prob:
                top = top / top.sum(-1, keepdim=True)
            return logits, top.to(logits.dtype), idx

        gate.forward = masked
        try:
            by_hand = float(sequence_losses(model, seqs).mean() - base)
        finally:
            del gate.forward
        cost = table[(table["layer"] == layer) & (table["expert"] == e)]["loo_cost"].item()
        assert cost == pytest.approx(by_hand, abs=1e-6)
    assert np.abs(table["loo_cost"]).max() > 1e-4, "removal must change the loss for the test to bite"


def test_stratify_field_labels_and_refusals(tmp_path):
    import json

    from moeaudit.corpus import read_documents
    from moeaudit.errors import CorpusError
    from moeaudit.pruning._splits import document_labels, stratified_sample

    rows = [{"text": f"document {i}", "source": "news" if i % 3 else "code"} for i in range(12)]
    rows.insert(5, {"text": "   ", "source": "blank"})  # read_documents drops blank documents; so do the labels
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    labels = document_labels(str(path), "source", "text", "utf-8")
    assert len(labels) == len(read_documents(path)) == 12 and "blank" not in labels
    assert labels == ["code" if i % 3 == 0 else "news" for i in range(12)]
    picked = stratified_sample(labels, 6)
    assert sorted(labels[i] for i in picked) == ["code"] * 2 + ["news"] * 4  # in proportion 4 : 8
    assert document_labels(str(path), None, "text", "utf-8") is None
    with pytest.raises(CorpusError, match="has no such field"):
        document_labels(str(path), "topic", "text", "utf-8")
    with pytest.raises(ConfigError, match="builtin corpus is stratified by its domains"):
        document_labels("builtin", "source", "text", "utf-8")
    with pytest.raises(ConfigError, match="needs a .jsonl or .parquet corpus"):
        document_labels(str(tmp_path / "c.txt"), "source", "text", "utf-8")
    with pytest.raises(ConfigError, match="set folds=1 with eval_corpus="):
        PruneConfig(eval_corpus="builtin:train")
    assert PruneConfig(eval_corpus="builtin:train", folds=1).folds == 1
    with pytest.raises(ConfigError, match="reference='exact'"):
        PruneConfig(reference="exact")
