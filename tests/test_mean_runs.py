"""End to end on the embedded model: ``run --mode mean`` (means stored with the run, resumed, records equal direct
ablations) and ``prune-eval --method delete,mean --protect-top --save-pairs`` against independent computations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import moeaudit
from moeaudit.intervene import Ablation, ExpertMeans, ablate, expert_means
from moeaudit.pruning import removed_size, sequence_losses, slice_experts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def builtin():
    return moeaudit.load_model("builtin:tiny-moe")


def test_audit_mode_mean_stores_means_and_records_equal_direct_ablations(tmp_path, builtin):
    model, tokenizer = builtin
    cfg = moeaudit.preset("demo").replace(layers=[5], n=8, n_progressive=3, n_docs=3, n_docs_progressive=4,
                                          experiments=["audit", "progressive"], mode="mean", n_boot=50)
    result = moeaudit.run_audit(cfg, tmp_path / "run", report=False)
    stored = tmp_path / "run" / "expert_means.parquet"
    means = ExpertMeans.from_frame(pd.read_parquet(stored))
    seqs = moeaudit.load_corpus("builtin", tokenizer, n_samples=4, max_length=cfg.max_length,
                                min_length=cfg.min_length)
    again = expert_means(model, seqs)  # over every document the run ablates (single and progressive)
    for layer in again.layers:
        torch.testing.assert_close(means.means[layer], again.means[layer], equal_nan=True, rtol=0, atol=1e-12)
    records = result.records
    assert set(records["mode"]) == {"mean"}
    pool = records[records["experiment"] == "pool"].head(4)
    for _, row in pool.iterrows():
        [r] = ablate(model, seqs[int(row["seq_id"])].input_ids,
                     [Ablation(5, int(row["position"]), tuple(row["ablated_experts"]))], mode="mean", means=means)
        assert r.delta_loss == pytest.approx(row["delta"], abs=1e-6)
    before = stored.stat().st_mtime_ns
    resumed = moeaudit.run_audit(cfg, tmp_path / "run", report=False)
    assert resumed.computed_cells == [] and stored.stat().st_mtime_ns == before


def test_prune_eval_methods_protection_sizes_and_saved_pairs(tmp_path, builtin):
    model, tokenizer = builtin
    cfg = moeaudit.PruneConfig.preset("demo").replace(
        n_docs=3, n_docs_eval=3, n=12, fractions=[0.25], random_seeds=2, n_boot=50, n_perm=50,
        criteria=["frequency_weighted", "random", "causal"], method=("delete", "mean"), protect_top=2)
    out, saved = tmp_path / "prune", tmp_path / "saved"
    result = moeaudit.prune_eval(cfg, out, report=True, save_pruned=saved,
                                 save_pairs="frequency_weighted@0.25,causal@0.25")
    prune = pd.read_csv(out / "prune.csv")
    assert set(prune.loc[prune["criterion"] != "none", "method"]) == {"delete", "mean"}
    assert set(prune.loc[prune["criterion"] == "none", "method"]) == {"none"}
    answer = pd.read_csv(out / "answer.csv")
    assert set(answer["method"]) == {"delete", "mean"}
    pruned = pd.read_parquet(out / "pruned.parquet")
    assert set(pruned["method"]) == {"delete", "mean"}
    supers = pd.read_csv(out / "super_experts.csv")
    tokens = pd.read_parquet(out / "eval_tokens.parquet").sort_values("doc_id")
    folds = sorted(tokens["fold"].unique())
    assert len(folds) == 2
    for fold in folds:
        protected = supers[supers["protected"] & (supers["fold"] == fold)]
        assert len(protected) == 2
        mine = pruned[pruned["fold"] == fold]
        for _, p in protected.iterrows():  # no pruning of the fold removes a protected expert of the fold
            assert not ((mine["layer"] == p["layer"]) & (mine["expert"] == p["expert"])).any()
        # the stored means are the fold's calibration documents' (the other fold's evaluation documents),
        # recomputed independently on the unpruned model
        calibration = [torch.tensor(ids) for ids in tokens.loc[tokens["fold"] != fold, "input_ids"]]
        evaluation = [torch.tensor(ids) for ids in tokens.loc[tokens["fold"] == fold, "input_ids"]]
        means = ExpertMeans.from_frame(pd.read_parquet(out / f"fold{fold}" / "expert_means.parquet"))
        again = expert_means(model, calibration)
        for layer in again.layers:
            torch.testing.assert_close(means.means[layer], again.means[layer], equal_nan=True, rtol=0, atol=1e-12)
        # every mean-replaced loss of the fold equals an independent evaluation with the recomputed means
        part = mine[mine["method"] == "mean"]
        assert len(part)
        for (criterion, seed), rows in part.groupby(["criterion", "seed"]):
            removal = {int(layer): tuple(g["expert"]) for layer, g in rows.groupby("layer")}
            losses = sequence_losses(model, evaluation, removal, method="mean", means=again)
            row = prune[(prune["criterion"] == criterion) & (prune["seed"] == seed) & (prune["method"] == "mean")
                        & (prune["fold"] == fold)]
            assert len(row) == 1
            assert float(row["mean_loss"].iloc[0]) == pytest.approx(losses.mean(), abs=1e-9)
            deleted = prune[(prune["criterion"] == criterion) & (prune["seed"] == seed)
                            & (prune["method"] == "delete") & (prune["fold"] == fold)]
            assert float(deleted["mean_loss"].iloc[0]) == pytest.approx(
                sequence_losses(model, evaluation, removal).mean(), abs=1e-9)
    # methods.csv: mean minus delete pooled over the folds, every evaluated document once
    methods = pd.read_csv(out / "methods.csv")
    named = prune[(prune["criterion"] == "causal")]
    pooled = {m: (g["mean_loss"] * g["n_tokens"]).sum() / g["n_tokens"].sum() for m, g in named.groupby("method")}
    row = methods[methods["criterion"] == "causal"].iloc[0]
    assert row["delta_mean"] == pytest.approx(pooled["mean"] - pooled["delete"], abs=1e-9)
    assert row["n_docs"] == len(tokens) and row["n_folds"] == 2
    evaluation = [torch.tensor(ids) for ids in tokens.loc[tokens["fold"] == 0, "input_ids"]]
    pruned = pruned[pruned["fold"] == 0]
    # sizes from the sliced shapes
    sizes = pd.read_csv(out / "sizes.csv")
    part = pruned[(pruned["criterion"] == "causal") & (pruned["method"] == "delete")]
    removal = {int(layer): tuple(g["expert"]) for layer, g in part.groupby("layer")}
    for method in ("delete", "mean"):
        size = removed_size(model, removal, method)
        assert int(sizes.loc[sizes["method"] == method, "params_removed"].iloc[0]) == size.params_removed
    # the saved checkpoints are the sliced models, and score what prune.csv says
    assert [p.name for p in result.saved_pairs] == ["frequency_weighted@0.25", "causal@0.25"]
    loaded, _ = moeaudit.load_model(str(saved / "causal@0.25"))
    reference = slice_experts(model, removal)
    for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    deleted = prune[(prune["criterion"] == "causal") & (prune["method"] == "delete")
                    & (prune["fold"] == 0)]["mean_loss"].iloc[0]
    assert sequence_losses(loaded, evaluation).mean() == pytest.approx(deleted, abs=1e-5)
    report = (out / "report.md").read_text()
    assert "Mean replacement against deletion" in report and "Super experts" in report
    assert np.isfinite(pd.read_csv(out / "methods.csv")["delta_mean"]).all()
